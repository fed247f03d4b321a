"""Decode speed of trained FlexiDepth checkpoints against the full model they were trained on.

One process, the models timed in turn within each round (best of --rounds), greedy decoding of the same real
prompts (HumanEval), each routed model at its own gates (threshold 0.5). Beside each: the mean layers its tokens
used and the ideal that bytes per token predict (full model's rate x bytes(full) / bytes(routed at the skipped
fraction measured)). CPU time is the steadier figure on a shared machine with --threads 1.

    python scripts/bench_trained_routers.py --compile --precision bf16 --threads 1 \\
        --routed checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct-FlexiDepth/model.pth
"""
import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_flexidepth import bytes_per_token, decode_rate  # noqa: E402
from generate import Steps, compile_steps, load_model  # noqa: E402
from model import FlexiDepthBlock  # noqa: E402
from prompts import humaneval_prompts  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

DEFAULT_BASE = ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth"


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the full model's model.pth")
    p.add_argument("--routed", type=Path, nargs="+", required=True, help="FlexiDepth model.pth files trained on it")
    p.add_argument("--prompts", type=int, default=3, help="how many HumanEval prompts")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if min(args.prompts, args.max_new_tokens, args.rounds, args.threads or 1) < 1:
        sys.exit("error: --prompts, --max_new_tokens, --rounds and --threads must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    try:
        models = {path: load_model(path, "cpu", precision) for path in [args.base, *args.routed]}
        tokenizer = load_tokenizer(args.base.parent)
        prompts = [torch.tensor(tokenizer.encode(text)) for text in humaneval_prompts(args.prompts)]
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    is_routed = lambda model: any(isinstance(layer, FlexiDepthBlock) for layer in model.layers)
    if is_routed(models[args.base]):
        sys.exit(f"error: --base {args.base} has routed layers; give the full model the routers were trained on")
    shape = lambda model: (model.args.vocab_size, model.args.dim, model.args.n_layers)
    for path in args.routed:
        if not is_routed(models[path]):
            sys.exit(f"error: {path} has no routed layers")
        if shape(models[path]) != shape(models[args.base]):
            sys.exit(f"error: {path} (vocab, dim, layers {shape(models[path])}) was not trained on --base "
                     f"{shape(models[args.base])}")
    longest = max(len(prompt) for prompt in prompts) + args.max_new_tokens + 1
    for model in models.values():
        model.setup_caches(1, longest)
    steps = compile_steps("cpu", False, precision) if args.compile else Steps()

    best = {path: (0.0, 0.0) for path in models}  # wall, cpu tok/s: best of the rounds
    layers = {}  # path -> [decoded tokens, n_layers] bool, all prompts (the same every round: greedy)
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for path, model in models.items():
            decode_rate(model, steps, prompts[0], 4)  # warm-up; compiles on the first round
            wall = cpu = 0.0
            ran = []
            for prompt in prompts:
                w, c = decode_rate(model, steps, prompt, args.max_new_tokens)
                wall, cpu = wall + args.max_new_tokens / w, cpu + args.max_new_tokens / c
                ran.append(model.layers_ran(torch.arange(len(prompt), len(prompt) + args.max_new_tokens)))
            n = args.max_new_tokens * len(prompts)
            best[path] = (max(best[path][0], n / wall), max(best[path][1], n / cpu))
            layers[path] = torch.cat(ran)

    base_wall, base_cpu = best[args.base]
    base_bytes = bytes_per_token(models[args.base], 0.0)
    print(f"{args.precision}, {'compiled' if args.compile else 'eager'}, {torch.get_num_threads()} threads, "
          f"{len(prompts)} HumanEval prompts x {args.max_new_tokens} tokens, best of {args.rounds} rounds")
    print(f"{'model':<40} {'layers':>6} {'MB/tok':>7} | {'wall tok/s':>10} {'x full':>6} | {'cpu tok/s':>9} "
          f"{'x full':>6} | {'ideal x':>7}")
    for path, model in models.items():
        routed = [i for i, layer in enumerate(model.layers) if isinstance(layer, FlexiDepthBlock)]
        skipped = 1 - layers[path][:, routed].float().mean().item() if routed else 0.0
        mb = bytes_per_token(model, skipped)
        wall, cpu = best[path]
        print(f"{path.parent.name[:40]:<40} {layers[path].sum(1).float().mean().item():>6.2f} {mb / 1e6:>7.2f} | "
              f"{wall:>10.2f} {wall / base_wall:>6.3f} | {cpu:>9.2f} {cpu / base_cpu:>6.3f} | "
              f"{base_bytes / mb:>7.3f}")


if __name__ == "__main__":
    main()
