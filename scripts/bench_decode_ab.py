"""Variants of compiled CPU decode of one checkpoint, timed in alternation in one process.

On a host whose read bandwidth drifts by 2x between runs minutes apart, two variants timed in two runs cannot be
compared; timed round by round in one process they can. A variant is a one-token linear kind, with options:
    gemv | linear | kernel     the kind every one-token linear takes (model.ONE_TOKEN_LINEAR; cpu_linear's probe
                               picks one per machine)
    ...-separate               one kernel call per weight (model.linears not grouping wq/wk/wv and w1/w3)
    ...-frozen                 decode compiled with inductor's freezing (otherwise as compile_steps compiles it:
                               steps.compile_one_token)
    ...-regional               the repeated block compiled once for every layer (steps.compile_one_token)
    ...-wide                   inductor's own CPU kernel groups of up to 500 arguments (compile_steps caps them
                               at 60 and ends them at each layer's end); with a wide variant every variant
                               compiles with inductor's caches off, as its graph cache is keyed without that
                               grouping and would give both variants one code
    ...-bounded                attention reads only the cache slots up to each step's position, not the whole
                               cache (compile_steps(bounded=True): chat and the server, whose cache is the whole
                               context; --cache_slots and --start_pos give such a cache and a later turn)
    ...-smallpages             a second copy of the model, loaded with FLEXFAST_HUGE_PAGES=0 (torch's own pages
                               as before hugepages.py: 4 KiB where the kernel's THP policy is "madvise")
    ...-recompute              inductor's default realize threshold (compile_steps sets 8; at inductor's 50 a GEMV
                               recomputes its normed input for every weight row)
    ...-l1, ...-l2             the CPU kernels' software prefetches into the first- or second-level cache (neither:
                               the level cpu_kernels holds, L1 unless set: this script runs no probe)
    ...-attn2                  attention and wo as two calls (model.ATTENTION_WITH_WO off; on, the kernel kind,
                               int8 and int4 take one kernel call for both)
    ...-mlp3                   the MLP as three calls, gate and up, the activation, down (model.SWIGLU_IN_ONE_CALL
                               off; on, the kernel kind, int8 and int4 take one kernel call for it)
    ...-layer3                 a plain layer as its ops, the projections, attention with wo and the MLP, with
                               inductor's kernels between (model.LAYER_IN_ONE_CALL off; on, the kernel kind, int8
                               and int4 take one kernel call for the whole layer)
Each variant compiles its own copy of the decode step (dynamo keeps compiled graphs per code object, so one shared
function would hold one variant at a time). Then every round decodes the same prompt once per variant and reads
the weights' bytes once with a torch sum (the limit); the best round of each counts.

    python scripts/bench_decode_ab.py --precision bf16 --variants gemv kernel kernel-separate
    python scripts/bench_decode_ab.py --checkpoint_path .../model_int4.g32.pth --variants kernel kernel-separate
    python scripts/bench_decode_ab.py --variants gemv gemv-bounded --cache_slots 2048 --start_pos 1000
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch._inductor.codegen.cpp import CppScheduling

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cpu_kernels  # noqa: E402
import hugepages  # noqa: E402
import model as model_code  # noqa: E402
import steps as steps_code  # noqa: E402
from cli import cpu_model, main_guard  # noqa: E402
from figures import weight_bytes  # noqa: E402
from generate import DEFAULT_CHECKPOINT, PRECISIONS, generate, load_model  # noqa: E402
from steps import Steps, compile_one_token, compile_steps, forward_last, own_code, warm_up  # noqa: E402

KINDS = ("gemv", "linear", "kernel")
OPTIONS = ("separate", "frozen", "regional", "wide", "bounded", "smallpages", "recompute", "mlp3", "l1", "l2",
           "attn2", "layer3")


def parse_variant(text: str) -> tuple:
    kind, *options = text.split("-")
    if kind not in KINDS or any(o not in OPTIONS for o in options):
        raise ValueError(f"unknown variant {text!r}: a kind ({', '.join(KINDS)}) and optional "
                         f"-{' -'.join(OPTIONS)}")
    return kind, set(options)


def one_call_per_weight(x, modules):
    return tuple(m(x) for m in modules)


def set_variant(text: str, dtype: torch.dtype, grouped, machine_prefetch_l2: bool):
    """Installs what the variant's decode graph reads at trace time (and is guarded on at every call)."""
    kind, options = parse_variant(text)
    for in_branch in (False, True):
        model_code.ONE_TOKEN_LINEAR[(str(dtype), in_branch)] = kind
    model_code.linears = one_call_per_weight if "separate" in options else grouped
    model_code.SWIGLU_IN_ONE_CALL = "mlp3" not in options
    model_code.ATTENTION_WITH_WO = "attn2" not in options
    model_code.LAYER_IN_ONE_CALL = "layer3" not in options
    if cpu_kernels.LOADED:
        cpu_kernels.set_prefetch_l2("l2" in options if {"l1", "l2"} & options else machine_prefetch_l2)


def run(args):
    torch.set_num_threads(args.threads)
    for v in args.variants:
        parse_variant(v)
    dtype = PRECISIONS[args.precision]
    model = load_model(args.checkpoint_path, "cpu", dtype)
    small_pages = None
    if any("smallpages" in parse_variant(v)[1] for v in args.variants):
        before = os.environ.get("FLEXFAST_HUGE_PAGES")
        os.environ["FLEXFAST_HUGE_PAGES"] = "0"
        try:
            small_pages = load_model(args.checkpoint_path, "cpu", dtype)
        finally:
            if before is None:
                del os.environ["FLEXFAST_HUGE_PAGES"]
            else:
                os.environ["FLEXFAST_HUGE_PAGES"] = before
    models = {v: small_pages if "smallpages" in parse_variant(v)[1] else model for v in args.variants}
    prompt = torch.arange(20, 20 + args.prompt_tokens)
    need = args.start_pos + args.prompt_tokens + args.max_new_tokens + 1
    if args.cache_slots is not None and args.cache_slots < need:
        raise ValueError(f"--cache_slots {args.cache_slots} is less than the {need} the run needs")
    for m in {id(m): m for m in models.values()}.values():
        m.setup_caches(1, args.cache_slots or need)
    compile_steps("cpu", False)  # inductor's settings (the variants set the kinds: no probe)
    default_threshold = inductor_config._config["realize_cpu_opcount_threshold"].default  # inductor's, not ours
    realize_threshold = inductor_config.realize_cpu_opcount_threshold
    if any(parse_variant(v)[0] == "kernel" for v in args.variants) and not cpu_kernels.load():
        raise ValueError("a kernel variant was asked for, but the CPU kernels do not build here")
    grouped = model_code.linears
    machine_prefetch_l2 = cpu_kernels.PREFETCH_L2
    capped = CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM
    any_wide = any("wide" in parse_variant(v)[1] for v in args.variants)
    steps = {}
    for i, v in enumerate(args.variants):
        kind, options = parse_variant(v)
        frozen_args = dict(fullgraph=True, dynamic=False)  # compile_steps set freezing process-wide
        decode = own_code(forward_last, f"decode_{i}")
        if "frozen" in options:
            decode = torch.compile(decode, **frozen_args)
        else:
            decode = compile_one_token(decode, kind, frozen_args, regional="regional" in options)
        steps[v] = Steps(decode=decode, compiled=True, bounded="bounded" in options)
        set_variant(v, dtype, grouped, machine_prefetch_l2)
        CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM = 500 if "wide" in options else capped
        steps_code.END_GROUPS_AT_LAYERS = "wide" not in options
        threshold = default_threshold if "recompute" in options else realize_threshold
        inductor_config.realize_cpu_opcount_threshold = threshold
        t0 = time.perf_counter()
        try:
            with torch.compiler.config.patch(force_disable_caches=any_wide):
                warm_up(models[v], steps[v], len(prompt), args.start_pos)
        finally:
            CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM = capped
            steps_code.END_GROUPS_AT_LAYERS = True
            inductor_config.realize_cpu_opcount_threshold = realize_threshold
        print(f"{v}: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    nbytes = weight_bytes(model)
    weights_sized = hugepages.empty(nbytes // 4, torch.float32).fill_(1)  # as the weights are (load_model)
    per_round = {v: [] for v in args.variants}
    read_seconds = []
    try:
        for _ in range(args.rounds):
            for v in args.variants:
                set_variant(v, dtype, grouped, machine_prefetch_l2)
                _, stats = generate(models[v], prompt, args.max_new_tokens, steps=steps[v], ignore_eos=True,
                                    start_pos=args.start_pos)
                per_round[v].append(stats.decode_seconds / (stats.new_tokens - 1))
            t0 = time.perf_counter()
            weights_sized.sum()
            read_seconds.append(time.perf_counter() - t0)
    finally:
        model_code.linears = grouped
        model_code.SWIGLU_IN_ONE_CALL = True
        model_code.ATTENTION_WITH_WO = True
        model_code.LAYER_IN_ONE_CALL = True
        if cpu_kernels.LOADED:
            cpu_kernels.set_prefetch_l2(machine_prefetch_l2)
    bandwidth = nbytes / min(read_seconds)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads, {args.precision}, "
          f"{args.checkpoint_path.name}, {nbytes / 1e6:.0f} MB a token, read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(best round; worst {nbytes / max(read_seconds) / 1e9:.1f}), limit {bandwidth / nbytes:.0f} tok/s, "
          f"{args.max_new_tokens} greedy tokens from position {args.start_pos + args.prompt_tokens} of a "
          f"{model.max_seq_length}-slot cache, load average {os.getloadavg()[0]:.1f}\n")
    print("| variant | ms a token (best) | tok/s | % of limit | ms a token per round |")
    print("|---|---|---|---|---|")
    for v in args.variants:
        best = min(per_round[v])
        print(f"| {v} | {best * 1e3:.2f} | {1 / best:.1f} | {100 * nbytes / bandwidth / best:.0f}% | "
              f"{' / '.join(f'{s * 1e3:.2f}' for s in per_round[v])} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", type=Path, default=ROOT / DEFAULT_CHECKPOINT)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                   help="activations (and dense weights); quantized files keep their integer weights")
    p.add_argument("--variants", nargs="+", default=["gemv", "kernel", "kernel-separate"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--prompt_tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache_slots", type=int, help="KV cache length (default: what the run needs)")
    p.add_argument("--start_pos", type=int, default=0, help="where the prompt goes, as a later chat turn's does")
    return p.parse_args(argv)


if __name__ == "__main__":
    main_guard(lambda: run(parse_args()), "bench_decode_ab")
