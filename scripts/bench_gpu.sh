#!/bin/bash
# The CUDA checks and figures, in one run sized for a short GPU lease: correctness first, then speed.
# No weights can be downloaded there, so it builds random-weight checkpoints (scripts/random_checkpoint.py) of the
# SmolLM2-135M shape and of the Llama-3.2-1B shape (with SmolLM2's 49152-token vocabulary, so its tokenizer serves):
# the speed of a shape does not depend on the weights' values; acceptance rates and text do.
#   OUT=/tmp/gpu ./scripts/bench_gpu.sh          (needs the tokenizer files of the offline default in checkpoints/)
# Each step runs under a timeout and the run goes on past a failure; full output goes to $OUT/log.txt and the
# figures to the summary printed last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_gpu}
WORK=${WORK:-/tmp/bench_gpu_work}
LIKE=${LIKE:-checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu with a small BIG_SHAPE is a dry run of this script
BIG_SHAPE=${BIG_SHAPE:---hidden_size 2048 --intermediate_size 8192 --num_hidden_layers 16 --num_attention_heads 32 --num_key_value_heads 8}
SMALL_SHAPE=${SMALL_SHAPE:-}
EARLY_EXIT=${EARLY_EXIT:-8}
ONLY=${ONLY:-}  # a space-separated subset of the step names, to rerun part of it
DEADLINE=${DEADLINE:-540}  # seconds from the start; steps are cut to end by then
ROUTING=${ROUTING:-15-29}
export DEVICE ROUTING
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.txt
: >"$LOG"; : >"$SUMMARY"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# step NAME TIMEOUT CMD...: runs CMD, appends its output to the log, records rc and seconds
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ $SECONDS -ge "$DEADLINE" ]; then echo "--- $name not run: past the deadline" | tee -a "$SUMMARY"; return; fi
  [ $((SECONDS + limit)) -le "$DEADLINE" ] || limit=$((DEADLINE - SECONDS))
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" >"$WORK/$name.out" 2>&1
  local rc=$?
  cat "$WORK/$name.out" >>"$LOG"
  echo "--- $name rc=$rc $((SECONDS - t0))s" | tee -a "$LOG"
  tr '\r' '\n' <"$WORK/$name.out" | grep -E "^(OK|MISMATCH|decode:|bandwidth achieved|peak memory|layers used|mean accepted|draft step|RESULT|error)" \
    | sed "s/^/$name | /" | tee -a "$SUMMARY"
  [ $rc -eq 0 ] || { tail -n 5 "$WORK/$name.out" | sed "s/^/$name ! /" | tee -a "$SUMMARY"; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$SUMMARY"
$PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$SUMMARY"

step copy_bandwidth 60 $PYTHON - <<'EOF'
import torch
x = torch.randn(1 << 28, device="cuda")  # 1 GiB
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    y.copy_(x)
end.record()
torch.cuda.synchronize()
seconds = start.elapsed_time(end) / 1000 / 20
print(f"RESULT device-to-device copy: {2 * x.numel() * 4 / seconds / 1e9:.0f} GB/s (read + write)")
EOF

SMALL=$WORK/smollm2-random
BIG=$WORK/llama1b-random
step make_small 120 $PYTHON scripts/random_checkpoint.py --like "$LIKE" --out "$SMALL" --dtype fp32 $SMALL_SHAPE
step make_big 240 $PYTHON scripts/random_checkpoint.py --like "$LIKE" --out "$BIG" --dtype bf16 $BIG_SHAPE

# Logits against transformers on the same weights, on the GPU, fp32: prefill then cached decode steps.
step logits_vs_hf 120 $PYTHON - "$SMALL" <<'EOF'
import os, sys, torch
sys.path.insert(0, ".")
from transformers import AutoModelForCausalLM
from generate import load_model
folder, dev = sys.argv[1], os.environ["DEVICE"]
torch.backends.cuda.matmul.allow_tf32 = False
hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
ours = load_model(f"{folder}/model.pth", dev, torch.float32)
ours.setup_caches(1, 64)
ids = torch.randint(0, 49152, (1, 40), device=dev, generator=torch.Generator(dev).manual_seed(0))
worst = 0.0
with torch.no_grad():
    ref = hf(ids[:, :32]).logits
    got = ours(ids[:, :32], torch.arange(32, device=dev))
    worst = (ref - got).abs().max().item()
    for t in range(32, 40):
        ref = hf(ids[:, :t + 1]).logits[:, -1]
        got = ours(ids[:, t:t + 1], torch.tensor([t], device=dev))[:, -1]
        worst = max(worst, (ref - got).abs().max().item())
print(f"RESULT logits vs transformers, {dev} fp32, prefill 32 + 8 cached steps: max abs diff {worst:.2e} "
      f"(logit scale {ref.abs().max().item():.2f})")
assert worst < 1e-3
EOF

# Self-speculation equals plain greedy decoding token for token, compiled with CUDA graphs (fp32).
step selfspec_equal 300 $PYTHON scripts/correctness.py --device $DEVICE --compile --checkpoint_path "$SMALL/model.pth" \
  --early_exit $EARLY_EXIT --speculate_k 4 --prompts pydoc --num_prompts 3 --max_new_tokens 48

GEN="$PYTHON generate.py --device $DEVICE --temperature 0 --max_new_tokens ${TOKENS:-256} --num_samples 3 --prompt Once"
step ar_1b_bf16_eager 120 $GEN --checkpoint_path "$BIG/model.pth" --precision bf16 --num_samples 2
step ar_1b_bf16_compiled 300 $GEN --checkpoint_path "$BIG/model.pth" --precision bf16 --compile
step ar_135m_bf16_compiled 300 $GEN --checkpoint_path "$SMALL/model.pth" --precision bf16 --compile

step hf_1b_bf16 180 $PYTHON - "$BIG" <<'EOF'
import os, sys, time, torch
from transformers import AutoModelForCausalLM
dev = os.environ["DEVICE"]
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).to(dev).eval()
ids = torch.randint(0, 49152, (1, 8), device=dev)
kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
model.generate(ids, max_new_tokens=16, min_new_tokens=16, **kw)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
sync(); t0 = time.perf_counter()
out = model.generate(ids, max_new_tokens=256, min_new_tokens=256, **kw)
sync()
n = out.shape[1] - ids.shape[1]
print(f"RESULT transformers eager generate, 1B bf16: {n / (time.perf_counter() - t0):.1f} tok/s ({n} tokens)")
EOF

step quantize_int8 240 $PYTHON quantize.py --checkpoint_path "$BIG/model.pth" --mode int8
step ar_1b_int8_compiled 300 $GEN --checkpoint_path "$BIG/model_int8.pth" --precision bf16 --compile
step quantize_int4 240 $PYTHON quantize.py --checkpoint_path "$BIG/model.pth" --mode int4 --groupsize 128
step ar_1b_int4_compiled 300 $GEN --checkpoint_path "$BIG/model_int4.g128.pth" --precision bf16 --compile

# FlexiDepth real skipping on the GPU (torch.cond under CUDA graphs), bf16, random routers on layers 15-29.
step flexidepth_135m 420 $PYTHON scripts/bench_flexidepth.py --base "$SMALL/model.pth" --out "$WORK/smollm2-flexidepth" \
  --compile --device $DEVICE --precision bf16 --rounds 2 --masking_row --routing_layers $ROUTING
[ -f "$WORK/flexidepth_135m.out" ] && tr '\r' '\n' <"$WORK/flexidepth_135m.out" | grep -E "^(model |$(basename "$SMALL")|[0-9]+%|masking)" | tee -a "$SUMMARY"

# Real skipping (compiled, torch.cond) against the masking form (eager, both branches), fp32, the 50% threshold.
step flexidepth_equal 240 $PYTHON - "$WORK/smollm2-flexidepth" "$SMALL" <<'EOF'
import os, sys, torch
sys.path.insert(0, ".")
from pathlib import Path
from cli import parse_layers
from convert_hf_checkpoint import convert, with_random_routers
from generate import Steps, compile_steps, generate, load_model
folder, dev = sys.argv[1], os.environ["DEVICE"]
if not Path(folder, "model.pth").exists():  # flexidepth_135m makes it; when that step did not run, make it here
    n_layers = load_model(Path(sys.argv[2], "model.pth")).args.n_layers
    convert(with_random_routers(Path(sys.argv[2]), Path(folder), parse_layers(os.environ["ROUTING"], n_layers)))
model = load_model(f"{folder}/model.pth", dev, torch.float32)
prompt = torch.randint(0, model.args.vocab_size, (40,), device=dev, generator=torch.Generator(dev).manual_seed(0))
model.setup_caches(1, 40 + 48)
gates = []  # every gate of a full-depth decode: their median makes the threshold that skips about half
hooks = [l.router.register_forward_hook(lambda m, i, o: gates.append(torch.sigmoid(o).flatten()))
         for l in model.layers if hasattr(l, "router")]
generate(model, prompt, 48, skip_threshold=0.0)
for h in hooks:
    h.remove()
threshold = float(torch.quantile(torch.cat(gates).float(), 0.5))
real, stats = generate(model, prompt, 48, steps=compile_steps(dev, False), skip_threshold=threshold)
real_ran = model.layers_ran(torch.arange(39, 39 + 48, device=dev)).clone()
masking = Steps(decode=lambda m, x, pos, t: m(x, pos, t, masking=True)[:, -1])
masked, _ = generate(model, prompt, 48, steps=masking, skip_threshold=threshold)
masked_ran = model.layers_ran(torch.arange(39, 39 + 48, device=dev))
same = real.tolist() == masked.tolist() and bool((real_ran == masked_ran).all())
mean = sum(len(u) for u in stats.layers_used) / len(stats.layers_used)
print(f"RESULT flexidepth real skip (compiled) vs masking (eager), {dev} fp32: {'identical' if same else 'DIFFERENT'} "
      f"tokens and layer records over 48 tokens, mean layers {mean:.2f} of {model.args.n_layers}")
assert same and model.args.n_layers - len(model.args.routing_layers) < mean < model.args.n_layers
EOF

step selfspec_1b_speed 300 $GEN --checkpoint_path "$BIG/model.pth" --precision bf16 --compile --self_speculative \
  --early_exit $((EARLY_EXIT / 2)) --speculate_k 4

echo "=== summary"
cat "$SUMMARY"
