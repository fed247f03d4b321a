"""A random-weight Llama checkpoint of any shape, for benchmarks and device checks on machines that cannot download
weights. Speed figures measured on it hold for a real model of the same shape; its text and acceptance rates do not.

    python scripts/random_checkpoint.py --like checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --out checkpoints/random/1b \
        --hidden_size 2048 --intermediate_size 8192 --num_hidden_layers 16 --num_attention_heads 32 \
        --num_key_value_heads 8 --dtype bf16

Takes config.json and the tokenizer files of --like, overrides the shape, saves a random LlamaForCausalLM the way
Hugging Face saves it (so transformers can load the same weights as a reference) and converts it with our converter.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import copy_atomic, main_guard  # noqa: E402
from convert_hf_checkpoint import TOKENIZER_FILES, convert  # noqa: E402
from generate import PRECISIONS  # noqa: E402

SHAPE_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size"]


def make_random_checkpoint(like: Path, out: Path, shape: dict, dtype: torch.dtype, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = json.loads((like / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{like}/config.json is model_type {config.get('model_type')!r}, not a plain llama")
    config.update(shape)
    if "hidden_size" in shape or "num_attention_heads" in shape:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (like / name).exists():
            copy_atomic(like / name, out / name)
    return convert(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--like", type=Path, required=True, help="folder whose config.json and tokenizer files to take")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    for field in SHAPE_FIELDS:
        p.add_argument(f"--{field}", type=int, default=None)
    args = p.parse_args()
    shape = {f: getattr(args, f) for f in SHAPE_FIELDS if getattr(args, f) is not None}

    def run():
        if not (args.like / "config.json").exists():
            raise FileNotFoundError(f"{args.like}/config.json not found")
        print(f"wrote {make_random_checkpoint(args.like, args.out, shape, PRECISIONS[args.dtype], args.seed)}")
    main_guard(run, "writing the checkpoint")


if __name__ == "__main__":
    main()
