"""Shared test helpers (the only place tests share them): tiny random Llama variants saved the way Hugging Face
saves them, run through our real converter, FlexiDepth ones with random routers; a tiny model built directly; the
real offline default model (prepared by ./scripts/prepare.sh); running a CLI and checking its one-line error.
docs/design.md has the contracts they test."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

# The suite runs in two pytest-xdist workers (README), a module's tests in one, each computing on the machine's two
# threads: OpenMP's default of spinning while it waits made a thread spin on the core the other worker needed (a
# default-model test took 73 s against 14 s alone). Waiting threads sleep instead; set before torch loads OpenMP,
# and inherited by the scripts the tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert_hf_checkpoint import convert, with_random_routers  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth"

# Each Llama variant docs/design.md lists; all tiny enough to run in milliseconds.
TINY_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
VARIANTS = {
    "llama2_mha": dict(rope_theta=10000.0),
    "llama3_gqa": dict(num_key_value_heads=2, rope_theta=500000.0),
    "llama3.1_rope_scaling": dict(num_key_value_heads=2, rope_theta=500000.0,
                                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=32)),
    "llama3.2_tied": dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                          rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=16)),
    "mqa": dict(num_key_value_heads=1),
    "explicit_head_dim": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=48),
}


def tiny_model(vocab_size: int = 128, n_layers: int = 3, seed: int = 0, **extra) -> Transformer:
    """A tiny model built directly (no checkpoint): GQA, head_dim 16, random weights from seed, eval, no grads; extra
    ModelArgs fields make it FlexiDepth (routing_layers, router_dim, adapter_dim). The compile and kernel tests'
    subject."""
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=vocab_size, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=16,
                     intermediate_size=96, **extra)
    return Transformer(args).eval().requires_grad_(False)


def make_hf_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a random LlamaForCausalLM with save_pretrained (safetensors) and return its folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = dict(TINY_BASE, **overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    with torch.no_grad():  # HF's init is small; larger weights make logit differences meaningful
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() == 1 else 0.1)
            if p.dim() == 1:
                p.add_(1.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def make_converted_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama converted with our converter; returns the model.pth path."""
    make_hf_llama(folder, seed, **overrides)
    return convert(folder)


FLEXIDEPTH_LAYERS = [1, 2, 3]  # routed layers of the tiny FlexiDepth models
PROMPT = torch.tensor([5, 17, 99, 3, 250, 42, 7, 128])  # token ids any tiny model's vocabulary holds


def add_routers(folder: Path, routing_layers, seed: int = 1) -> Path:
    """Turn a saved HF Llama folder into a FlexiDepth one in place (about half the tokens skip each routed layer)."""
    return with_random_routers(folder, folder, routing_layers, seed)


def make_flexidepth(folder: Path, routing_layers=FLEXIDEPTH_LAYERS, **overrides) -> Path:
    """A tiny random FlexiDepth model as an HF folder (not yet converted)."""
    make_hf_llama(folder, num_key_value_heads=2, **overrides)
    return add_routers(folder, routing_layers)


def with_exit_heads(model, exits, vocab, seed=0, scale=0.3):
    """A copy of model with a random affine head at every exit in exits and the draft vocabulary vocab."""
    args = dataclasses.replace(model.args, exit_heads={e: "affine" for e in exits}, draft_vocab_size=len(vocab))
    out = Transformer(args)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("exit_heads.") or k == "draft_vocab" for k in missing)
    if args.tie_embeddings:
        out.output.weight = out.tok_embeddings.weight
    gen = torch.Generator().manual_seed(seed)
    dim = args.dim
    for head in out.exit_heads.values():
        head.proj.weight.data = torch.randn(dim, dim, generator=gen) * scale / dim ** 0.5
        head.bias.data = torch.randn(dim, generator=gen) * scale
    out.draft_vocab.copy_(torch.as_tensor(vocab))
    return out.to(model.norm.weight.dtype).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    if not DEFAULT_CHECKPOINT.exists():
        pytest.fail(f"{DEFAULT_CHECKPOINT} is missing: run ./scripts/prepare.sh first")
    return DEFAULT_CHECKPOINT


TQDM_LINE = re.compile(r"^[^:]*:\s*\d+%\|")  # a progress bar may precede the error on stderr


def restore_compile_settings(monkeypatch):
    """compile_steps sets dynamo's and inductor's settings process-wide; monkeypatch puts these back after the test,
    so that tests after it run under the defaults."""
    import torch._inductor.config as inductor_config
    for config, name in ((inductor_config, "freezing"), (inductor_config.cpp, "enable_concat_linear"),
                         (inductor_config, "unsafe_marked_cacheable_functions"),
                         (torch._dynamo.config, "cache_size_limit"), (torch._dynamo.config, "specialize_float")):
        monkeypatch.setattr(config, name, getattr(config, name))


def run_cli(script, *args, **kwargs):
    """Run one of the project's scripts (path relative to the repo root) as a user would."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kwargs)


def assert_one_line_error(result, pattern):
    """Bad input: non-zero exit, no traceback, exactly one 'error: ...' line on stderr, matching pattern."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and not TQDM_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def greedy(model, prompt, n, steps=None, **kw):
    """generate() with the default (greedy) sampling, the cache made large enough; returns (token list, stats)."""
    from generate import cache_length_needed, generate
    model.setup_caches(1, cache_length_needed(len(prompt), n, kw.get("speculate_k", 0)))
    tokens, stats = generate(model, prompt, n, steps=steps, **kw)
    return tokens.tolist(), stats


def run_generate(checkpoint, *args, prompt="Hello"):
    """generate.py greedy in fp32 on the CPU, as a user would run it."""
    return run_cli("generate.py", "--checkpoint_path", checkpoint, "--device", "cpu", "--precision", "fp32",
                   "--prompt", prompt, "--temperature", "0", *args)


class RunsCode:
    """Unpickling this runs `touch marker`: what a hostile pytorch_model.bin or model.pth carries. torch.save it in
    place of a tensor; a reader with weights_only=True must refuse the file before the marker appears."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)
