"""Exit heads and a trimmed draft vocabulary for self-speculation: greedy output identical to plain decoding, the
trained folder through the converter, malformed folders refused with one line."""
import json
import re
import shutil

import pytest
import torch

import generate as g
from conftest import assert_one_line_error, make_converted_llama, run_cli, with_exit_heads


def greedy(model, prompt, n, steps=None, **kw):
    model.setup_caches(1, g.cache_length_needed(len(prompt), n, kw.get("speculate_k", 0)))
    tokens, stats = g.generate(model, prompt, n, steps=steps, **kw)
    return tokens.tolist(), stats


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_converted_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=6, vocab_size=96)
    plain = g.load_model(path, "cpu", torch.float32)
    vocab = torch.randperm(96, generator=torch.Generator().manual_seed(1))[:40].sort().values
    return plain, with_exit_heads(plain, range(1, 6), vocab)


def test_draft_logits_are_the_trimmed_head(tiny):
    plain, model = tiny
    model.setup_caches(1, 16)
    h = torch.randn(1, 3, model.args.dim)
    logits = model.exit_logits(h, 2)
    inside = torch.zeros(96, dtype=torch.bool)
    inside[model.draft_vocab] = True
    assert torch.isinf(logits[..., ~inside]).all()
    expected = plain.output(plain.norm(model.exit_heads["2"](h)))[..., inside]
    torch.testing.assert_close(logits[..., inside], expected)
    assert model.draft_output_weight.shape == (40, model.args.dim)  # only these rows are read by the draft


def test_greedy_identity_every_exit_tiny(tiny):
    plain, model = tiny
    prompt = torch.tensor([3, 17, 42, 5, 9])
    reference, _ = greedy(plain, prompt, 48)
    accepted = 0
    for early_exit in range(1, model.args.n_layers):
        for k in (1, 3):
            out, stats = greedy(model, prompt, 48, early_exit=early_exit, speculate_k=k)
            assert out == reference, f"E={early_exit} k={k}"
            accepted += sum(stats.accepted)
    assert accepted > 0  # the multi-token path ran


def test_greedy_identity_compiled_tiny(tiny):
    plain, model = tiny
    prompt = torch.tensor([1, 2, 3, 4])
    reference, _ = greedy(plain, prompt, 32)
    out, _ = greedy(model, prompt, 32, steps=g.compile_steps("cpu", compile_prefill=False), early_exit=3,
                    speculate_k=3)
    assert out == reference


@pytest.mark.parametrize("early_exit", [6, 12])
def test_greedy_identity_default_model(default_checkpoint, early_exit):
    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer(default_checkpoint.parent)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a list."}])
    prompt = torch.tensor(tokenizer.encode(text, add_special_tokens=False))
    plain = g.load_model(default_checkpoint, "cpu", torch.float32)
    reference, _ = greedy(plain, prompt, 48)
    model = with_exit_heads(plain, [early_exit], torch.arange(2048), scale=0.02)  # low ids: BPE's common tokens
    out, stats = greedy(model, prompt, 48, early_exit=early_exit, speculate_k=3)
    assert out == reference


# ---------------------------------------------------------------- the trained folder

@pytest.fixture(scope="module")
def trained(tmp_path_factory, default_checkpoint):
    """train_exit.py on a tiny random model with SmolLM2's vocabulary and tokenizer, a few steps."""
    base = make_converted_llama(tmp_path_factory.mktemp("base"), num_hidden_layers=4, vocab_size=49152,
                                tie_word_embeddings=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_checkpoint.parent / name, base.parent / name)
    out = base.parent.with_name(base.parent.name + "-SelfSpec")
    result = run_cli("scripts/train_exit.py", "--checkpoint_path", base, "--early_exits", "1,2", "--draft_vocab", "64",
                     "--gen_prompts", "6", "--gen_tokens", "12", "--gen_batch", "3", "--pydoc_tokens", "256",
                     "--heldout", "3", "--steps", "20", "--save_every", "10")
    assert result.returncode == 0, result.stderr[-2000:]
    return base, out


def test_trained_folder_round_trips(trained):
    base, out = trained
    config = json.loads((out / "config.json").read_text())
    assert config["exit_heads"] == {"1": "affine", "2": "affine"} and config["draft_vocab_size"] == 64
    model = g.load_model(out / "model.pth", "cpu", torch.float32)
    state = torch.load(out / "train_state.pth", weights_only=True)
    for name, t in state["heads"].items():
        torch.testing.assert_close(model.exit_heads.state_dict()[name], t)
    assert model.exit_heads["1"].proj.weight.abs().sum() > 0  # trained away from the zero start
    assert torch.equal(model.draft_vocab, state["data"]["vocab"])
    plain = g.load_model(base, "cpu", torch.float32)
    for name, t in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name  # the model's own weights untouched
    report = json.loads((out / "train_report.json").read_text())
    assert set(report["heldout_top1_agreement"]) == {"1", "2"}
    prompt = torch.tensor([72, 101, 108, 108, 111])
    reference, _ = greedy(plain, prompt, 24)
    assert greedy(model, prompt, 24, early_exit=2, speculate_k=2)[0] == reference


def test_generate_takes_exit_and_k_from_config(trained, tmp_path):
    _, out = trained
    folder = tmp_path / "spec"
    shutil.copytree(out, folder)
    config = json.loads((folder / "config.json").read_text())
    config["self_speculative"] = {"early_exit": 2, "speculate_k": 3}
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("generate.py", "--checkpoint_path", folder / "model.pth", "--self_speculative",
                     "--max_new_tokens", "8", "--temperature", "0", "--prompt", "abc")
    assert result.returncode == 0, result.stderr
    assert "early exit 2, k=3 (early exit and k from config.json" in result.stdout


def test_train_resume(trained):
    base, out = trained
    result = run_cli("scripts/train_exit.py", "--checkpoint_path", base, "--early_exits", "1,2", "--draft_vocab", "64",
                     "--gen_prompts", "6", "--gen_tokens", "12", "--gen_batch", "3", "--pydoc_tokens", "256",
                     "--heldout", "3", "--steps", "30", "--save_every", "10", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(out / "train_state.pth", weights_only=True)["step"] == 30


@pytest.mark.parametrize("edit, pattern", [
    (lambda c, w: c.update(exit_heads={"9": "affine"}), "exit head at '9' is outside 1..3"),
    (lambda c, w: c.update(exit_heads={"1": "mlp"}), "exit head kind 'mlp'"),
    (lambda c, w: c.update(exit_heads=[1, 2]), "exit_heads must map"),
    (lambda c, w: c.update(draft_vocab_size=-3), "draft_vocab_size must be an integer"),
    (lambda c, w: c.update(draft_vocab_size=32), "does not match"),  # the tensor holds 64 ids
    (lambda c, w: c.pop("exit_heads"), "does not match"),
    (lambda c, w: w.__setitem__("draft_vocab", torch.full((64,), 60000)), "draft_vocab must hold token ids"),
])
def test_malformed_folder_one_line_error(trained, tmp_path, edit, pattern):
    _, out = trained
    folder = tmp_path / "bad"
    shutil.copytree(out, folder)
    config = json.loads((folder / "config.json").read_text())
    weights = torch.load(folder / "model.pth", weights_only=True)
    edit(config, weights)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(weights, folder / "model.pth")
    result = run_cli("generate.py", "--checkpoint_path", folder / "model.pth", "--self_speculative", "--early_exit",
                     "1", "--speculate_k", "2", "--max_new_tokens", "4", "--prompt", "abc")
    assert_one_line_error(result, re.escape(pattern))


def test_converter_refuses_exit_head_without_config(trained, tmp_path):
    _, out = trained
    folder = tmp_path / "hf"
    shutil.copytree(out, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["exit_heads"], config["draft_vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("convert_hf_checkpoint.py", "--checkpoint_dir", folder)
    assert_one_line_error(result, r"model\.(exit_heads\.1\.\w+|draft_vocab).* does not belong to this config")


@pytest.mark.parametrize("flags, pattern", [
    (["--early_exits", "9"], "outside 1..3"),
    (["--early_exits", "a,b"], "expected a comma list"),
    (["--draft_vocab", "60000"], "--draft_vocab must be in 0..49152"),
    (["--resume", "--out_dir", "NOWHERE"], "no NOWHERE/train_state.pth"),
])
def test_train_exit_bad_flags(trained, flags, pattern):
    base, _ = trained
    result = run_cli("scripts/train_exit.py", "--checkpoint_path", base, "--steps", "1", "--early_exits", "1", *flags)
    assert_one_line_error(result, re.escape(pattern) if "(" not in pattern else pattern)
