"""Interrupted writers (convert, quantize: SIGINT and SIGTERM), and bad input to quantize.py, prepare_default.py,
train_router.py, eval.py and generate.py under torchrun, and one trap in the model API (a cache made for a larger
batch). Each CLI case: one `error:` line, exit status 1, no traceback, no new or temporary file, the previous output
byte for byte. In-process main(argv) calls where the behaviour allows (an exception other than SystemExit reaches
pytest and fails the test, which is how a traceback shows here); a subprocess only for signals and torchrun.
tests/test_cli_errors.py holds the converter's and generate.py's cases, tests/test_security.py the hostile
templates and pickles at the API level."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import DEFAULT_CHECKPOINT, ROOT, RunsCode, assert_one_line_error, make_converted_llama

sys.path.insert(0, str(ROOT / "scripts"))


def cli_error(main, argv, capsys, monkeypatch) -> str:
    """main(argv) must end in sys.exit("error: <one line>") and print nothing else on stderr."""
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main_guard's handlers are not for pytest
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, argv)))
    code = exit_info.value.code
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    stderr = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert stderr == [], stderr
    return code


def folder_state(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def edit_config(folder, drop=(), **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in dict(config, **changes).items() if k not in drop}))


# ---------------------------------------------------------------- quantize.py

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny converted model with an int8 file already written: the previous output every case must keep."""
    from quantize import quantize
    checkpoint = make_converted_llama(tmp_path_factory.mktemp("q") / "tiny", num_key_value_heads=2)
    quantize(checkpoint, "int8")
    return checkpoint


def quantize_list_checkpoint(folder):
    torch.save([torch.zeros(2)], folder / "model.pth")


def quantize_pickle_that_runs_code(folder):
    torch.save({"tok_embeddings.weight": RunsCode(folder / "MARKER")}, folder / "model.pth")


@pytest.mark.parametrize("damage, pattern", [
    (quantize_list_checkpoint, "does not hold a state dict"),
    (quantize_pickle_that_runs_code, "cannot read .*model.pth"),
    (lambda folder: edit_config(folder, vocab_size=10 ** 12), "not a real checkpoint"),
    (lambda folder: edit_config(folder, num_attention_heads=0, drop=["head_dim"]), "num_attention_heads=0"),
    (lambda folder: (folder / "config.json").write_text("{"), "config.json is not valid JSON"),
    (lambda folder: (folder / "config.json").unlink(), "config.json not found"),
], ids=["list_checkpoint", "pickle_runs_code", "vocab_size_1e12", "zero_heads", "invalid_json", "no_config"])
def test_quantize_refuses(converted, tmp_path, capsys, monkeypatch, damage, pattern):
    import quantize
    folder = tmp_path / "tiny"
    shutil.copytree(converted.parent, folder)
    damage(folder)
    before = folder_state(folder)
    message = cli_error(quantize.main, ["--checkpoint_path", folder / "model.pth", "--mode", "int8"], capsys,
                        monkeypatch)
    assert __import__("re").search(pattern, message), message
    assert folder_state(folder) == before  # model_int8.pth untouched, nothing new, no temporary file
    assert not (folder / "MARKER").exists()


# An interruption while a writer saves: torch.save writes a little, then hangs until the signal.
INTERRUPTED_WRITER = """
import importlib, sys, time, torch
def hanging_save(obj, f, *args, **kwargs):
    with open(f, "wb") as out:
        out.write(b"partial")
    print("saving", flush=True)
    time.sleep(120)
torch.save = hanging_save
importlib.import_module(sys.argv[1]).main(sys.argv[2:])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("tool", ["convert_hf_checkpoint", "quantize"])
def test_interrupted_writer_leaves_the_old_file(converted, tmp_path, tool, sig):
    """SIGINT and SIGTERM alike: one 'interrupted' line, non-zero exit, no temporary file, the previous output
    byte for byte. The child runs with SIGINT at its default disposition, whatever this process was started with
    (a background job of a non-interactive shell starts with SIGINT ignored, and a child inherits that)."""
    folder = tmp_path / "tiny"
    shutil.copytree(converted.parent, folder)  # an HF folder already converted and quantized once
    output, argv = folder / "model.pth", ["--checkpoint_dir", folder]
    if tool == "quantize":
        output, argv = folder / "model_int8.pth", ["--checkpoint_path", folder / "model.pth", "--mode", "int8"]
    before = folder_state(folder)
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_WRITER, tool, *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving", proc.stderr.read()
        assert list(folder.glob(f".{output.name}.*.tmp"))  # the partial file is there while it writes
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "interrupted")
    assert folder_state(folder) == before  # the previous output byte for byte, no temporary file


# ---------------------------------------------------------------- prepare_default.py

def test_prepare_refuses_a_gguf_that_is_not_the_pinned_one(tmp_path, capsys, monkeypatch):
    import prepare_default
    fake = tmp_path / prepare_default.GGUF_NAME
    fake.write_bytes(b"GGUF" + bytes(1000))
    message = cli_error(prepare_default.main, ["--gguf", fake, "--out_dir", tmp_path / "out" / "SmolLM2"], capsys,
                        monkeypatch)
    assert f"has sha256 {__import__('hashlib').sha256(fake.read_bytes()).hexdigest()}, expected " \
           f"{prepare_default.GGUF_SHA256}" in message
    assert not (tmp_path / "out").exists()


def test_prepare_missing_gguf(tmp_path, capsys, monkeypatch):
    import prepare_default
    message = cli_error(prepare_default.main, ["--gguf", tmp_path / "nothing.gguf", "--out_dir", tmp_path / "out"],
                        capsys, monkeypatch)
    assert "nothing.gguf not found" in message and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- train_router.py and eval.py

def nan_weights(folder):
    state_dict = torch.load(folder / "model.pth", weights_only=True)
    state_dict["layers.0.attention.wq.weight"][1, 2] = float("nan")
    torch.save(state_dict, folder / "model.pth")


def bare_tensor(folder):
    torch.save(torch.zeros(3), folder / "model.pth")


# train_router.py is being restructured on another branch: on this one it still sets the removed
# Transformer.skip_threshold attribute (AttributeError) before it can reach either check. Strict: once that branch
# is merged these must pass, and the marks go.
TRAIN_ROUTER_BROKEN = pytest.mark.xfail(strict=True, reason="train_router.py: stale skip_threshold attribute; "
                                                            "--save_every 0 is step % 0 (issue 14, item 7)")


@pytest.mark.parametrize("extra, damage, pattern", [
    ([], bare_tensor, "is not a plain floating-point checkpoint"),
    pytest.param([], nan_weights, "wq.weight holds NaN or Inf", marks=TRAIN_ROUTER_BROKEN),
    pytest.param(["--save_every", "0"], None, "--save_every", marks=TRAIN_ROUTER_BROKEN),
], ids=["bare_tensor", "nan_weights", "save_every_0"])
def test_train_router_refuses(converted, tmp_path, capsys, monkeypatch, extra, damage, pattern):
    import train_router
    folder = tmp_path / "tiny"
    shutil.copytree(converted.parent, folder)
    if damage:
        damage(folder)
    out = tmp_path / "out"
    message = cli_error(train_router.main, ["--checkpoint_path", folder / "model.pth", "--out_dir", out,
                                            "--routing_layers", "2-3", "--steps", "2", "--seq_len", "16",
                                            "--batch_size", "1", "--eval_windows", "1", *extra], capsys, monkeypatch)
    assert __import__("re").search(pattern, message), message
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".pth", ".tmp", ".safetensors")]


@pytest.mark.parametrize("damage, pattern", [
    (nan_weights, "wq.weight holds NaN or Inf"),
    (bare_tensor, "holds a Tensor, not a state dict"),
], ids=["nan_weights", "bare_tensor"])
def test_eval_refuses(converted, tmp_path, capsys, monkeypatch, damage, pattern):
    import eval as ev
    folder = tmp_path / "tiny"
    shutil.copytree(converted.parent, folder)
    damage(folder)
    message = cli_error(ev.main, ["--checkpoint_path", folder / "model.pth", "--tasks", "exit_ppl", "--max_tokens",
                                  "32", "--window", "16"], capsys, monkeypatch)
    assert __import__("re").search(pattern, message), message


# ---------------------------------------------------------------- generate.py under torchrun (two gloo ranks)

def test_torchrun_refuses_a_checkpoint_holding_a_list(tmp_path):
    """Every rank fails to load; rank 0 alone says so, in one line, and both exit non-zero (no hang). torchrun's
    own launcher then prints its ChildFailedError report (a traceback of torchrun's frames, none of ours)."""
    shutil.copy(DEFAULT_CHECKPOINT.parent / "config.json", tmp_path / "config.json")
    torch.save([1, 2, 3], tmp_path / "model.pth")
    result = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "generate.py", "--checkpoint_path",
                             tmp_path / "model.pth", "--max_new_tokens", "2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=240, env=dict(os.environ, FLEXFAST_DIST_TIMEOUT="60",
                                                             OMP_NUM_THREADS="1"))
    assert result.returncode != 0 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'model.pth'} holds a list, not a state dict of named tensors"], \
        result.stderr[-2000:]
    assert str(ROOT) not in result.stderr.replace(f"{ROOT}/generate.py FAILED", "")  # no frame of ours


# ---------------------------------------------------------------- the model API

def test_cache_made_for_a_larger_batch_serves_batch_one(converted):
    """setup_caches(4, n) then setup_caches(1, n): the cache keeps batch 4 and a batch-1 forward uses its first
    row, with the same logits as a model whose cache was made for batch 1."""
    from generate import load_model
    big, small = load_model(converted), load_model(converted)
    big.setup_caches(4, 32)
    big.setup_caches(1, 32)
    small.setup_caches(1, 32)
    prompt, pos = torch.tensor([[3, 1, 4, 1, 5]]), torch.arange(5)
    torch.testing.assert_close(big(prompt, pos), small(prompt, pos))
    torch.testing.assert_close(big(prompt[:, :1], torch.tensor([5])), small(prompt[:, :1], torch.tensor([5])))
