"""Grid of early_exit x speculate_k for self-speculative decoding on a prompt set; one table, the best pair named.

    python scripts/sweep.py --early_exits 4,8,15,22 --speculate_ks 1,2,4 --prompts humaneval --num_prompts 4
    python scripts/sweep.py --compile --precision bf16 --write_best \
        --checkpoint_path checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct-SelfSpec/model.pth --early_exits 6,8,10

Columns: acceptance of the draft at each position (P(draft i accepted | drafts before it were)), mean accepted drafts
per step, decode tok/s, speedup over plain decoding (AR, the same steps compiled or not, measured in the same
process), ideal speedup (what the acceptance allows if a step cost only its draft and verify forwards, in units of
one AR forward, all timed in this run), achieved/ideal (the rest of the loop: sampling, acceptance, bookkeeping), and
the physical ideal from bytes read (a draft reads the first E layers, the exit head at E if the checkpoint has one
and the draft's LM head, trimmed to its draft vocabulary if it has one; a verify reads the whole model).
The prompts are the first --num_prompts of HumanEval, which scripts/train_exit.py holds out (its --heldout, 16).
--write_best records the fastest pair in the checkpoint's config.json as "self_speculative" {early_exit,
speculate_k}; `generate.py --self_speculative` then uses it when --early_exit / --speculate_k are not given.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as g  # noqa: E402
from cli import cpu_model, main_guard, write_text_atomic  # noqa: E402
from figures import draft_bytes, merge_stats, weight_bytes  # noqa: E402
from sampling import Sampling  # noqa: E402
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
    """Time of one plain decode forward alone, the unit the ideal speedup is counted in: as generate() runs it in
    its loop, where dynamo checks only the guards that tell graphs apart (checked_once; all of them cost ~0.7 ms)."""
    device = model.norm.weight.device
    x, pos = torch.zeros(1, 1, dtype=torch.long, device=device), torch.tensor([0], device=device)
    steps.decode(model, x, pos)
    g.synchronize(device)
    with g.checked_once(steps):
        t0 = time.perf_counter()
        for _ in range(repeats):
            steps.decode(model, x, pos)
        g.synchronize(device)
        return (time.perf_counter() - t0) / repeats


def sweep(args):
    device = g.resolve_device(args.device)
    precision = g.PRECISIONS[args.precision]
    if args.threads:
        torch.set_num_threads(args.threads)
    model = g.load_model(args.checkpoint_path, device, precision)
    without = set(args.without.split(",")) - {""}
    if without - {"exit_heads", "draft_vocab"}:
        raise ValueError(f"--without takes exit_heads and/or draft_vocab, got {args.without!r}")
    if without and args.write_best:
        raise ValueError("--write_best records the checkpoint's own best pair: drop --without")
    if "exit_heads" in without:  # draft through the plain final norm + head, to measure what the heads add
        model.exit_heads = torch.nn.ModuleDict()
    if "draft_vocab" in without:  # draft over the whole vocabulary
        model.args.draft_vocab_size = 0
    L = model.args.n_layers
    try:
        early_exits = [int(e) for e in args.early_exits.split(",")]
        ks = [int(k) for k in args.speculate_ks.split(",")]
    except ValueError:
        raise ValueError(f"--early_exits and --speculate_ks take comma lists of integers "
                         f"(got {args.early_exits!r} / {args.speculate_ks!r})")
    for e in early_exits:
        g.check_early_exit(e, L)
    if min(ks) < 1:
        raise ValueError(f"--speculate_ks must be >= 1, got {args.speculate_ks}")
    try:
        temperatures = [float(t) for t in args.temperatures.split(",")]
    except ValueError:
        raise ValueError(f"--temperatures takes a comma list of numbers, got {args.temperatures!r}")
    if min(temperatures) < 0:
        raise ValueError(f"--temperatures must be >= 0 (0: greedy), got {args.temperatures}")
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    prompts = [torch.tensor(tokenizer.encode(p), device=device) for p in load_prompts(args.prompts, args.num_prompts)]
    # one cache for every prompt and configuration: the compiled fixed-shape steps recompile for a new cache size
    model.setup_caches(1, g.cache_length_needed(max(len(p) for p in prompts), args.max_new_tokens, max(ks)))
    steps = g.compile_steps(device, False, precision) if args.compile else g.Steps()
    full_bytes = weight_bytes(model)

    configs = [(e, k) for e in early_exits for k in ks]
    progress = tqdm(total=(len(configs) + 1) * len(temperatures), desc="sweep", file=sys.stderr)
    best = None
    for temperature in temperatures:
        def decode_all(max_new_tokens, subset=None, **spec):
            # one seed per configuration: every configuration draws the same random numbers from the start
            sampling = Sampling(temperature, None, None, args.seed, device)
            return run_prompts(model, prompts[:subset], max_new_tokens, steps, sampling=sampling, **spec)

        t0 = time.perf_counter()
        decode_all(8, 1)  # warm-up (and compile) outside the timings
        compile_seconds = time.perf_counter() - t0
        ar_tps, _ = decode_all(args.max_new_tokens)
        ar_forward = decode_forward_seconds(model, steps)
        progress.update()
        rows = []
        for e, k in configs:
            spec = dict(early_exit=e, speculate_k=k)
            t0 = time.perf_counter()
            decode_all(8, 1, **spec)
            compile_seconds += time.perf_counter() - t0
            tps, all_stats = decode_all(args.max_new_tokens, **spec)
            s = merge_stats(all_stats)
            ideal = s.forward_bound_tokens_per_second * ar_forward  # (E[n]+1) AR forward / (k draft + verify)
            ideal_bytes = (s.mean_accepted + 1) / (k * draft_bytes(model, e) / full_bytes + 1)
            by_position = " ".join(f"{p:.2f}" for p in s.acceptance_by_position())
            rows.append((e, k, by_position, s.mean_accepted, tps, tps / ar_tps, ideal, tps / ar_tps / ideal,
                         ideal_bytes, s.draft_step_seconds, s.verify_step_seconds))
            progress.update()
        mode = "greedy" if temperature == 0 else f"temperature {temperature}"
        extras = [f"exit heads at {[int(e) for e in model.exit_heads]}" if len(model.exit_heads) else "no exit heads",
                  f"draft vocabulary {model.args.draft_vocab_size}" if model.draft_output_weight is not None
                  else "full draft vocabulary"]  # after setup_caches, which cuts the draft head
        tqdm.write(f"\n{args.checkpoint_path.parent.name} ({', '.join(extras)}), {args.precision}, {device} "
                   f"({cpu_model()}), {torch.get_num_threads()} threads, {'compiled' if args.compile else 'eager'}, "
                   f"{len(prompts)} {args.prompts} prompts x {args.max_new_tokens} new tokens, {mode}; AR "
                   f"{ar_tps:.2f} tok/s, AR forward alone {ar_forward * 1000:.2f} ms; warm-up and compile "
                   f"{compile_seconds:.0f} s (not in any tok/s)\n", file=sys.stdout)
        print("| E | k | acceptance by position | mean accepted | tok/s | speedup vs AR | draft / verify step (ms) "
              "| ideal (measured forward costs) | achieved/ideal | ideal (bytes read) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for e, k, by_position, acc, tps, speedup, ideal, ratio, ideal_bytes, draft_s, verify_s in rows:
            print(f"| {e} | {k} | {by_position} | {acc:.3f} | {tps:.2f} | {speedup:.2f}x | {draft_s * 1000:.1f} / "
                  f"{verify_s * 1000:.1f} | {ideal:.2f}x | {ratio:.2f} | {ideal_bytes:.2f}x |")
        fastest = max(rows, key=lambda r: r[4])
        verdict = "wins" if fastest[5] > 1 else "loses"
        print(f"\nbest pair ({mode}): E={fastest[0]} k={fastest[1]}: {fastest[4]:.2f} tok/s, {fastest[5]:.2f}x AR "
              f"(self-speculation {verdict} here)", flush=True)
        best = best or (fastest, mode)  # the first temperature's best is the one recorded
    progress.close()
    best, mode = best
    if args.write_best:
        config_path = args.checkpoint_path.parent / "config.json"
        config = json.loads(config_path.read_text())
        config["self_speculative"] = dict(early_exit=best[0], speculate_k=best[1],
                                          measured=f"{best[5]:.2f}x AR, {args.precision}, "
                                                   f"{'compiled' if args.compile else 'eager'}, {mode}")
        write_text_atomic(config_path, json.dumps(config, indent=2) + "\n")
        print(f"wrote the best pair to {config_path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", type=Path, default=g.DEFAULT_CHECKPOINT)
    p.add_argument("--early_exits", default="4,8,15,22")
    p.add_argument("--speculate_ks", default="1,2,4")
    p.add_argument("--prompts", default="humaneval", help="humaneval, pydoc or a file with one prompt per line")
    p.add_argument("--num_prompts", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--precision", choices=list(g.PRECISIONS), default="fp32")
    p.add_argument("--temperatures", default="0", help="one table each, e.g. 0,0.7 (0: greedy); the first one's "
                                                          "best pair is the one --write_best records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--without", default="", help="exit_heads and/or draft_vocab: leave them out of the draft")
    p.add_argument("--write_best", action="store_true",
                   help="record the fastest pair in the checkpoint's config.json (self_speculative)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    main_guard(lambda: sweep(args), "sweep")


if __name__ == "__main__":
    main()
