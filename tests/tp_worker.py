"""What tests/test_tp.py runs on each rank (under torchrun or its own launcher), and in-process for the TP=1
reference: prefill logits, greedy, self-speculative and seeded sampled generations of a fixed prompt, for each of
several checkpoints in one launch (process start-up is most of the cost). Rank 0 writes one file per checkpoint.

    python tests/tp_worker.py OUT_DIR CHECKPOINT... [--compile]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import generate as gen  # noqa: E402
import tp  # noqa: E402

MAX_NEW_TOKENS, EARLY_EXIT, SPECULATE_K = 16, 2, 3


def fixed_prompt(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (12,), generator=torch.Generator().manual_seed(1))


def run_model(model, compile: bool = False, sampled: bool = True) -> dict:
    """Everything the tests compare, for one (possibly sharded) model."""
    prompt = fixed_prompt(model.args.vocab_size)
    model.setup_caches(1, gen.cache_length_needed(len(prompt), MAX_NEW_TOKENS, SPECULATE_K))
    out = {}
    with torch.no_grad():
        out["prefill_logits"] = model(prompt[None], torch.arange(len(prompt)))[0].clone()
    out["greedy"], _ = gen.generate(model, prompt, MAX_NEW_TOKENS)
    if model.args.routing_layers:  # FlexiDepth: the layers every position ran (the last token was never fed)
        out["layers_ran"] = model.layers_ran(torch.arange(len(prompt) + MAX_NEW_TOKENS - 1)).clone()
    # generate.py refuses speculation on FlexiDepth checkpoints
    speculation = {} if model.args.routing_layers else dict(early_exit=EARLY_EXIT, speculate_k=SPECULATE_K)
    if speculation:
        out["self_speculative"], stats = gen.generate(model, prompt, MAX_NEW_TOKENS, **speculation)
        out["accepted"] = stats.accepted
    if sampled:
        out["sampled"], _ = gen.generate(model, prompt, MAX_NEW_TOKENS, gen.Sampling(0.8, top_k=50, seed=7),
                                         **speculation)
    if compile:
        steps = gen.compile_steps("cpu", compile_prefill=False)
        out["compiled_greedy"], _ = gen.generate(model, prompt, MAX_NEW_TOKENS, steps=steps)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir", type=Path)
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--compile", action="store_true", help="also compiled decoding, for the first checkpoint")
    p.add_argument("--no_sampling", action="store_true")
    args = p.parse_args()
    try:
        world = tp.maybe_init_dist("cpu")
        models = [gen.load_model(c, "cpu", torch.float32, tensor_parallel=world > 1) for c in args.checkpoints]
        tp.check_all_ranks_ready()
    except (ValueError, FileNotFoundError) as e:
        tp.exit_with_error(e)
    for i, model in enumerate(models):
        out = run_model(model, compile=args.compile and i == 0, sampled=not args.no_sampling)
        per_rank = [None] * world
        torch.distributed.all_gather_object(per_rank, {k: v for k, v in out.items() if k != "prefill_logits"})
        if tp.rank() == 0:
            out["per_rank"] = per_rank
            torch.save(out, args.out_dir / f"{i}.pt")
    tp.shutdown()


if __name__ == "__main__":
    main()
