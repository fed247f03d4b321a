"""Load a converted checkpoint and generate: plain decoding, draft-model and LayerSkip self-speculative decoding.

    python generate.py --compile --prompt "What is the capital of France?" --chat
    python generate.py --compile --self_speculative --early_exit 4 --speculate_k 2
    python generate.py --compile --checkpoint_path checkpoints/xuan-luo/FlexiDepth-Llama-3-8B-Instruct/model.pth \
        --show_depth --depth_html depth.html     # FlexiDepth: routed layers really skipped at decode
"""
import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import tp
from model import ModelArgs, Transformer
from tokenizer import load_tokenizer

DEFAULT_CHECKPOINT = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- loading

def resolve_device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but no CUDA GPU is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}: use cpu or cuda")
    return name


def default_precision(device: str) -> torch.dtype:
    """bf16 where the hardware computes it natively (CUDA, CPUs with AVX-512 BF16/AMX), else fp32."""
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def load_model(checkpoint_path, device="cpu", precision=torch.float32, tensor_parallel=False) -> Transformer:
    checkpoint_path = Path(checkpoint_path)
    folder = checkpoint_path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} not found (run ./scripts/prepare.sh first)")
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"{checkpoint_path} not found (convert the folder with convert_hf_checkpoint.py)")
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found")
    try:
        args = ModelArgs.from_hf_config(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{config_path} is not a usable Llama config: {e}")
    try:
        state_dict = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {checkpoint_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    quantization = state_dict.pop("quantization", None) if isinstance(state_dict, dict) else None
    with torch.device("meta"):
        model = Transformer(args)
    if quantization is not None:
        from quantize import prepare_quantized_model
        model = prepare_quantized_model(model, quantization)
    # tied: the head shares the embedding, unless a quantized file gave the head its own quantized copy
    tied = args.tie_embeddings and "output.weight" not in state_dict
    if tied and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    try:
        model.load_state_dict(state_dict, assign=True, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ValueError(f"{checkpoint_path} does not match {config_path}: {first}")
    if tensor_parallel:
        # this rank's shard, cut while the weights are still on the host and int4 is not yet packed
        tp.apply_tp(model)
    model = model.to(device=device)
    # Cast floating weights only: quantized integer tensors keep their dtype.
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != precision:
                setattr(module, name, torch.nn.Parameter(p.to(precision), requires_grad=False))
    if tied:
        model.output.weight = model.tok_embeddings.weight
    if quantization is not None:
        from quantize import pack_for_device
        pack_for_device(model, device)
    return model.eval().requires_grad_(False)


def weight_bytes(model: torch.nn.Module, n_layers: Optional[int] = None) -> int:
    """Bytes of weights read per decoded token (each tensor once; the embedding row is negligible)."""
    seen, total = set(), 0
    head_shares_table = model.tok_embeddings.weight is getattr(model.output, "weight", None)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or "kv_cache" in name or name in ("rope", "causal_mask", "draft_vocab") \
                or name.startswith("exit_heads."):  # the draft's alone
            continue
        if name.startswith("tok_embeddings") and not head_shares_table:
            continue  # one row is read per token, unless the head is the same table
        if n_layers is not None and name.startswith("layers.") and int(name.split(".")[1]) >= n_layers:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- sampling

def logits_to_probs(logits: Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> Tensor:
    """Probabilities of the next token. temperature 0 is greedy: a one-hot at the argmax, so the speculative
    acceptance rule below reduces to exact-match acceptance with no special case."""
    logits = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def speculative_accept(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
                       generator: Optional[torch.Generator]):
    """The speculative-sampling acceptance rule, written once for every kind of speculation.

    draft_tokens [k], draft_probs [k, V] (the distribution each was drawn from), target_probs [k+1, V].
    Accept d_i with probability min(1, p(d_i)/q(d_i)); at the first rejection draw from max(p - q, 0)
    renormalised; if all k pass, draw a bonus token from target row k. Returns (n accepted, next token).
    With one-hot (greedy) distributions this is exactly "accept while draft == target argmax".
    """
    k = draft_tokens.shape[0]
    rows = torch.arange(k, device=draft_tokens.device)
    p = target_probs[rows, draft_tokens]
    q = draft_probs[rows, draft_tokens]
    u = torch.rand(k, generator=generator, device=draft_tokens.device)
    rejected = (u * q >= p).nonzero()
    if rejected.numel() == 0:
        return k, sample_from(target_probs[k], generator)
    n = int(rejected[0, 0])
    residual = (target_probs[n] - draft_probs[n]).clamp_min(0)
    if residual.sum() <= 0:  # p == q exactly: any draw from p is right
        residual = target_probs[n]
    return n, sample_from(residual / residual.sum(), generator)


# ---------------------------------------------------------------- model steps (the compiled units)

def forward_last(model: Transformer, x: Tensor, input_pos: Tensor) -> Tensor:
    """Full-depth forward; logits of the last row. Prefill and one-token decode."""
    return model(x, input_pos)[:, -1]


def draft_step(model: Transformer, x: Tensor, input_pos: Tensor, early_exit: int):
    """Early-exit draft of one token: layers [0, E), then the exit head at E (if trained), the final norm and the
    draft LM head (model.exit_logits). Returns (logits, raw layer-E hidden, which the verify continues from)."""
    h = model.run_layers(model.embed(x), input_pos, 0, early_exit)
    return model.exit_logits(h, early_exit)[:, -1], h


def verify_step(model: Transformer, last_draft: Tensor, last_index: Tensor, kept_hidden: Tensor,
                input_pos: Tensor, early_exit: int):
    """Verify drafts at positions input_pos. Only the last draft (row last_index) still needs layers [0, E): the
    rows before it hold the layer-E inputs the draft steps kept, and their K/V below E are already in the cache.
    Rows after it are padding, so that one compiled shape serves every k; they write K/V past the accepted
    length, which the position mask hides until real tokens overwrite them."""
    h_last = model.run_layers(model.embed(last_draft), input_pos[last_index], 0, early_exit)
    h = kept_hidden.index_copy(1, last_index, h_last)
    return model.head(model.run_layers(h, input_pos, early_exit, model.args.n_layers))[0]


def verify_full(model: Transformer, tokens: Tensor, input_pos: Tensor) -> Tensor:
    return model(tokens, input_pos)[0]


@dataclass
class Steps:
    """The model steps generation calls; compile() swaps them for compiled ones."""
    prefill: Callable = forward_last
    decode: Callable = forward_last
    draft: Callable = draft_step
    verify: Callable = verify_step
    verify_full: Callable = verify_full


def compile_steps(device: str, compile_prefill: bool, precision: Optional[torch.dtype] = None) -> Steps:
    """precision: the weights' dtype, when known; on CPU fp32 weights get inductor's own GEMM kernels (below)."""
    if device.startswith("cuda"):
        options = dict(mode="reduce-overhead", fullgraph=True)
        prefill_options = dict(fullgraph=True, dynamic=True)
    else:
        import torch._inductor.config as inductor_config
        # On CPU (BENCHMARKS.md): CUDA-graph mode only adds overhead. For the multi-token steps (verify, prefill)
        # freezing lets inductor prepack the weights, and concatenating the linears that share an input (wq/wk/wv,
        # w1/w3) saves 3 of 7 matmul calls per layer.
        # Set process-wide: passed as torch.compile(options=...) they did not take effect (measured no faster).
        inductor_config.freezing = True
        inductor_config.cpp.enable_concat_linear = True
        inductor_config.autotune_num_choices_displayed = 0  # no autotune tables on stderr
        inductor_config.max_autotune_report_choices_stats = False
        options = dict(fullgraph=True)
        prefill_options = dict(fullgraph=True, dynamic=True)
        # max-autotune: inductor's CPP GEMM templates beat MKL's fp32 GEMMs but not oneDNN's bf16 ones, and cost
        # ~2.5x the compile time; so fp32 only, and only when the caller says fp32 (tests don't). One-token steps
        # have no GEMM left to tune: model.Linear writes them as a GEMV that inductor generates itself.
        if precision == torch.float32:
            options["mode"] = "max-autotune-no-cudagraphs"
    torch._dynamo.config.cache_size_limit = 64
    return Steps(
        prefill=torch.compile(forward_last, **prefill_options) if compile_prefill else forward_last,
        decode=torch.compile(forward_last, **options),
        draft=torch.compile(draft_step, **options),
        verify=torch.compile(verify_step, **options),
        verify_full=torch.compile(verify_full, **options),
    )


# ---------------------------------------------------------------- generation

@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    accepted: list = field(default_factory=list)  # tokens accepted per speculation step (n, of k)
    speculate_k: list = field(default_factory=list)  # k used at each speculation step
    draft_seconds: float = 0.0  # time in draft / verify forwards alone (speculation only)
    verify_seconds: float = 0.0
    layers_used: list = field(default_factory=list)  # FlexiDepth: per generated token, the layers that ran

    @property
    def tokens_per_second(self) -> float:
        # decode throughput: tokens after the first (which prefill produces) over the decode time
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else float("nan")

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
    def ideal_tokens_per_second(self) -> float:
        """What the measured acceptance allows if a step cost only its draft and verify forwards (their measured
        times): the rest of the loop (sampling, acceptance, bookkeeping) is what achieved/ideal shows."""
        mean_k = sum(self.speculate_k) / len(self.speculate_k)
        return (self.mean_accepted + 1) / (mean_k * self.draft_step_seconds + self.verify_step_seconds)


def cache_length_needed(prompt_len: int, max_new_tokens: int, speculate_k: int) -> int:
    # speculation writes up to k+1 slots past the last accepted token
    return prompt_len + max_new_tokens + (speculate_k + 1 if speculate_k else 0)


def check_fits(model: Transformer, prompt_len: int, max_new_tokens: int, speculate_k: int):
    need = cache_length_needed(prompt_len, max_new_tokens, speculate_k)
    if need > model.max_seq_length:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens})"
                         + (f" + speculation room ({speculate_k + 1})" if speculate_k else "")
                         + f" needs {need} cache slots; the cache holds {model.max_seq_length}")


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, generator=None, steps: Steps = None,
             early_exit: Optional[int] = None, speculate_k: int = 0, draft_model: Optional[Transformer] = None,
             adaptive_k: bool = False, eos_ids=(), callback: Optional[Callable] = None):
    """Generate up to max_new_tokens after prompt [T]. Plain decoding, or speculation when speculate_k > 0:
    self-speculative with early_exit E, or with a separate draft_model. Returns (new tokens [N], stats)."""
    steps = steps or Steps()
    device = prompt.device
    T = prompt.shape[0]
    L = model.args.n_layers
    speculating = speculate_k > 0
    if speculating and draft_model is None and not (early_exit and 1 <= early_exit < L):
        raise ValueError(f"--early_exit must be in 1..{L - 1} for this {L}-layer model, got {early_exit}")
    check_fits(model, T, max_new_tokens, speculate_k)
    if draft_model is not None:
        check_fits(draft_model, T, max_new_tokens, speculate_k)
    if speculating and (model.args.routing_layers or (draft_model is not None and draft_model.args.routing_layers)):
        raise ValueError("speculative decoding with a FlexiDepth checkpoint is not supported; decode it without "
                         "--self_speculative / --draft_checkpoint_path")
    stats = GenerationStats(prompt_tokens=T)

    def sample(logits):
        if temperature <= 0:  # greedy: the argmax itself, not a draw from its one-hot
            return logits.argmax(-1)
        return sample_from(logits_to_probs(logits, temperature, top_k, top_p), generator)

    synchronize(device)
    t0 = time.perf_counter()
    input_pos = torch.arange(T, device=device)
    token = sample(steps.prefill(model, prompt[None], input_pos))[0]
    if draft_model is not None:
        steps.prefill(draft_model, prompt[None], input_pos)
    synchronize(device)
    stats.prefill_seconds = time.perf_counter() - t0

    out = [int(token)]
    stop = bool(callback(out)) if callback else False  # a callback that returns True ends generation (stop strings)
    pos = T  # position of `token`, which is not in the cache yet
    k = speculate_k
    t0 = time.perf_counter()
    while not stop and len(out) < max_new_tokens and out[-1] not in eos_ids:
        if not speculating:
            logits = steps.decode(model, token.view(1, 1), torch.tensor([pos], device=device))
            token = sample(logits)[0]
            new = [int(token)]
            pos += 1
        else:
            k_step = min(k, max_new_tokens - len(out))  # never draft past the end
            n, token, drafts = speculate_once(model, draft_model, steps, token, pos, k_step, speculate_k,
                                              early_exit, temperature, top_k, top_p, generator, stats)
            new = drafts[:n] + [int(token)]
            pos += n + 1
            stats.accepted.append(n)
            stats.speculate_k.append(k_step)
            if adaptive_k:
                k = next_k(k_step, n, speculate_k)
        for t in new:
            if len(out) >= max_new_tokens or out[-1] in eos_ids:
                break
            out.append(t)
        if callback:
            stop = bool(callback(out))
    synchronize(device)
    stats.decode_seconds = time.perf_counter() - t0
    stats.new_tokens = len(out)
    if model.args.routing_layers:
        # generated token j came out of the forward at position T-1+j; one read at the end, no sync per token
        ran = model.layers_ran(torch.arange(T - 1, T - 1 + len(out), device=device)).cpu()
        stats.layers_used = [row.nonzero().flatten().tolist() for row in ran]
    return torch.tensor(out, device=device), stats


def next_k(k: int, accepted: int, k_max: int) -> int:
    """--speculate_k auto: grow k after a fully accepted step, shrink it to just past a rejection."""
    return min(k + 1, k_max) if accepted == k else max(1, accepted + 1)


def speculate_once(model, draft_model, steps, token, pos, k, k_max, early_exit, temperature, top_k, top_p,
                   generator, stats):
    """One draft-then-verify step from `token` at position pos: k drafts, verified in k_max + 1 rows.
    stats gets the time of the draft and verify forwards alone (no sampling, no acceptance), so that the ideal
    they allow can be set against the achieved rate."""
    device = token.device
    draft_tokens, draft_probs = [], []
    kept_hidden = torch.zeros(1, k_max + 1, model.args.dim, device=device, dtype=model.norm.weight.dtype)
    x = token
    for i in range(k):
        input_pos = torch.tensor([pos + i], device=device)
        t0 = time.perf_counter()
        if draft_model is None:
            logits, hidden = steps.draft(model, x.view(1, 1), input_pos, early_exit)
            kept_hidden[:, i] = hidden[:, 0]
        else:
            logits = steps.decode(draft_model, x.view(1, 1), input_pos)
        synchronize(device)
        stats.draft_seconds += time.perf_counter() - t0
        probs = logits_to_probs(logits[0], temperature, top_k, top_p)
        x = logits[0].argmax(-1) if temperature <= 0 else sample_from(probs, generator)
        draft_tokens.append(x)
        draft_probs.append(probs)
    verify_pos = torch.arange(pos, pos + k_max + 1, device=device)
    candidates = torch.stack([token] + draft_tokens + [x] * (k_max - k))  # padded to the fixed shape
    t0 = time.perf_counter()
    if draft_model is None:
        last_index = torch.tensor([k], device=device)
        logits = steps.verify(model, x.view(1, 1), last_index, kept_hidden, verify_pos, early_exit)
    else:
        logits = steps.verify_full(model, candidates.view(1, -1), verify_pos)
    synchronize(device)
    stats.verify_seconds += time.perf_counter() - t0
    target_probs = logits_to_probs(logits[:k + 1], temperature, top_k, top_p)
    n, next_token = speculative_accept(torch.stack(draft_tokens), torch.stack(draft_probs), target_probs, generator)
    if draft_model is not None and n == k:
        # the draft model never saw its own last draft; give it that token so its cache has no hole
        steps.decode(draft_model, draft_tokens[-1].view(1, 1), torch.tensor([pos + k], device=device))
    return n, next_token, [int(t) for t in draft_tokens]


# ---------------------------------------------------------------- CLI

def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


# ---------------------------------------------------------------- FlexiDepth depth display

def depth_rgb(used: int, n_layers: int, fewest: int) -> tuple:
    """Green for the fewest layers a token can use, through yellow, to red for all of them."""
    t = (used - fewest) / max(n_layers - fewest, 1)
    return round(255 * min(1.0, 2 * t)), round(200 * min(1.0, 2 - 2 * t)), 60


def ansi_depth(text: str, used: int, n_layers: int, fewest: int) -> str:
    r, g, b = depth_rgb(used, n_layers, fewest)
    return f"\x1b[30;48;2;{r};{g};{b}m{text}\x1b[0m\x1b[2m{used}\x1b[0m"


def token_texts(tokenizer, tokens: list) -> list:
    """The text each token adds to the decoded string (so multi-token characters land on their last token)."""
    texts, before = [], ""
    for j in range(len(tokens)):
        now = tokenizer.decode(tokens[:j + 1])
        if j < len(tokens) - 1:  # a partial UTF-8 character decodes as U+FFFD until its last byte arrives
            now = now.rstrip("\ufffd")
        texts.append(now[len(os.path.commonprefix([before, now])):])
        before = now
    return texts


def write_depth_html(path: Path, texts: list, layers_used: list, n_layers: int, fewest: int, title: str):
    """A self-contained page: the text coloured by depth, and a tokens x layers grid (a filled cell: the layer ran).
    Hovering a token or a column shows the token and its count of layers. Written to a temporary name, then renamed."""
    import html
    cells, spans = [], []
    for j, (text, used) in enumerate(zip(texts, layers_used)):
        r, g, b = depth_rgb(len(used), n_layers, fewest)
        tip = html.escape(f"token {j}: {text!r}, {len(used)}/{n_layers} layers", quote=True)
        spans.append(f'<span style="background:rgb({r},{g},{b})" title="{tip}">{html.escape(text)}</span>')
        ran = set(used)
        column = "".join(f'<i class="{"on" if layer in ran else "off"}"></i>' for layer in reversed(range(n_layers)))
        cells.append(f'<div class="col" title="{tip}" style="--c:rgb({r},{g},{b})">{column}'
                     f'<b>{len(used)}</b></div>')
    mean = sum(len(u) for u in layers_used) / max(len(layers_used), 1)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)} depth map</title>
<style>
body {{ font-family: sans-serif; margin: 16px; background: #fafafa; }}
.text {{ white-space: pre-wrap; line-height: 1.7; font-family: monospace; font-size: 15px; max-width: 70em; }}
.text span {{ padding: 1px 0; }}
.grid {{ display: flex; align-items: flex-end; overflow-x: auto; padding: 8px 0; gap: 1px; }}
.col {{ display: flex; flex-direction: column; gap: 1px; }}
.col i {{ display: block; width: 9px; height: 9px; }}
.col i.on {{ background: var(--c); }}
.col i.off {{ background: #ddd; }}
.col b {{ font-size: 7px; font-weight: normal; text-align: center; }}
.col:hover i.on {{ background: #000; }}
</style></head><body>
<h3>{html.escape(title)}: layers used per generated token</h3>
<p>{len(layers_used)} tokens, mean {mean:.2f} of {n_layers} layers (green {fewest}, red {n_layers}).
Columns are tokens, rows are layers (layer 0 at the bottom); a coloured cell is a layer the token ran.</p>
<div class="grid">{"".join(cells)}</div>
<div class="text">{"".join(spans)}</div>
</body></html>
"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def print_stats(stats: GenerationStats, model: Transformer, args, device):
    bytes_per_token = weight_bytes(model)
    tps = stats.tokens_per_second
    if args.self_speculative:
        print(f"\nself-speculation: early exit {args.early_exit}, k={args.speculate_k}{args.chosen}", end="")
    print(f"\nprompt {stats.prompt_tokens} tokens, prefill {stats.prefill_seconds * 1000:.1f} ms; "
          f"generated {stats.new_tokens} tokens")
    if stats.accepted:
        print(f"acceptance probs: {[round(p, 3) for p in stats.acceptance_histogram()]}")
        print(f"acceptance by draft position: {[round(p, 3) for p in stats.acceptance_by_position()]}")
        print(f"mean accepted: {stats.mean_accepted:.3f} (tokens per step {stats.mean_accepted + 1:.3f}, "
              f"{len(stats.accepted)} steps, k={'auto' if args.speculate_k == 'auto' else max(stats.speculate_k)})")
        print(f"draft step {stats.draft_step_seconds * 1000:.2f} ms, verify step {stats.verify_step_seconds * 1000:.2f} "
              f"ms: ideal {stats.ideal_tokens_per_second:.2f} tok/s, achieved/ideal {tps / stats.ideal_tokens_per_second:.2f}")
    print(f"decode: {tps:.2f} tok/s")
    print(f"bandwidth achieved: {bytes_per_token * tps / 1e9:.2f} GB/s (model {bytes_per_token / 1e9:.3f} GB read "
          f"per full-depth token)")
    print(f"peak memory: {peak_memory_gb(device):.2f} GB")
    if stats.layers_used:
        routed = model.args.routing_layers
        mean = sum(len(u) for u in stats.layers_used) / len(stats.layers_used)
        routed_ran = sum(len(set(u) & set(routed)) for u in stats.layers_used) / (len(stats.layers_used) * len(routed))
        print(f"layers used: mean {mean:.2f} of {model.args.n_layers} per token "
              f"(routed layers run {routed_ran:.1%}, skip threshold {model.skip_threshold})")


def self_speculative_defaults(args) -> str:
    """--self_speculative without --early_exit / --speculate_k: take them from the checkpoint's config.json
    "self_speculative" {"early_exit": E, "speculate_k": k} (written by scripts/sweep.py --write_best).
    Sets args.chosen, the note for the summary line."""
    args.chosen = ""
    if args.early_exit is not None and args.speculate_k is not None:
        return
    config_path = Path(args.checkpoint_path).parent / "config.json"
    try:
        best = json.loads(config_path.read_text()).get("self_speculative") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        best = {}  # load_model reports an unreadable config
    taken = []
    if args.early_exit is None and "early_exit" in best:
        args.early_exit = best["early_exit"]
        taken.append("early exit")
    if args.speculate_k is None and "speculate_k" in best:
        args.speculate_k = str(best["speculate_k"])
        taken.append("k")
    args.chosen = f" ({' and '.join(taken)} from config.json, best of scripts/sweep.py)" if taken else ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate text with a converted Llama checkpoint.")
    p.add_argument("--prompt", type=str, default="Hello, my name is")
    p.add_argument("--chat", action="store_true", help="format the prompt with the checkpoint's chat template")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--compile", action="store_true", help="compile the decode steps")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic shapes)")
    p.add_argument("--draft_checkpoint_path", type=Path, default=None)
    p.add_argument("--speculate_k", type=str, default=None,
                   help="drafts per step, or 'auto' (default: the checkpoint's self_speculative, else 5)")
    p.add_argument("--self_speculative", action="store_true")
    p.add_argument("--early_exit", type=int, default=None, help="draft layers E for --self_speculative")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=list(PRECISIONS), default=None)
    p.add_argument("--show_depth", action="store_true",
                   help="FlexiDepth: stream each token coloured by its depth, with its count of layers used")
    p.add_argument("--depth_html", type=Path, default=None,
                   help="FlexiDepth: write an HTML depth map (tokens x layers) of the last sample to this file")
    p.add_argument("--skip_threshold", type=float, default=None,
                   help="FlexiDepth extension: a token runs a routed layer iff its gate exceeds this "
                        "(default 0.5, the checkpoint's own rule; 0 runs every layer, 1 skips every routed one)")
    return p.parse_args(argv)


def run(args):
    device = resolve_device(args.device)
    world = tp.maybe_init_dist(device)  # > 1 under torchrun: this process holds one shard of every layer
    if tp.rank() != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints
    if args.self_speculative:
        self_speculative_defaults(args)
    if args.speculate_k is None:
        args.speculate_k = "5"
    if args.speculate_k == "auto":
        adaptive_k, speculate_k = True, 8
    else:
        try:
            speculate_k = int(args.speculate_k)
        except ValueError:
            raise ValueError(f"--speculate_k must be a positive integer or 'auto', got {args.speculate_k!r}")
        adaptive_k = False
        if speculate_k < 1:
            raise ValueError(f"--speculate_k must be at least 1, got {speculate_k}")
    if args.self_speculative and args.draft_checkpoint_path:
        raise ValueError("choose one of --self_speculative and --draft_checkpoint_path")
    if args.max_new_tokens < 1:
        raise ValueError("--max_new_tokens must be at least 1")
    if args.num_samples < 1:
        raise ValueError("--num_samples must be at least 1")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    speculating = args.self_speculative or args.draft_checkpoint_path is not None
    if not speculating:
        speculate_k = 0
    if args.seed is not None:
        torch.manual_seed(args.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed if args.seed is not None else torch.seed())

    precision = PRECISIONS[args.precision] if args.precision else default_precision(device)
    t0 = time.perf_counter()
    model = load_model(args.checkpoint_path, device, precision, tensor_parallel=world > 1)
    L = model.args.n_layers
    if args.self_speculative and not (args.early_exit is not None and 1 <= args.early_exit < L):
        raise ValueError(f"--early_exit must be in 1..{L - 1} for this {L}-layer model, got {args.early_exit}")
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    draft_model = None
    if args.draft_checkpoint_path:
        draft_model = load_model(args.draft_checkpoint_path, device, precision, tensor_parallel=world > 1)
        if draft_model.args.vocab_size != model.args.vocab_size:
            raise ValueError(f"draft model vocabulary ({draft_model.args.vocab_size}) differs from the model's "
                             f"({model.args.vocab_size})")
    if world > 1:
        tp.check_all_ranks_ready()  # a rank that failed above is reported here, and every rank stops
        generator.manual_seed(tp.broadcast_seed(generator.initial_seed()))
    quant = getattr(model, "quantization", None)
    print(f"{args.checkpoint_path.parent.name}: {L} layers, dim {model.args.dim}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{args.precision or str(precision).replace('torch.', '') + ' (default on ' + device + ')'}"
          f"{', ' + quant['mode'] if quant else ''}"
          f"{' g' + str(quant['groupsize']) if quant and 'groupsize' in quant else ''}, {device}"
          f"{f', tensor parallel over {world} ranks (params per rank)' if world > 1 else ''}"
          f", loaded in {time.perf_counter() - t0:.2f}s")

    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(text, add_special_tokens=not args.chat)
    if not prompt_ids:
        raise ValueError("the prompt is empty (and the tokenizer adds no BOS token): give --prompt some text")
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    need = cache_length_needed(len(prompt_ids), args.max_new_tokens, speculate_k)
    if need > model.args.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({args.max_new_tokens}) needs {need} "
                         f"positions; the model's context is {model.args.max_position_embeddings}")
    for m in (model, draft_model):
        if m is not None:
            m.setup_caches(1, need)
    routed = model.args.routing_layers
    if (args.show_depth or args.depth_html or args.skip_threshold is not None) and not routed:
        raise ValueError("--show_depth, --depth_html and --skip_threshold need a FlexiDepth checkpoint "
                         "(config.json with routing_layers)")
    if routed:
        if args.skip_threshold is not None:
            if not 0.0 <= args.skip_threshold <= 1.0:
                raise ValueError(f"--skip_threshold must be in [0, 1], got {args.skip_threshold}")
            model.skip_threshold = args.skip_threshold
        if args.depth_html and not args.depth_html.resolve().parent.is_dir():
            raise ValueError(f"--depth_html: folder {args.depth_html.resolve().parent} does not exist")
        if speculating:
            raise ValueError("speculative decoding with a FlexiDepth checkpoint is not supported; drop "
                             "--self_speculative / --draft_checkpoint_path")
        print(f"FlexiDepth: routers on {len(routed)} of {L} layers ({routed[0]}..{routed[-1]}); a token runs a "
              f"routed layer iff its gate > {model.skip_threshold}")
    steps = compile_steps(device, args.compile_prefill, precision) if args.compile else Steps()

    temperature = args.temperature
    for i in range(args.num_samples):
        printed = [0]

        def stream(tokens):
            text = tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids])
            if args.show_depth:  # plain decoding: one new token per call, produced at position prompt_len-1+j
                used = int(model.layers_ran(torch.tensor([len(prompt_ids) - 2 + len(tokens)], device=device)).sum())
                fewest = L - len(routed)
                print(ansi_depth(text[printed[0]:], used, L, fewest), end="", flush=True)
            else:
                print(text[printed[0]:], end="", flush=True)
            printed[0] = len(text)

        if i == 0 or args.num_samples > 1:
            print(f"\n--- sample {i + 1} ---" if args.num_samples > 1 else "")
        tokens, stats = generate(model, prompt, args.max_new_tokens, temperature=temperature, top_k=args.top_k,
                                 top_p=args.top_p, generator=generator, steps=steps, early_exit=args.early_exit,
                                 speculate_k=speculate_k, draft_model=draft_model, adaptive_k=adaptive_k,
                                 eos_ids=tokenizer.eos_ids, callback=stream)
        print()
    print_stats(stats, model, args, device)
    if args.depth_html:
        write_depth_html(args.depth_html, token_texts(tokenizer, tokens.tolist()), stats.layers_used, L, L - len(routed),
                         args.checkpoint_path.parent.name)
        print(f"depth map: {args.depth_html}")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        if tp.launched_by_torchrun():
            tp.exit_with_error(e)  # one line from rank 0, every rank exits non-zero, none waits forever
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    tp.shutdown()


if __name__ == "__main__":
    main()
