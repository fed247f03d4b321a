"""Bad input to the two CLIs: one line on stderr starting "error:", a non-zero exit, no traceback, no partial file.
Each case breaks one thing in an otherwise good folder and runs the real script: as a subprocess for a few cases of
each kind (a fresh interpreter costs ~1.5 s of CPU here), the rest through the script's main() in this process,
which fails the same way on a traceback (the exception reaches pytest) and on anything but sys.exit("error: ...")."""
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DEFAULT_CHECKPOINT, ROOT, assert_one_line_error, make_converted_llama, make_hf_llama, run_cli

SMOLLM2_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
CONTEXT = 64


def run_main(script, argv, capfd, monkeypatch):
    """script's main() with argv, as the interpreter would run it: sys.exit(message) prints message, exits 1."""
    import convert_hf_checkpoint
    import generate
    main = {"generate.py": generate.main, "convert_hf_checkpoint.py": convert_hf_checkpoint.main}[script]
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the converter's SIGTERM handler is not for pytest
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    stdout, stderr = capfd.readouterr()
    code = exit_info.value.code
    if isinstance(code, str):
        stderr, code = stderr + code + "\n", 1
    return subprocess.CompletedProcess(argv, code, stdout, stderr)


def run_either(in_subprocess, script, argv, capfd, monkeypatch):
    return run_cli(script, *argv) if in_subprocess else run_main(script, argv, capfd, monkeypatch)


def assert_no_partial_file(folder):
    if folder.exists():
        leftovers = [p.name for p in folder.iterdir() if p.suffix in (".pth", ".tmp") or ".tmp" in p.name]
        assert leftovers == []


# ---------------------------------------------------------------- convert_hf_checkpoint.py

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return make_hf_llama(tmp_path_factory.mktemp("hf"))


def remove_weights(folder):
    (folder / "model.safetensors").unlink()


def truncate_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])


def wrong_shape_weight(folder):
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def unexpected_weight(folder):
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def missing_weight(folder):
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.3.mlp.down_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def remove_config(folder):
    (folder / "config.json").unlink()


def gpt2_config(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))


def config_without_hidden_size(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))


def invalid_json_config(folder):
    (folder / "config.json").write_text('{"model_type": "llama", ')


def missing_shard(folder):
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(dict(
        metadata={}, weight_map={name: "model-00002-of-00002.safetensors" for name in weights})))
    remove_weights(folder)


@pytest.mark.parametrize("damage, pattern, in_subprocess", [
    (remove_weights, "no weights in", False),
    (truncate_safetensors, "cannot read weights from .*model.safetensors", True),
    (wrong_shape_weight, r"k_proj.weight has shape \(8, 64\), config.json implies \(64, 64\)", False),
    (unexpected_weight, "unexpected weight model.layers.0.self_attn.q_proj.bias", False),
    (missing_weight, "weights missing", False),
    (remove_config, "config.json not found", False),
    (gpt2_config, "'gpt2' model", True),
    (invalid_json_config, "not valid JSON", False),
    (config_without_hidden_size, "config.json lacks hidden_size", False),
    (missing_shard, "shards that are missing: model-00002-of-00002.safetensors", False),
], ids=lambda v: v.__name__ if callable(v) else ("subprocess" if v is True else "main" if v is False else ""))
def test_convert_refuses(hf_folder, tmp_path, capfd, monkeypatch, damage, pattern, in_subprocess):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    damage(folder)
    result = run_either(in_subprocess, "convert_hf_checkpoint.py", ["--checkpoint_dir", folder], capfd, monkeypatch)
    assert_one_line_error(result, pattern)
    assert_no_partial_file(folder)


def test_convert_missing_folder(tmp_path):
    result = run_cli("convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "nowhere")
    assert_one_line_error(result, "nowhere not found")


def test_convert_good_folder(hf_folder, tmp_path, monkeypatch):
    """The baseline the cases above damage converts fine, into another folder too."""
    import convert_hf_checkpoint
    monkeypatch.setattr(sys, "argv", ["convert_hf_checkpoint.py", "--checkpoint_dir", str(hf_folder),
                                      "--output_dir", str(tmp_path / "out")])
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    convert_hf_checkpoint.main()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json",
                                                                    "model.pth"]


# An interruption while model.pth is being written: torch.save writes a little, then hangs until the signal.
INTERRUPTED_CONVERTER = """
import sys, time, torch
def hanging_save(obj, f, *args, **kwargs):
    with open(f, "wb") as out:
        out.write(b"partial")
    print("saving", flush=True)
    time.sleep(120)
torch.save = hanging_save
sys.argv = ["convert_hf_checkpoint.py", "--checkpoint_dir", sys.argv[1]]
import convert_hf_checkpoint
convert_hf_checkpoint.main()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_convert_interrupted_leaves_no_file(hf_folder, tmp_path, sig):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_CONVERTER, str(folder)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        assert (folder / ".model.pth.tmp").exists()  # the partial file is there while it writes
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "interrupted")
    assert_no_partial_file(folder)


def test_failed_save_keeps_the_old_model(hf_folder, tmp_path, monkeypatch):
    """A save that fails part-way (disk full, say) leaves the previous model.pth as it was."""
    import convert_hf_checkpoint
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    before = convert_hf_checkpoint.convert(folder).read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        convert_hf_checkpoint.convert(folder)
    assert (folder / "model.pth").read_bytes() == before
    assert not (folder / ".model.pth.tmp").exists()


# ---------------------------------------------------------------- generate.py

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer and a 64-position context."""
    folder = tmp_path_factory.mktemp("tiny")
    checkpoint = make_converted_llama(folder, vocab_size=49152, num_hidden_layers=2, tie_word_embeddings=True,
                                      max_position_embeddings=CONTEXT)
    (folder / "model.safetensors").unlink()
    for name in SMOLLM2_TOKENIZER_FILES:
        shutil.copy(DEFAULT_CHECKPOINT.parent / name, folder / name)
    return checkpoint


def generate_argv(checkpoint, *args):
    return ["--checkpoint_path", checkpoint, "--device", "cpu", "--precision", "fp32", "--prompt", "Hello",
            "--temperature", "0", *args]


def run_generate(checkpoint, *args):
    return run_cli("generate.py", *generate_argv(checkpoint, *args))


def test_generate_good_checkpoint(tiny_checkpoint):
    """The baseline the cases below damage generates fine, up to the last position ("Hello" is one token)."""
    result = run_generate(tiny_checkpoint, "--max_new_tokens", CONTEXT - 1)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr and "tok/s" in result.stdout


def corrupt_checkpoint(checkpoint):
    checkpoint.write_bytes(b"this is not a torch checkpoint\n" * 100)


def truncate_checkpoint(checkpoint):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:len(data) // 2])


def wrong_shape_checkpoint(checkpoint):
    state_dict = torch.load(checkpoint, weights_only=True)
    state_dict["layers.0.attention.wv.weight"] = torch.zeros(64, 32)
    torch.save(state_dict, checkpoint)


def remove_checkpoint(checkpoint):
    checkpoint.unlink()


def remove_generate_config(checkpoint):
    (checkpoint.parent / "config.json").unlink()


def gpt2_generate_config(checkpoint):
    gpt2_config(checkpoint.parent)


def remove_tokenizer(checkpoint):
    for name in SMOLLM2_TOKENIZER_FILES:
        (checkpoint.parent / name).unlink()


def garbage_tokenizer_model(checkpoint):
    remove_tokenizer(checkpoint)
    (checkpoint.parent / "tokenizer.model").write_bytes(bytes(range(256)) * 64)


def garbage_tokenizer_json(checkpoint):
    (checkpoint.parent / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')


@pytest.mark.parametrize("damage, pattern, in_subprocess", [
    (remove_checkpoint, "model.pth not found", False),
    (corrupt_checkpoint, "cannot read .*model.pth", True),
    (truncate_checkpoint, "cannot read .*model.pth", False),
    (wrong_shape_checkpoint, "model.pth does not match .*config.json", False),
    (remove_generate_config, "config.json not found", False),
    (gpt2_generate_config, "'gpt2' model", False),
    (remove_tokenizer, "no tokenizer in", False),
    (garbage_tokenizer_model, "tokenizer.model is neither a sentencepiece model nor a tiktoken ranks file", True),
    (garbage_tokenizer_json, "cannot read .*tokenizer.json", False),
], ids=lambda v: v.__name__ if callable(v) else ("subprocess" if v is True else "main" if v is False else ""))
def test_generate_refuses(tiny_checkpoint, tmp_path, capfd, monkeypatch, damage, pattern, in_subprocess):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint.parent, folder)
    checkpoint = folder / tiny_checkpoint.name
    damage(checkpoint)
    result = run_either(in_subprocess, "generate.py", generate_argv(checkpoint, "--max_new_tokens", "4"), capfd,
                        monkeypatch)
    assert_one_line_error(result, pattern)


@pytest.mark.parametrize("flags, pattern", [
    (["--prompt", ""], "the prompt is empty"),
    (["--num_samples", "0"], "--num_samples must be at least 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--temperature", "1", "--top_k", "-1"], r"--top_k must be 0 \(off\) or positive"),
    (["--temperature", "1", "--top_p", "0"], r"--top_p must be in \(0, 1\]"),
    (["--self_speculative", "--early_exit", "2"], "--early_exit must be in 1..1 for this 2-layer model"),
    (["--self_speculative", "--early_exit", "1", "--speculate_k", "0"], "--speculate_k must be at least 1"),
    (["--draft_checkpoint_path", "/nowhere/model.pth"], "/nowhere not found"),
])
def test_generate_refuses_flags(tiny_checkpoint, capfd, monkeypatch, flags, pattern):
    result = run_main("generate.py", generate_argv(tiny_checkpoint, *flags), capfd, monkeypatch)
    assert_one_line_error(result, pattern)


def test_generate_missing_folder(tmp_path):
    assert_one_line_error(run_generate(tmp_path / "nowhere" / "model.pth"), "nowhere not found")


def test_generate_beyond_context(tiny_checkpoint):
    result = run_generate(tiny_checkpoint, "--max_new_tokens", CONTEXT)
    assert_one_line_error(result, rf"needs {CONTEXT + 1} positions; the model's context is {CONTEXT}")


def test_generate_cuda_without_gpu(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_error(run_cli("generate.py", "--checkpoint_path", tiny_checkpoint, "--device", "cuda"),
                          "no CUDA GPU")
