"""What a generation measured (times, acceptance, layers used) and the weight bytes its steps read, from which the
bandwidth figures come: a step counts what it really ran, not a full-depth token."""
import resource
from dataclasses import dataclass, field
from typing import Optional

import torch

from model import FlexiDepthBlock, Transformer


# Not read per token: caches and masks, and int4's second copy for cpu_kernels (Int4Linear), the same bytes as its
# torch-packed copy, of which each call reads one.
NOT_WEIGHTS = ("k_cache", "v_cache", "rope", "slots", "ran", "draft_vocab", "nibbles",
               "kernel_scales_zeros")


def tensor_bytes(module: torch.nn.Module, skip=()) -> int:
    """Bytes of the weights a module holds, each tensor once; names starting with anything in skip left out."""
    sizes = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if name.rsplit(".", 1)[-1] not in NOT_WEIGHTS and not name.startswith(tuple(skip)):
            sizes[id(t)] = t.numel() * t.element_size()
    return sum(sizes.values())


def weight_bytes(model: Transformer, n_layers: Optional[int] = None) -> int:
    """Bytes read per token through layers [0, n_layers) and the head, every layer run in full. The embedding
    table counts only when it is also the head (otherwise one row is read)."""
    L = model.args.n_layers
    skip = [f"layers.{i}." for i in range(L if n_layers is None else n_layers, L)] + ["exit_heads."]
    if model.tok_embeddings.weight is not getattr(model.output, "weight", None):
        skip.append("tok_embeddings.")
    return tensor_bytes(model, skip)


def draft_bytes(model: Transformer, early_exit: int) -> int:
    """Bytes a self-speculative draft step reads: layers [0, E), the exit head at E if the model has one, the final
    norm and the draft's LM head (only its draft-vocabulary rows when it has one)."""
    total = weight_bytes(model, early_exit)
    if str(early_exit) in model.exit_heads:
        total += tensor_bytes(model.exit_heads[str(early_exit)])
    trimmed = model.draft_output_weight
    if trimmed is not None:
        full = model.output.weight
        total += trimmed.numel() * trimmed.element_size() - full.numel() * full.element_size()
    return total


def flexidepth_bytes(model: Transformer, layers_used: list) -> float:
    """Mean bytes read per token when each token ran only the layers in its layers_used list. A routed layer that
    runs reads all but its adapter; one that is skipped reads its router, norms, K/V projections and adapter."""
    total = weight_bytes(model, 0)
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, FlexiDepthBlock):
            total += tensor_bytes(layer)
            continue
        ran = sum(1 for used in layers_used if i in used) / len(layers_used)
        total += ran * tensor_bytes(layer, skip=("adapter.",))
        total += (1 - ran) * tensor_bytes(layer, skip=("attention.wq", "attention.wo", "feed_forward."))
    return total


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    compile_seconds: Optional[float] = None  # warm_up before the prompt (None: nothing compiled in this call)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_cpu_seconds: float = 0.0  # this process's CPU time over the decode: steadier than wall on a shared machine
    decode_bytes: float = 0.0  # weight bytes the decode steps read (the bandwidth figure)
    accepted: list = field(default_factory=list)  # tokens accepted per speculation step (n, of k)
    speculate_k: list = field(default_factory=list)  # k used at each speculation step
    draft_seconds: float = 0.0  # time in draft / verify forwards alone (speculation only)
    verify_seconds: float = 0.0
    from_draft: list = field(default_factory=list)  # per generated token: an accepted draft (True) or not
    layers_used: list = field(default_factory=list)  # FlexiDepth: per generated token, the layers that ran

    @property
    def tokens_per_second(self) -> float:
        # decode throughput: tokens after the first (which prefill produces) over the decode time
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def cpu_tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_cpu_seconds if self.decode_cpu_seconds > 0 else float("nan")

    @property
    def bandwidth(self) -> float:
        return self.decode_bytes / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    # ---- speculation figures
    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / len(self.accepted)

    def acceptance_histogram(self) -> list:
        """Fraction of steps that accepted n drafts, n = 0..k (the LayerSkip branch's "acceptance probs")."""
        counts = [0] * (max(self.speculate_k) + 1)
        for n in self.accepted:
            counts[n] += 1
        return [c / len(self.accepted) for c in counts]

    def acceptance_by_position(self) -> list:
        """P(draft i accepted | drafts before it accepted), for i = 1..k."""
        rates = []
        for i in range(1, max(self.speculate_k) + 1):
            reached = sum(1 for n, k in zip(self.accepted, self.speculate_k) if k >= i and n >= i - 1)
            rates.append(sum(1 for n in self.accepted if n >= i) / reached if reached else float("nan"))
        return rates

    @property
    def draft_step_seconds(self) -> float:
        return self.draft_seconds / sum(self.speculate_k)

    @property
    def verify_step_seconds(self) -> float:
        return self.verify_seconds / len(self.accepted)

    @property
    def forward_bound_tokens_per_second(self) -> float:
        """What the measured acceptance allows if a step cost only its draft and verify forwards (their measured
        times). Achieved over this is the loop efficiency: what sampling, acceptance and bookkeeping cost. Not a
        physical bound."""
        mean_k = sum(self.speculate_k) / len(self.speculate_k)
        return (self.mean_accepted + 1) / (mean_k * self.draft_step_seconds + self.verify_step_seconds)


def merge_stats(all_stats: list) -> GenerationStats:
    """Several generations as one whose decode steps are all of theirs (each one's first token came from its own
    prefill): times, bytes and speculation steps add up, so tokens_per_second and bandwidth hold over all of them."""
    total = GenerationStats(new_tokens=1)
    for s in all_stats:
        total.prompt_tokens += s.prompt_tokens
        total.new_tokens += s.new_tokens - 1
        for name in ("prefill_seconds", "decode_seconds", "decode_cpu_seconds", "decode_bytes", "draft_seconds",
                     "verify_seconds"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        if s.compile_seconds is not None:
            total.compile_seconds = (total.compile_seconds or 0.0) + s.compile_seconds
        total.accepted += s.accepted
        total.speculate_k += s.speculate_k
        total.from_draft += s.from_draft[1:]
        total.layers_used += s.layers_used[1:]
    total.from_draft[:0] = all_stats[0].from_draft[:1] if all_stats else []
    total.layers_used[:0] = all_stats[0].layers_used[:1] if all_stats else []
    return total


def decode_bytes(model: Transformer, stats: GenerationStats, early_exit: Optional[int],
                 draft_model: Optional[Transformer]) -> float:
    """Weight bytes the decode loop read: what each step really ran (FlexiDepth's skipped layers and the
    draft's E layers count as what they read, not as full-depth tokens)."""
    full = weight_bytes(model)
    if stats.accepted:
        draft = weight_bytes(draft_model) if draft_model is not None else draft_bytes(model, early_exit)
        steps_bytes = sum(k * draft + full for k in stats.speculate_k)
        if draft_model is not None:  # a fully accepted step feeds the draft model its own last draft
            steps_bytes += draft * sum(1 for n, k in zip(stats.accepted, stats.speculate_k) if n == k)
        return steps_bytes
    per_token = flexidepth_bytes(model, stats.layers_used[1:]) if len(stats.layers_used) > 1 else full
    return per_token * (stats.new_tokens - 1)


# ---------------------------------------------------------------- the figures the CLI prints

def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def print_stats(stats: GenerationStats, model: Transformer, args, device: str, skip_threshold: float):
    tps = stats.tokens_per_second
    print(f"\nprompt {stats.prompt_tokens} tokens, prefill {stats.prefill_seconds * 1000:.1f} ms; "
          f"generated {stats.new_tokens} tokens")
    if stats.compile_seconds is not None:
        print(f"compile and warm-up: {stats.compile_seconds:.1f} s (not in the figures below)")
    if stats.accepted:
        print(f"acceptance probs: {[round(p, 3) for p in stats.acceptance_histogram()]}")
        print(f"acceptance by draft position: {[round(p, 3) for p in stats.acceptance_by_position()]}")
        print(f"mean accepted: {stats.mean_accepted:.3f} (tokens per step {stats.mean_accepted + 1:.3f}, "
              f"{len(stats.accepted)} steps, k={'auto' if args.speculate_k == 'auto' else max(stats.speculate_k)})")
        print(f"draft step {stats.draft_step_seconds * 1000:.2f} ms, verify step {stats.verify_step_seconds * 1000:.2f}"
              f" ms; loop efficiency {tps / stats.forward_bound_tokens_per_second:.2f} (achieved over what the "
              f"measured forwards alone allow, {stats.forward_bound_tokens_per_second:.2f} tok/s)")
    if stats.new_tokens < 2:  # the rate counts the tokens after the first, which the prefill gives
        print(f"decode: not timed (the rate needs 2 tokens or more, and {stats.new_tokens} was generated; "
              f"--ignore_eos generates all --max_new_tokens)")
    else:
        print(f"decode: {tps:.2f} tok/s (compiled steps only, terminal output excluded)" if args.compile
              else f"decode: {tps:.2f} tok/s (terminal output excluded)")
        per_token = stats.decode_bytes / (stats.new_tokens - 1)
        print(f"bandwidth achieved: {stats.bandwidth / 1e9:.2f} GB/s ({per_token / 1e9:.3f} GB of weights read per "
              f"token as run; {weight_bytes(model) / 1e9:.3f} GB at full depth)")
    print(f"peak memory: {peak_memory_gb(device):.2f} GB")
    if stats.layers_used:
        routed = model.args.routing_layers
        mean = sum(len(u) for u in stats.layers_used) / len(stats.layers_used)
        routed_ran = sum(len(set(u) & set(routed)) for u in stats.layers_used) / (len(stats.layers_used) * len(routed))
        print(f"layers used: mean {mean:.2f} of {model.args.n_layers} per token "
              f"(routed layers run {routed_ran:.1%}, skip threshold {skip_threshold})")


def summary_line(args, model: Transformer, precision, device: str, world: int, load_seconds: float) -> str:
    quant = getattr(model, "quantization", None)
    return (f"{args.checkpoint_path.parent.name}: {model.args.n_layers} layers, dim {model.args.dim}, "
            f"{sum(p.numel() for n, p in model.named_parameters() if n.rsplit('.', 1)[-1] not in NOT_WEIGHTS) / 1e6:.1f}"
            f"M params, "
            f"{args.precision or str(precision).replace('torch.', '') + ' (default on ' + device + ')'}"
            f"{', ' + quant['mode'] if quant else ''}"
            f"{' g' + str(quant['groupsize']) if quant and 'groupsize' in quant else ''}, {device}"
            f"{f', tensor parallel over {world} ranks (params per rank)' if world > 1 else ''}"
            f", loaded in {load_seconds:.2f}s")
