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

from conftest import (DEFAULT_CHECKPOINT, ROOT, RunsCode, assert_one_line_error, make_converted_llama, make_hf_llama,
                      restore_compile_settings, run_cli)

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


def edit_config(folder, drop=(), **changes):
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in dict(config, **changes).items() if k not in drop}
    (folder / "config.json").write_text(json.dumps(config))


def vocab_size_1e12(folder):
    edit_config(folder, vocab_size=10 ** 12)


def negative_intermediate_size(folder):
    edit_config(folder, intermediate_size=-128)


def odd_head_dim(folder):
    edit_config(folder, head_dim=15)


def zero_attention_heads(folder):
    edit_config(folder, num_attention_heads=0, drop=["head_dim"])  # head_dim then comes from hidden_size / heads


def string_hidden_size(folder):
    edit_config(folder, hidden_size="64", drop=["head_dim"])


def config_is_a_list(folder):
    (folder / "config.json").write_text("[1, 2, 3]")


def poisoned_weight(value):
    def damage(folder):
        weights = load_file(str(folder / "model.safetensors"))
        weights["model.layers.2.mlp.up_proj.weight"][3, 5] = value
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    damage.__name__ = f"{value}_in_weights".lower()
    return damage


def pickle_bin_that_runs_code(folder):
    remove_weights(folder)
    torch.save({"model.embed_tokens.weight": RunsCode(folder / "MARKER")}, folder / "pytorch_model.bin")


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
    (vocab_size_1e12, "that is not a real checkpoint", False),
    (negative_intermediate_size, "sizes must be positive integers: intermediate_size=-128", False),
    (odd_head_dim, "head_dim 15 is odd", False),
    (zero_attention_heads, "sizes must be positive integers: num_attention_heads=0", False),
    (string_hidden_size, "sizes must be positive integers: hidden_size=", False),
    (config_is_a_list, "does not hold a JSON object", False),
    (poisoned_weight(float("nan")), "up_proj.weight holds NaN or Inf", False),
    (poisoned_weight(float("inf")), "up_proj.weight holds NaN or Inf", False),
    (pickle_bin_that_runs_code, "cannot read weights from .*pytorch_model.bin", False),
], ids=lambda v: v.__name__ if callable(v) else ("subprocess" if v is True else "main" if v is False else ""))
def test_convert_refuses(hf_folder, tmp_path, capfd, monkeypatch, damage, pattern, in_subprocess):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    damage(folder)
    result = run_either(in_subprocess, "convert_hf_checkpoint.py", ["--checkpoint_dir", folder], capfd, monkeypatch)
    assert_one_line_error(result, pattern)
    assert_no_partial_file(folder)
    assert not (folder / "MARKER").exists()


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
    assert not list(folder.glob(".model.pth*.tmp"))


def test_failed_copy_keeps_the_old_config(hf_folder, tmp_path, monkeypatch):
    """The config and tokenizer copies are atomic too: a copy that fails part-way leaves the previous file."""
    import shutil as shutil_module
    import convert_hf_checkpoint
    out = tmp_path / "out"
    convert_hf_checkpoint.convert(hf_folder, out)
    before = (out / "config.json").read_bytes()

    def failing_copy(src, dst, *args, **kwargs):
        with open(dst, "wb") as f:
            f.write(b"{")
        raise OSError("No space left on device")

    monkeypatch.setattr(shutil_module, "copyfile", failing_copy)
    monkeypatch.setattr(shutil_module, "copy", lambda src, dst, **kw: failing_copy(src, dst))
    with pytest.raises(OSError):
        convert_hf_checkpoint.convert(hf_folder, out)
    assert (out / "config.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.pth"]


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
    """The baseline the cases below damage generates fine, up to the last position ("Hello" is one token): exactly
    the tokens asked for, none past the context (no wrap-around)."""
    result = run_generate(tiny_checkpoint, "--max_new_tokens", CONTEXT - 1, "--ignore_eos")
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr and "tok/s" in result.stdout
    assert "prompt 1 tokens, " in result.stdout and f"generated {CONTEXT - 1} tokens" in result.stdout


@pytest.mark.parametrize("flags, generated", [
    (["--temperature", "1", "--top_k", "0", "--seed", "0", "--max_new_tokens", "4"], 4),  # top-k off, not an error
    (["--prompt", "Hello" + " Hello" * (CONTEXT - 2), "--max_new_tokens", "1"], 1),  # the prompt fills all but one
], ids=["top_k_0_is_off", "prompt_one_short_of_the_context"])
def test_generate_edges_that_work(tiny_checkpoint, capfd, monkeypatch, flags, generated):
    import generate
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    generate.main(list(map(str, generate_argv(tiny_checkpoint, "--ignore_eos", *flags))))
    stdout, stderr = capfd.readouterr()
    assert f"generated {generated} tokens" in stdout and "error" not in stderr
    assert "nan" not in stdout  # one token gives no decode rate to print: "not timed", not "nan tok/s"


def test_prompts_of_nearby_lengths_share_one_compile(tiny_checkpoint, capfd, monkeypatch):
    """A compiled step's shapes include the cache length: generate.py rounds it up (CACHE_ROUNDING), so that a
    second run with a prompt a few tokens longer loads the decode step from the compile caches instead of compiling
    it anew (30 s on the default model). Two runs in one process: dynamo traces again (a new model), as a second
    process would, and AOTAutograd's cache must answer it."""
    import generate
    from torch._dynamo.utils import counters
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(generate, "CACHE_ROUNDING", 16)
    restore_compile_settings(monkeypatch)
    torch._dynamo.reset()
    for prompt in ("Hello", "Hello Hello Hello"):  # 1 and 3 tokens: caches of 5 and 7 slots, both rounded to 16
        counters.clear()
        generate.main(list(map(str, generate_argv(tiny_checkpoint, "--compile", "--ignore_eos", "--max_new_tokens",
                                                  "4", "--prompt", prompt))))
        assert "generated 4 tokens" in capfd.readouterr().out
    assert counters["aot_autograd"]["autograd_cache_hit"] >= 1 and not counters["aot_autograd"]["autograd_cache_miss"]
    torch._dynamo.reset()


def test_generate_depth_html_in_unwritable_folder(tiny_checkpoint, tmp_path, capfd, monkeypatch):
    """A FlexiDepth checkpoint (the only kind --depth_html applies to) and a folder the user cannot write: one error
    line, no file. root writes through a chmod 555 folder, so as root the folder is /sys, where even root cannot
    create a file; that failure surfaces at the write, after generation, still as one line."""
    import os
    from model import ModelArgs, Transformer
    folder = tmp_path / "flexidepth"
    shutil.copytree(tiny_checkpoint.parent, folder)
    edit_config(folder, model_type="ddllama", routing_layers=[1])
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        names = Transformer(ModelArgs.from_hf_config(config)).state_dict()
    state_dict = torch.load(folder / "model.pth", weights_only=True)
    torch.manual_seed(0)
    state_dict.update({k: torch.randn(v.shape) * 0.1 for k, v in names.items() if ".router." in k or ".adapter." in k})
    torch.save(state_dict, folder / "model.pth")
    if os.geteuid() == 0:
        unwritable = ROOT.anchor + "sys"
    else:
        unwritable = tmp_path / "read_only"
        unwritable.mkdir(mode=0o555)
    html = f"{unwritable}/flexfast_depth_test.html"
    result = run_main("generate.py", generate_argv(folder / "model.pth", "--max_new_tokens", "3", "--depth_html", html),
                      capfd, monkeypatch)
    assert_one_line_error(result, "not writable|Permission denied")
    assert not os.path.exists(html)


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


def edit_state_dict(checkpoint, edit):
    state_dict = torch.load(checkpoint, weights_only=True)
    edit(state_dict)
    torch.save(state_dict, checkpoint)


def nan_checkpoint(checkpoint):
    edit_state_dict(checkpoint, lambda sd: sd["layers.1.feed_forward.w2.weight"].__setitem__((0, 0), float("nan")))


def inf_checkpoint(checkpoint):
    edit_state_dict(checkpoint, lambda sd: sd["norm.weight"].__setitem__(3, float("-inf")))


def list_checkpoint(checkpoint):
    torch.save([torch.zeros(2), torch.ones(2)], checkpoint)


def tensor_checkpoint(checkpoint):
    torch.save(torch.zeros(4, 4), checkpoint)


def pickle_pth_that_runs_code(checkpoint):
    torch.save({"tok_embeddings.weight": RunsCode(checkpoint.parent / "MARKER")}, checkpoint)


def generate_vocab_size_1e12(checkpoint):
    vocab_size_1e12(checkpoint.parent)


def generate_odd_head_dim(checkpoint):
    odd_head_dim(checkpoint.parent)


def generate_config_is_a_list(checkpoint):
    config_is_a_list(checkpoint.parent)


def generate_zero_attention_heads(checkpoint):
    zero_attention_heads(checkpoint.parent)


def truncated_tokenizer_json(checkpoint):
    path = checkpoint.parent / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:100_000])


def invalid_tokenizer_config(checkpoint):
    (checkpoint.parent / "tokenizer_config.json").write_text('{"bos_token": ')


@pytest.mark.parametrize("damage, pattern, in_subprocess", [
    (nan_checkpoint, "w2.weight holds NaN or Inf", False),
    (inf_checkpoint, "norm.weight holds NaN or Inf", False),
    (list_checkpoint, "holds a list, not a state dict", False),
    (tensor_checkpoint, "holds a Tensor, not a state dict", False),
    (pickle_pth_that_runs_code, "cannot read .*model.pth", True),
    (generate_vocab_size_1e12, "that is not a real checkpoint", False),
    (generate_odd_head_dim, "head_dim 15 is odd", False),
    (generate_config_is_a_list, "does not hold a JSON object", False),
    (generate_zero_attention_heads, "num_attention_heads", False),
    (truncated_tokenizer_json, "cannot read .*tokenizer.json", False),
    (invalid_tokenizer_config, "tokenizer_config.json is not valid JSON", False),
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
    assert not (folder / "MARKER").exists()


@pytest.mark.parametrize("template_file, in_subprocess", [("tokenizer_config.json", True),
                                                          ("chat_template.jinja", False)])
def test_generate_chat_refuses_hostile_template(tiny_checkpoint, tmp_path, capfd, monkeypatch, template_file,
                                                in_subprocess):
    """A template that reaches Python's os module: one error line, and the command never runs."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint.parent, folder)
    template = f"{{{{ cycler.__init__.__globals__.os.system('touch {folder / 'MARKER'}') }}}}"
    if template_file == "chat_template.jinja":
        (folder / template_file).write_text(template)
    else:
        (folder / "chat_template.jinja").unlink()
        edit_config_file = folder / "tokenizer_config.json"
        edit_config_file.write_text(json.dumps(dict(json.loads(edit_config_file.read_text()), chat_template=template)))
    argv = generate_argv(folder / tiny_checkpoint.name, "--chat", "--max_new_tokens", "4")
    result = run_either(in_subprocess, "generate.py", argv, capfd, monkeypatch)
    assert_one_line_error(result, "chat template tried an unsafe operation")
    assert not (folder / "MARKER").exists()


@pytest.mark.parametrize("flags, pattern", [
    (["--prompt", ""], "the prompt is empty"),
    (["--num_samples", "0"], "--num_samples must be at least 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--temperature", "1", "--top_k", "-1"], r"--top_k must be 0 \(off\) or positive"),
    (["--temperature", "1", "--top_p", "0"], r"--top_p must be in \(0, 1\]"),
    (["--self_speculative", "--early_exit", "2"], "--early_exit must be in 1..1 for this 2-layer model"),
    (["--self_speculative", "--early_exit", "1", "--speculate_k", "0"], "--speculate_k must be at least 1"),
    (["--draft_checkpoint_path", "/nowhere/model.pth"], "/nowhere not found"),
    (["--temperature", "-0.5"], r"--temperature must be 0 \(greedy\) or positive, got -0.5"),
    (["--temperature", "nan", "--max_new_tokens", "4"], "--temperature"),
    (["--early_exit", "1"], "--early_exit does nothing without --self_speculative"),
    (["--speculate_k", "3"], "--speculate_k does nothing without"),
    (["--compile_prefill"], "--compile_prefill does nothing without --compile"),
    (["--compile_regional"], "--compile_regional does nothing without --compile"),
    (["--depth_html", "/nowhere/depth.html"], "--depth_html: folder /nowhere does not exist"),
    (["--show_depth", "--max_new_tokens", "4"], "need a FlexiDepth checkpoint"),
    (["--prompt", "Hello" + " Hello" * (CONTEXT - 1), "--max_new_tokens", "1"],
     rf"prompt \({CONTEXT} tokens\) \+ max_new_tokens \(1\) needs {CONTEXT + 1} positions"),
])
def test_generate_refuses_flags(tiny_checkpoint, capfd, monkeypatch, flags, pattern):
    result = run_main("generate.py", generate_argv(tiny_checkpoint, *flags), capfd, monkeypatch)
    assert_one_line_error(result, pattern)


@pytest.mark.parametrize("best, pattern, in_subprocess", [
    ([1, 2], r'self_speculative must be \{"early_exit": E, "speculate_k": k\}, got \[1, 2\]', True),
    ("E=1", "self_speculative must be", False),
    ({"early_exit": "1", "speculate_k": 2}, "self_speculative values must be positive integers: early_exit='1'", False),
    ({"early_exit": 1, "speculate_k": 0}, "self_speculative values must be positive integers: speculate_k=0", False),
    ({"early_exit": True}, "self_speculative values must be positive integers: early_exit=True", False),
    ({"early_exit": 2, "speculate_k": 2}, r"self_speculative early_exit 2 is outside 1\.\.1", False),
], ids=["list", "string", "string_exit", "zero_k", "bool_exit", "exit_past_the_model"])
def test_generate_refuses_malformed_self_speculative(tiny_checkpoint, tmp_path, capfd, monkeypatch, best, pattern,
                                                     in_subprocess):
    """config.json's self_speculative (scripts/sweep.py --write_best) is read with the rest of the config: a
    malformed value is one error line, whether or not --self_speculative would take it."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint.parent, folder)
    edit_config(folder, self_speculative=best)
    for flags in (["--self_speculative"], []):
        argv = generate_argv(folder / tiny_checkpoint.name, "--max_new_tokens", "4", *flags)
        result = run_either(in_subprocess, "generate.py", argv, capfd, monkeypatch)
        assert_one_line_error(result, "config.json: " + pattern)


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
