"""Grid of early_exit x speculate_k for self-speculative decoding on a prompt set; one table, the best pair named.

    python scripts/sweep.py --early_exits 4,8,15,22 --speculate_ks 1,2,4 --prompts humaneval --num_prompts 4

Columns: decode tok/s, mean accepted drafts per step, speedup over plain decoding (AR) measured in the same run,
ideal speedup (what the acceptance allows if a step cost only its draft and verify forwards, in units of one AR
forward, all timed in this run), achieved/ideal (the rest of the loop: sampling, acceptance, bookkeeping), and the
physical ideal from bytes read (a draft reads the first E layers + head, a verify reads the whole model).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as g  # noqa: E402
from figures import weight_bytes  # noqa: E402
from prompts import load_prompts  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def run_prompts(model, prompts, max_new_tokens, steps, **spec):
    """Decode every prompt; returns (tok/s over all prompts, list of stats)."""
    all_stats = []
    for prompt in prompts:
        model.setup_caches(1, g.cache_length_needed(len(prompt), max_new_tokens, spec.get("speculate_k", 0)))
        _, stats = g.generate(model, prompt, max_new_tokens, steps=steps, **spec)
        all_stats.append(stats)
    tokens = sum(s.new_tokens - 1 for s in all_stats)
    return tokens / sum(s.decode_seconds for s in all_stats), all_stats


def decode_forward_seconds(model, steps, repeats=16) -> float:
    """Time of one plain decode forward alone, the unit the ideal speedup is counted in."""
    device = model.norm.weight.device
    x, pos = torch.zeros(1, 1, dtype=torch.long, device=device), torch.tensor([0], device=device)
    steps.decode(model, x, pos)
    g.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        steps.decode(model, x, pos)
    g.synchronize(device)
    return (time.perf_counter() - t0) / repeats


def merged(all_stats):
    total = g.GenerationStats()
    for s in all_stats:
        total.accepted += s.accepted
        total.speculate_k += s.speculate_k
        total.draft_seconds += s.draft_seconds
        total.verify_seconds += s.verify_seconds
    return total


def sweep(args):
    device = g.resolve_device(args.device)
    precision = g.PRECISIONS[args.precision]
    model = g.load_model(args.checkpoint_path, device, precision)
    L = model.args.n_layers
    early_exits = [int(e) for e in args.early_exits.split(",")]
    ks = [int(k) for k in args.speculate_ks.split(",")]
    bad = [e for e in early_exits if not 1 <= e < L]
    if bad or min(ks) < 1:
        raise ValueError(f"early exits must be in 1..{L - 1} and k >= 1 (got {args.early_exits} / {args.speculate_ks})")
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    prompts = [torch.tensor(tokenizer.encode(p), device=device) for p in load_prompts(args.prompts, args.num_prompts)]
    steps = g.compile_steps(device, False) if args.compile else g.Steps()
    full_bytes = weight_bytes(model)

    configs = [(e, k) for e in early_exits for k in ks]
    progress = tqdm(total=len(configs) + 1, desc="sweep", file=sys.stderr)
    run_prompts(model, prompts[:1], 8, steps)  # warm-up (and compile) outside the timings
    ar_tps, _ = run_prompts(model, prompts, args.max_new_tokens, steps)
    ar_forward = decode_forward_seconds(model, steps)
    progress.update()
    rows = []
    for e, k in configs:
        spec = dict(early_exit=e, speculate_k=k)
        run_prompts(model, prompts[:1], 8, steps, **spec)
        tps, all_stats = run_prompts(model, prompts, args.max_new_tokens, steps, **spec)
        s = merged(all_stats)
        ideal = s.forward_bound_tokens_per_second * ar_forward  # (E[n]+1) x AR forward / (k x draft + verify forward)
        byte_ratio = weight_bytes(model, n_layers=e) / full_bytes
        ideal_bytes = (s.mean_accepted + 1) / (k * byte_ratio + 1)
        rows.append((e, k, tps, s.mean_accepted, tps / ar_tps, ideal, tps / ar_tps / ideal, ideal_bytes))
        progress.update()
    progress.close()

    print(f"\n{args.checkpoint_path.parent.name}, {args.precision}, {device}, {torch.get_num_threads()} threads, "
          f"{'compiled' if args.compile else 'eager'}, {len(prompts)} {args.prompts} prompts x "
          f"{args.max_new_tokens} new tokens, greedy; AR {ar_tps:.2f} tok/s, AR forward alone "
          f"{ar_forward * 1000:.2f} ms\n")
    print("| E | k | tok/s | mean accepted | speedup vs AR | ideal (measured forward costs) | achieved/ideal "
          "| ideal (bytes read) |")
    print("|---|---|---|---|---|---|---|---|")
    for e, k, tps, acc, speedup, ideal, ratio, ideal_bytes in rows:
        print(f"| {e} | {k} | {tps:.2f} | {acc:.3f} | {speedup:.2f}x | {ideal:.2f}x | {ratio:.2f} | {ideal_bytes:.2f}x |")
    best = max(rows, key=lambda r: r[2])
    verdict = "wins" if best[4] > 1 else "loses"
    print(f"\nbest pair: E={best[0]} k={best[1]}: {best[2]:.2f} tok/s, {best[4]:.2f}x AR (self-speculation {verdict} "
          f"here)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", type=Path, default=g.DEFAULT_CHECKPOINT)
    p.add_argument("--early_exits", default="4,8,15,22")
    p.add_argument("--speculate_ks", default="1,2,4")
    p.add_argument("--prompts", default="humaneval", help="humaneval, pydoc or a file with one prompt per line")
    p.add_argument("--num_prompts", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--precision", choices=list(g.PRECISIONS), default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    try:
        sweep(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
