"""Load a converted checkpoint and generate: plain decoding, draft-model and LayerSkip self-speculative decoding.

    python generate.py --compile --prompt "What is the capital of France?" --chat
    python generate.py --compile --self_speculative --early_exit 4 --speculate_k 2
    python generate.py --compile --checkpoint_path checkpoints/xuan-luo/FlexiDepth-Llama-3-8B-Instruct/model.pth \
        --show_depth --depth_html depth.html     # FlexiDepth: routed layers really skipped at decode
"""
import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import cpu_linear
import hugepages
import tp
from cli import main_guard
from depth_view import stream_printer, token_texts, write_depth_html
from figures import GenerationStats, decode_bytes, print_stats, summary_line
from model import ModelArgs, Transformer
from sampling import Sampling, speculative_accept
from steps import Steps, checked_once, compile_steps, live_slots, synchronize, warm_up
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


def read_state_dict(checkpoint_path: Path) -> dict:
    """model.pth as a dict of tensors, read as data only (weights_only: a pickle cannot run code)."""
    try:
        state_dict = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {checkpoint_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise ValueError(f"{checkpoint_path} holds a {type(state_dict).__name__}, not a state dict of named tensors")
    return state_dict


def check_finite(model: torch.nn.Module, checkpoint_path: Path):
    """Refuse NaN or Inf weights (a corrupt or diverged checkpoint): a tensor's norm is finite iff its values are.
    _foreach_norm is one fused pass over all of them (per-tensor isfinite().all() took seconds on 135M weights)."""
    named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    norms = torch._foreach_norm([p for _, p in named])
    bad = [name for (name, _), norm in zip(named, norms) if not torch.isfinite(norm)]
    if bad:
        raise ValueError(f"{checkpoint_path}: {bad[0]} holds NaN or Inf values (a corrupt or diverged checkpoint)")


def load_model(checkpoint_path, device="cpu", precision=torch.float32, tensor_parallel=False) -> Transformer:
    checkpoint_path = Path(checkpoint_path)
    folder = checkpoint_path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} not found (run ./scripts/prepare.sh first)")
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"{checkpoint_path} not found (convert the folder with convert_hf_checkpoint.py)")
    args = ModelArgs.from_folder(folder)
    state_dict = read_state_dict(checkpoint_path)
    quantization = state_dict.pop("quantization", None)
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
    except (RuntimeError, TypeError) as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ValueError(f"{checkpoint_path} does not match {folder / 'config.json'}: {first}")
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
    check_finite(model, checkpoint_path)
    if quantization is not None:
        from quantize import pack_for_device
        pack_for_device(model, device)
    if torch.device(device).type == "cpu":
        hugepages.move_weights(model)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- generation

def cache_length_needed(prompt_end: int, max_new_tokens: int, speculate_k: int) -> int:
    # speculation writes up to k+1 slots past the last accepted token
    return prompt_end + max_new_tokens + (speculate_k + 1 if speculate_k else 0)


# A compiled step's shapes include the cache length, so each new length compiled anew: a second run with another
# prompt took 30 s on 2 CPU cores instead of 5. Rounded up to a multiple of CACHE_ROUNDING, runs whose prompt +
# max_new_tokens round alike share one compile. Attention reads every slot, so the unused ones cost about 2 us a slot a
# token (SmolLM2-135M int4, 2 cores): at most 0.14 ms, about 3% of a step, 1.5% on average (BENCHMARKS.md).
CACHE_ROUNDING = 64


def cache_length(need: int, context: int) -> int:
    """The cache generate.py sets up for `need` positions of a model of `context` positions: rounded up, within it."""
    return max(need, min(-(-need // CACHE_ROUNDING) * CACHE_ROUNDING, context))


def check_fits(model: Transformer, prompt_end: int, max_new_tokens: int, speculate_k: int):
    """prompt_end: the position after the prompt's last token (the prompt length, plus earlier chat turns)."""
    need = cache_length_needed(prompt_end, max_new_tokens, speculate_k)
    if need > model.max_seq_length:
        raise ValueError(f"prompt ({prompt_end} tokens) + max_new_tokens ({max_new_tokens})"
                         + (f" + speculation room ({speculate_k + 1})" if speculate_k else "")
                         + f" needs {need} cache slots; the cache holds {model.max_seq_length}")


def check_early_exit(early_exit, n_layers: int):
    if early_exit is None or not 1 <= early_exit < n_layers:
        raise ValueError(f"--early_exit must be in 1..{n_layers - 1} for this {n_layers}-layer model, got {early_exit}")


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, sampling: Optional[Sampling] = None, *,
             steps: Optional[Steps] = None, early_exit: Optional[int] = None, speculate_k: int = 0,
             draft_model: Optional[Transformer] = None, adaptive_k: bool = False, eos_ids=(),
             ignore_eos: bool = False, callback: Optional[Callable] = None, start_pos: int = 0,
             skip_threshold: float = 0.5):
    """Generate up to max_new_tokens after prompt [T], which goes at positions start_pos.. (the cache already holds
    the positions before: earlier chat turns). Plain decoding, or speculation when speculate_k > 0: self-speculative
    with early_exit E, or with a separate draft_model. callback(tokens so far) returning True stops generation.
    Returns (new tokens [N], stats)."""
    sampling = sampling or Sampling(device=str(prompt.device))
    steps = steps or Steps()
    device = prompt.device
    T = prompt.shape[0]
    speculating = speculate_k > 0
    if speculating and draft_model is None:
        check_early_exit(early_exit, model.args.n_layers)
    for m in (model, draft_model):
        if m is not None:
            check_fits(m, start_pos + T, max_new_tokens, speculate_k)
    if speculating and (model.args.routing_layers or (draft_model is not None and draft_model.args.routing_layers)):
        raise ValueError("speculative decoding with a FlexiDepth checkpoint is not supported; decode it without "
                         "--self_speculative / --draft_checkpoint_path")
    stop_ids = set() if ignore_eos else set(eos_ids)
    stats = GenerationStats(prompt_tokens=T)
    stats.compile_seconds = warm_up(model, steps, T, start_pos, speculate_k, early_exit, draft_model, skip_threshold)

    synchronize(device)
    t0 = time.perf_counter()
    input_pos = torch.arange(start_pos, start_pos + T, device=device)
    token = sampling.sample(steps.prefill(model, prompt[None], input_pos, skip_threshold))[0]
    if draft_model is not None:
        steps.prefill(draft_model, prompt[None], input_pos)
    synchronize(device)
    stats.prefill_seconds = time.perf_counter() - t0

    out, from_draft = [int(token)], [False]
    stop = bool(callback(out)) if callback else False
    pos = start_pos + T  # position of `token`, which is not in the cache yet
    k = speculate_k
    t0, cpu0 = time.perf_counter(), time.process_time()
    all_guards_checked = False
    with contextlib.ExitStack() as loop:
        while not stop and len(out) < max_new_tokens and out[-1] not in stop_ids:
            if not speculating:
                logits = steps.decode(model, token.view(1, 1), torch.tensor([pos], device=device), skip_threshold,
                                      slots=live_slots(model, steps, pos + 1))
                token = sampling.sample(logits)[0]
                new, drafted = [int(token)], [False]
                pos += 1
            else:
                k_step = min(k, max_new_tokens - len(out))  # never draft past the end
                n, token, drafts = speculate_once(model, draft_model, steps, token, pos, k_step, speculate_k,
                                                  early_exit, sampling, stats)
                new, drafted = drafts[:n] + [int(token)], [True] * n + [False]
                pos += n + 1
                stats.accepted.append(n)
                stats.speculate_k.append(k_step)
                if adaptive_k:
                    k = next_k(k_step, n, speculate_k)
            for t, d in zip(new, drafted):
                if len(out) >= max_new_tokens or out[-1] in stop_ids:
                    break
                out.append(t)
                from_draft.append(d)
            if callback:
                stop = bool(callback(out))
            if not all_guards_checked:  # every step this loop takes has now run once with all of dynamo's guards
                loop.enter_context(checked_once(steps))
                all_guards_checked = True
    synchronize(device)
    stats.decode_seconds = time.perf_counter() - t0
    stats.decode_cpu_seconds = time.process_time() - cpu0
    stats.new_tokens = len(out)
    stats.from_draft = from_draft
    if model.args.routing_layers:
        # generated token j came out of the forward at position start_pos+T-1+j; one read at the end, no sync per token
        ran = model.layers_ran(torch.arange(start_pos + T - 1, start_pos + T - 1 + len(out),
                                            device=device)).cpu()
        stats.layers_used = [row.nonzero().flatten().tolist() for row in ran]
    stats.decode_bytes = decode_bytes(model, stats, early_exit, draft_model)
    return torch.tensor(out, device=device), stats


def next_k(k: int, accepted: int, k_max: int) -> int:
    """--speculate_k auto: grow k after a fully accepted step, shrink it to just past a rejection."""
    return min(k + 1, k_max) if accepted == k else max(1, accepted + 1)


def speculate_once(model, draft_model, steps, token, pos, k, k_max, early_exit, sampling: Sampling, stats):
    """One draft-then-verify step from `token` at position pos: k drafts, verified in k_max + 1 rows.
    stats gets the time of the draft and verify forwards alone (no sampling, no acceptance)."""
    device = token.device
    draft_tokens, draft_probs = [], []
    kept_hidden = torch.zeros(1, k_max + 1, model.args.dim, device=device, dtype=model.norm.weight.dtype)
    x = token
    for i in range(k):
        input_pos = torch.tensor([pos + i], device=device)
        t0 = time.perf_counter()
        if draft_model is None:
            logits, hidden = steps.draft(model, x.view(1, 1), input_pos, early_exit,
                                         slots=live_slots(model, steps, pos + i + 1))
            kept_hidden[:, i] = hidden[:, 0]
        else:
            logits = steps.decode(draft_model, x.view(1, 1), input_pos,
                                  slots=live_slots(draft_model, steps, pos + i + 1))
        synchronize(device)
        stats.draft_seconds += time.perf_counter() - t0
        probs = sampling.probs(logits[0])
        x = sampling.draw(probs)
        draft_tokens.append(x)
        draft_probs.append(probs)
    verify_pos = torch.arange(pos, pos + k_max + 1, device=device)
    verify_slots = live_slots(model, steps, pos + k_max + 1)
    t0 = time.perf_counter()
    if draft_model is None:
        last_index = torch.tensor([k], device=device)
        logits = steps.verify(model, x.view(1, 1), last_index, kept_hidden, verify_pos, early_exit, verify_slots)
    else:
        candidates = torch.stack([token] + draft_tokens + [x] * (k_max - k))  # padded to the fixed shape
        logits = steps.verify_full(model, candidates.view(1, -1), verify_pos, verify_slots)
    synchronize(device)
    stats.verify_seconds += time.perf_counter() - t0
    target_probs = sampling.probs(logits[:k + 1])
    n, next_token = speculative_accept(torch.stack(draft_tokens), torch.stack(draft_probs), target_probs, sampling)
    if draft_model is not None and n == k:
        # the draft model never saw its own last draft; give it that token so its cache has no hole
        steps.decode(draft_model, draft_tokens[-1].view(1, 1), torch.tensor([pos + k], device=device),
                     slots=live_slots(draft_model, steps, pos + k + 1))
    return n, next_token, [int(t) for t in draft_tokens]


# ---------------------------------------------------------------- command line

def self_speculative_defaults(args):
    """--self_speculative without --early_exit / --speculate_k: take them from the checkpoint's
    ModelArgs.self_speculative (config.json, written by scripts/sweep.py --write_best).
    Sets args.chosen, the note for the summary line."""
    args.chosen = ""
    if args.early_exit is not None and args.speculate_k is not None:
        return
    try:
        best = ModelArgs.from_folder(Path(args.checkpoint_path).parent).self_speculative
    except FileNotFoundError:
        return  # load_model reports a missing folder or config.json
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
    p.add_argument("--prompt", type=str, default=None, help="default: 'Hello, my name is'")
    p.add_argument("--chat", action="store_true", help="format the prompt with the checkpoint's chat template; "
                   "without --prompt: an interactive conversation")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat from stdin (/reset, /exit, Ctrl-D)")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="interactive chat: tokens of context the conversation keeps (default 2048, or the model's)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--ignore_eos", action="store_true", help="always generate max_new_tokens (benchmarks)")
    p.add_argument("--top_k", type=int, default=200, help="0 turns top-k off")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--compile", action="store_true", help="compile the decode steps")
    p.add_argument("--compile_regional", action="store_true",
                   help="with --compile on CPU: compile the repeated layer once (a 4-5x shorter first compile, "
                        "decode about 10%% slower)")
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


def check_args(args):
    """Every check on the flags alone, in one place; returns (speculate_k, adaptive_k). Checks that need the model
    (the early-exit range, FlexiDepth flags) are in check_model_args."""
    speculating = args.self_speculative or args.draft_checkpoint_path is not None
    if args.self_speculative:
        self_speculative_defaults(args)
    if args.self_speculative and args.draft_checkpoint_path:
        raise ValueError("choose one of --self_speculative and --draft_checkpoint_path")
    if args.speculate_k is not None and not speculating:
        raise ValueError("--speculate_k does nothing without --self_speculative or --draft_checkpoint_path")
    if args.early_exit is not None and not args.self_speculative:
        raise ValueError("--early_exit does nothing without --self_speculative")
    if args.compile_prefill and not args.compile:
        raise ValueError("--compile_prefill does nothing without --compile")
    if args.compile_regional and not args.compile:
        raise ValueError("--compile_regional does nothing without --compile")
    if args.max_new_tokens < 1:
        raise ValueError("--max_new_tokens must be at least 1")
    if args.num_samples < 1:
        raise ValueError("--num_samples must be at least 1")
    if not args.temperature >= 0:  # also refuses NaN
        raise ValueError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top_k must be 0 (off) or positive, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.skip_threshold is not None and not 0.0 <= args.skip_threshold <= 1.0:
        raise ValueError(f"--skip_threshold must be in [0, 1], got {args.skip_threshold}")
    if args.depth_html and not args.depth_html.resolve().parent.is_dir():
        raise ValueError(f"--depth_html: folder {args.depth_html.resolve().parent} does not exist")
    if args.depth_html:
        try:  # a real write: os.access says yes to root even where a write fails (read-only mounts, /sys)
            tempfile.TemporaryFile(dir=args.depth_html.resolve().parent).close()
        except OSError as e:
            raise ValueError(f"--depth_html: cannot write in {args.depth_html.resolve().parent} ({e.strerror})")
    interactive = args.interactive or (args.chat and args.prompt is None)
    if interactive and (args.prompt is not None or args.num_samples > 1 or args.depth_html or args.ignore_eos):
        raise ValueError("interactive chat takes its turns from the input: drop --prompt, --num_samples, "
                         "--depth_html and --ignore_eos")
    if args.max_seq_length is not None and (not interactive or args.max_seq_length < 2):
        raise ValueError("--max_seq_length is the interactive chat's context: at least 2, and only with --chat "
                         "without --prompt, or --interactive")
    if not speculating:
        return 0, False
    if args.speculate_k == "auto":
        return 8, True
    try:
        speculate_k = int(args.speculate_k or 5)
    except ValueError:
        raise ValueError(f"--speculate_k must be a positive integer or 'auto', got {args.speculate_k!r}")
    if speculate_k < 1:
        raise ValueError(f"--speculate_k must be at least 1, got {speculate_k}")
    return speculate_k, False


def check_model_args(args, model: Transformer, draft_model: Optional[Transformer]):
    L = model.args.n_layers
    if args.self_speculative:
        check_early_exit(args.early_exit, L)
    if draft_model is not None and draft_model.args.vocab_size != model.args.vocab_size:
        raise ValueError(f"draft model vocabulary ({draft_model.args.vocab_size}) differs from the model's "
                         f"({model.args.vocab_size})")
    routed = model.args.routing_layers
    if (args.show_depth or args.depth_html or args.skip_threshold is not None) and not routed:
        raise ValueError("--show_depth, --depth_html and --skip_threshold need a FlexiDepth checkpoint "
                         "(config.json with routing_layers)")
    if routed and (args.self_speculative or draft_model is not None):
        raise ValueError("speculative decoding with a FlexiDepth checkpoint is not supported; drop "
                         "--self_speculative / --draft_checkpoint_path")


def run(args):
    speculate_k, adaptive_k = check_args(args)
    device = resolve_device(args.device)
    world = tp.maybe_init_dist(device)  # > 1 under torchrun: this process holds one shard of every layer
    if tp.rank() != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    if args.seed is not None:
        torch.manual_seed(args.seed)

    precision = PRECISIONS[args.precision] if args.precision else default_precision(device)
    if args.compile and not device.startswith("cuda"):
        cpu_linear.machine_setup()  # a machine's first run: its compile's setup overlaps the load
    t0 = time.perf_counter()
    model = load_model(args.checkpoint_path, device, precision, tensor_parallel=world > 1)
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    draft_model = None
    if args.draft_checkpoint_path:
        draft_model = load_model(args.draft_checkpoint_path, device, precision, tensor_parallel=world > 1)
    check_model_args(args, model, draft_model)
    if world > 1:
        tp.check_all_ranks_ready()  # a rank that failed above is reported here, and every rank stops
        seed = tp.broadcast_seed(seed)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, seed, device)
    print(summary_line(args, model, precision, device, world, time.perf_counter() - t0))
    if args.self_speculative:
        print(f"self-speculation: early exit {args.early_exit}, k={speculate_k if not adaptive_k else 'auto'}"
              f"{args.chosen}")

    routed = model.args.routing_layers
    skip_threshold = 0.5 if args.skip_threshold is None else args.skip_threshold
    if routed:
        print(f"FlexiDepth: routers on {len(routed)} of {model.args.n_layers} layers ({routed[0]}..{routed[-1]}); "
              f"a token runs a routed layer iff its gate > {skip_threshold}")
    interactive = args.interactive or (args.chat and args.prompt is None)
    # a conversation's cache is the whole context: its steps read only the slots up to their position
    steps = compile_steps(device, args.compile_prefill, precision, regional=args.compile_regional,
                          bounded=interactive) if args.compile else Steps()
    spec = dict(steps=steps, early_exit=args.early_exit, speculate_k=speculate_k, draft_model=draft_model,
                skip_threshold=skip_threshold)
    if interactive:
        from chat import chat_loop  # imported here: chat.py imports this module
        context = min(args.max_seq_length or 2048, model.args.max_position_embeddings)
        for m in (model, draft_model):
            if m is not None:
                m.setup_caches(1, context)
        if args.compile:
            print(f"compiled in {warm_up(model, prompt_len=16, **spec):.1f} s", flush=True)
        return chat_loop(model, tokenizer, sampling, spec, args.max_new_tokens, args.show_depth)

    text = args.prompt if args.prompt is not None else "Hello, my name is"
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
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
            m.setup_caches(1, cache_length(need, m.args.max_position_embeddings))
    if args.compile:
        print("compiling (slow only on a first run: later runs load it from the cache)...", flush=True)
        compile_seconds = warm_up(model, prompt_len=len(prompt_ids), **spec)
        slow = compile_seconds > 30 and device == "cpu" and not args.compile_regional
        print(f"compiled in {compile_seconds:.1f} s" + (" (--compile_regional compiles the repeated layer once: 4-5x "
                                                         "faster, decoding about 10% slower)" if slow else ""))

    for i in range(args.num_samples):
        print(f"\n--- sample {i + 1} ---" if args.num_samples > 1 else "")
        printing = [0.0]
        callback = stream_printer(tokenizer, model, len(prompt_ids), args.show_depth, printing)
        tokens, stats = generate(model, prompt, args.max_new_tokens, sampling, adaptive_k=adaptive_k,
                                 eos_ids=tokenizer.eos_ids, ignore_eos=args.ignore_eos, callback=callback, **spec)
        callback.flush()
        stats.decode_seconds -= printing[0]
        print()
    print_stats(stats, model, args, device, skip_threshold)
    if args.depth_html:
        write_depth_html(args.depth_html, token_texts(tokenizer, tokens.tolist()), stats.layers_used,
                         model.args.n_layers, model.args.n_layers - len(routed), args.checkpoint_path.parent.name)
        print(f"depth map: {args.depth_html}")


def main(argv=None):
    args = parse_args(argv)
    if tp.launched_by_torchrun():
        try:
            run(args)
        except (ValueError, FileNotFoundError, OSError) as e:
            tp.exit_with_error(e)  # one line from rank 0, every rank exits non-zero, none waits forever
    else:
        main_guard(lambda: run(args))
    tp.shutdown()


if __name__ == "__main__":
    main()
    # The interpreter's last garbage collection walks every object compiling left behind (dynamo's and inductor's):
    # 1.4 s of a warm `--compile` run's exit on 2 cores. Frozen, they are skipped; the process is ending anyway.
    gc.freeze()
