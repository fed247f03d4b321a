"""FlexiDepth decode speed against the full model without routers, both timed in one process.

Two kinds of rows, each beside the full model (--base, no routers) decoded in the same rounds:
- --routed: trained FlexiDepth checkpoints (scripts/train_router.py) at their own gates (threshold 0.5);
- without --routed: --base's weights with random routers and adapters on --routing_layers (written to --out with
  convert_hf_checkpoint.with_random_routers, then converted), the fraction of routed layers skipped forced through
  the threshold: 0% (threshold 0) and 100% (threshold 1) exactly, 25/50/75% by quantiles of the gates seen on the
  first prompt; --masking_row adds the masking form (both branches for every token) at the 50% threshold.
Greedy decoding of the same HumanEval prompts, the rows timed in turn within each round, best of --rounds. "ideal x"
is bytes(full model) / bytes(the row, as it ran) per decoded token: the speed-up decode would reach if time went only
into reading weights. CPU time is the steadier figure on a shared machine with --threads 1.

    python scripts/bench_flexidepth.py --compile --threads 1 --masking_row
    python scripts/bench_flexidepth.py --compile --precision bf16 --threads 1 \\
        --routed checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct-FlexiDepth/model.pth
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cli import main_guard, parse_layers  # noqa: E402
from convert_hf_checkpoint import convert, with_random_routers  # noqa: E402
from cli import cpu_model  # noqa: E402
from figures import merge_stats, weight_bytes  # noqa: E402
from generate import PRECISIONS, Steps, compile_steps, generate, load_model  # noqa: E402
from model import FlexiDepthBlock  # noqa: E402
from prompts import humaneval_prompts  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

DEFAULT_BASE = ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth"


@torch.no_grad()
def router_gates(model, prompt: torch.Tensor) -> torch.Tensor:
    """The gate values of every routed layer on the prompt (eager masking forward)."""
    gates = []
    hooks = [layer.router.register_forward_hook(lambda m, i, o: gates.append(torch.sigmoid(o).flatten()))
             for layer in model.layers if isinstance(layer, FlexiDepthBlock)]
    model(prompt[None], torch.arange(len(prompt), device=prompt.device))
    for h in hooks:
        h.remove()
    return torch.cat(gates)


def masking_steps(compile: bool) -> Steps:
    """Decode in the masking form (both branches for every token): what skipping only on paper costs."""
    masked = lambda m, x, pos, threshold, slots=None: m(x, pos, threshold, masking=True, slots=slots)[:, -1]
    # the whole cache, as the real-skip rows' compile_steps reads it (bounded, the slot count would be a new shape
    # to this plain torch.compile at every token)
    return Steps(prefill=masked, decode=torch.compile(masked, fullgraph=True) if compile else masked, bounded=False)


def random_router_rows(args, base, prompt, steps, precision) -> list:
    routing_layers = parse_layers(args.routing_layers, base.args.n_layers)
    out = args.out
    if not (out / "model.pth").exists() or \
            json.loads((out / "config.json").read_text()).get("routing_layers") != routing_layers:
        print(f"writing {out} (random routers on layers {args.routing_layers})")
        convert(with_random_routers(args.base.parent, out, routing_layers))
    model = load_model(out / "model.pth", args.device, precision)
    model.setup_caches(1, base.max_seq_length)
    gates = router_gates(model, prompt).float()
    # gate > threshold runs the layer; threshold 0 runs all, 1 skips all, quantiles split the rest
    targets = [0.0, 0.25, 0.5, 0.75, 1.0]
    thresholds = [0.0] + [float(torch.quantile(gates, f)) for f in targets[1:-1]] + [1.0]
    rows = [(f"{target:.0%}", model, steps, threshold) for target, threshold in zip(targets, thresholds)]
    if args.masking_row:
        rows.append(("masking-50%", model, masking_steps(args.compile), thresholds[2]))
    return rows


def trained_rows(args, base, steps, precision) -> list:
    shape = lambda model: (model.args.vocab_size, model.args.dim, model.args.n_layers)
    rows = []
    for path in args.routed:
        model = load_model(path, args.device, precision)
        if not model.args.routing_layers:
            raise ValueError(f"{path} has no routed layers")
        if shape(model) != shape(base):
            raise ValueError(f"{path} (vocab, dim, layers {shape(model)}) was not trained on --base {shape(base)}")
        model.setup_caches(1, base.max_seq_length)
        rows.append((path.parent.name[:40], model, steps, 0.5))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=DEFAULT_BASE,
                   help="the full model's model.pth (its folder's weights also make the random-router model)")
    p.add_argument("--routed", type=Path, nargs="+", default=None, help="FlexiDepth model.pth files trained on it")
    p.add_argument("--out", type=Path, default=ROOT / "checkpoints/bench/SmolLM2-135M-FlexiDepth-random",
                   help="where the random-router model goes (without --routed)")
    p.add_argument("--routing_layers", type=str, default="15-29", help="random routers on these, e.g. 15-29 or 3,5,7-9")
    p.add_argument("--masking_row", action="store_true", help="also time the masking form at 50%% (another compile)")
    p.add_argument("--prompts", type=int, default=2, help="how many HumanEval prompts")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="each figure is the best of them")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


@torch.no_grad()
def run(args):
    if min(args.prompts, args.max_new_tokens - 1, args.rounds, args.threads or 1) < 1:
        raise ValueError("--prompts, --rounds and --threads must be at least 1, --max_new_tokens at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = PRECISIONS[args.precision]
    base = load_model(args.base, args.device, precision)
    if base.args.routing_layers:
        raise ValueError(f"--base {args.base} has routed layers; give the full model the routers were trained on")
    tokenizer = load_tokenizer(args.base.parent)
    prompts = [torch.tensor(tokenizer.encode(text), device=args.device)
               for text in humaneval_prompts(args.prompts)]
    base.setup_caches(1, max(len(prompt) for prompt in prompts) + args.max_new_tokens)
    steps = compile_steps(args.device, False, precision) if args.compile else Steps()
    rows = [(args.base.parent.name[:40], base, steps, 0.5)]
    if args.routed:
        rows += trained_rows(args, base, steps, precision)
    else:
        rows += random_router_rows(args, base, prompts[0], steps, precision)

    best = {}  # row name -> (wall tok/s, cpu tok/s, merged stats): best of the rounds, rows in turn in each round
    for _ in tqdm(range(args.rounds), desc="rounds", leave=False):
        for name, model, row_steps, threshold in rows:
            spec = dict(steps=row_steps, ignore_eos=True, skip_threshold=threshold)
            generate(model, prompts[0], 4, **spec)  # warm-up; compiles on the first round
            stats = merge_stats([generate(model, prompt, args.max_new_tokens, **spec)[1] for prompt in prompts])
            wall, cpu, _ = best.get(name, (0.0, 0.0, None))
            best[name] = (max(wall, stats.tokens_per_second), max(cpu, stats.cpu_tokens_per_second), stats)

    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {args.device}, {args.precision}, "
          f"{'compiled' if args.compile else 'eager'}, {len(prompts)} HumanEval prompts x {args.max_new_tokens} "
          f"tokens, greedy, best of {args.rounds} rounds")
    print(f"{'model':<40} {'layers':>6} {'MB/tok':>7} {'skipped':>7} | {'wall tok/s':>10} {'x full':>6} | "
          f"{'cpu tok/s':>9} {'x full':>6} | {'ideal x':>7}")
    base_wall, base_cpu, base_stats = best[rows[0][0]]
    per_token = lambda stats: stats.decode_bytes / (stats.new_tokens - 1)
    for name, model, _, _ in rows:
        wall, cpu, stats = best[name]
        used = stats.layers_used[1:] or [range(model.args.n_layers)]  # decode steps; a plain model records none
        routed = set(model.args.routing_layers)
        skipped = 1 - sum(len(set(u) & routed) for u in used) / (len(used) * len(routed)) if routed else 0.0
        # the masking form reads every weight, both branches, whatever the gates decide
        bytes_read = weight_bytes(model) if name.startswith("masking") else per_token(stats)
        print(f"{name:<40} {sum(len(u) for u in used) / len(used):>6.2f} {bytes_read / 1e6:>7.1f} {skipped:>7.1%} | "
              f"{wall:>10.2f} {wall / base_wall:>6.3f} | {cpu:>9.2f} {cpu / base_cpu:>6.3f} | "
              f"{per_token(base_stats) / bytes_read:>7.3f}")


def main(argv=None):
    args = parse_args(argv)
    main_guard(lambda: run(args), "benchmark")


if __name__ == "__main__":
    main()
