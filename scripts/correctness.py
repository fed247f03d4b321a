"""AR vs speculative greedy decoding on a prompt set, token for token (fp32). Exits non-zero at the first mismatch.

    python scripts/correctness.py --early_exit 8 --speculate_k 4 --prompts humaneval --num_prompts 10
    python scripts/correctness.py --draft_checkpoint_path checkpoints/.../model_int8.pth --speculate_k 3
"""
import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as g  # noqa: E402
from cli import main_guard  # noqa: E402
from prompts import load_prompts  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def compare(args) -> int:
    device = g.resolve_device(args.device)
    model = g.load_model(args.checkpoint_path, device, torch.float32)
    draft = g.load_model(args.draft_checkpoint_path, device, torch.float32) if args.draft_checkpoint_path else None
    if draft is None:
        g.check_early_exit(args.early_exit, model.args.n_layers)
    if args.speculate_k < 1:
        raise ValueError("--speculate_k must be at least 1")
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    steps = g.compile_steps(device, False) if args.compile else g.Steps()
    prompts = load_prompts(args.prompts, args.num_prompts)
    total = 0
    for i, text in enumerate(tqdm(prompts, desc="prompts", file=sys.stderr)):
        prompt = torch.tensor(tokenizer.encode(text), device=device)
        need = g.cache_length_needed(len(prompt), args.max_new_tokens, args.speculate_k)
        for m in (model, draft):
            if m is not None:
                m.setup_caches(1, need)
        ar, _ = g.generate(model, prompt, args.max_new_tokens, steps=steps)
        spec, stats = g.generate(model, prompt, args.max_new_tokens, steps=steps, early_exit=args.early_exit,
                                 speculate_k=args.speculate_k, draft_model=draft)
        ar, spec = ar.tolist(), spec.tolist()
        if ar != spec:
            pos = next((j for j, (a, b) in enumerate(zip(ar, spec)) if a != b), min(len(ar), len(spec)))
            print(f"MISMATCH prompt {i} at generated token {pos}: AR {ar[pos:pos + 5]} vs speculative "
                  f"{spec[pos:pos + 5]}")
            return 1
        total += len(ar)
    print(f"OK: {len(prompts)} prompts, {total} tokens identical (AR vs "
          f"{'draft model' if draft else f'self-speculative E={args.early_exit}'} k={args.speculate_k})")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", type=Path, default=g.DEFAULT_CHECKPOINT)
    p.add_argument("--draft_checkpoint_path", type=Path, default=None)
    p.add_argument("--early_exit", type=int, default=None)
    p.add_argument("--speculate_k", type=int, default=4)
    p.add_argument("--prompts", default="humaneval", help="humaneval, pydoc or a file with one prompt per line")
    p.add_argument("--num_prompts", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    sys.exit(main_guard(lambda: compare(args), "comparison"))


if __name__ == "__main__":
    main()
