"""FlexiDepth: tiny random checkpoints saved with the real HF tensor names (model_type "ddllama", routing_layers),
converted with our converter. The masking form (both branches for every token, select per token) is the reference
for the real-skip decode path."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (DEFAULT_CHECKPOINT, FLEXIDEPTH_LAYERS, PROMPT, assert_one_line_error,
                      make_converted_llama, make_flexidepth, run_cli, run_generate)
from convert_hf_checkpoint import convert
from generate import generate, load_model
from steps import compile_steps, forward_last

STEPS = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return convert(make_flexidepth(tmp_path_factory.mktemp("flexidepth")))


def fresh_model(checkpoint, max_seq_length=64):
    model = load_model(checkpoint, "cpu", torch.float32)
    model.setup_caches(1, max_seq_length)
    return model


def decode_logits(model, tokens, step=forward_last):
    """Prefill PROMPT, then feed `tokens` one at a time; the logits of every step ([len(tokens) + 1, V])."""
    T = len(PROMPT)
    rows = [forward_last(model, PROMPT[None], torch.arange(T))]
    for j, token in enumerate(tokens):
        rows.append(step(model, token.view(1, 1), torch.tensor([T + j])))
    return torch.cat(rows)


def greedy_tokens(model):
    tokens, _ = generate(model, PROMPT, STEPS + 1)
    return tokens[:STEPS]


def test_config_widths():
    from model import ModelArgs
    args = ModelArgs.from_hf_config(dict(model_type="ddllama", vocab_size=128256, hidden_size=4096,
                                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                         num_key_value_heads=8, routing_layers=list(range(16, 32))))
    assert (args.router_dim, args.adapter_dim) == (256, 896)  # the released checkpoint's router and adapter widths


def test_real_skip_matches_masking(checkpoint):
    real, reference = fresh_model(checkpoint), fresh_model(checkpoint)
    tokens = greedy_tokens(real)
    # count the big matmuls that really ran: a skipped layer must not touch wq or the MLP
    calls = {"wq": 0, "mlp": 0}
    for layer in real.layers:
        layer.attention.wq.register_forward_hook(lambda *_: calls.__setitem__("wq", calls["wq"] + 1))
        layer.feed_forward.register_forward_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
    got = decode_logits(real, tokens)
    want = decode_logits(reference, tokens, step=lambda m, x, pos: m(x, pos, masking=True)[:, -1])
    assert (got - want).abs().max() <= 1e-5
    positions = torch.arange(len(PROMPT) - 1, len(PROMPT) + STEPS)
    ran = real.layers_ran(positions)
    assert torch.equal(ran, reference.layers_ran(positions))
    routed = ran[1:, FLEXIDEPTH_LAYERS].float().mean()  # decode steps only
    assert 0.25 <= routed <= 0.75, f"routers should skip about half the tokens, ran {routed:.2f}"
    layer_runs_in_decode = int(ran[1:].sum())
    prefill_calls = len(real.layers)  # prefill runs both branches (masking form) in every layer
    assert calls["wq"] == calls["mlp"] == prefill_calls + layer_runs_in_decode


def test_skipped_token_kv_is_written(checkpoint):
    model = fresh_model(checkpoint)
    tokens = greedy_tokens(model)
    T = len(PROMPT)
    ran = model.layers_ran(torch.arange(T, T + STEPS))  # decisions of the decode steps, position T + j
    j, layer_index = next((j, i) for j in range(STEPS) for i in FLEXIDEPTH_LAYERS if not ran[j, i])
    cache = model.layers[layer_index].attention.kv_cache
    assert cache.k_cache[0, :, T + j].abs().sum() > 0 and cache.v_cache[0, :, T + j].abs().sum() > 0

    # the probe token runs every layer (threshold 0), so it attends to the skipped token's K/V
    probe = lambda: forward_last(model, tokens[-1].view(1, 1), torch.tensor([T + STEPS]), skip_threshold=0.0)
    before = probe()
    cache.v_cache[0, :, T + j] += 1.0
    after = probe()
    assert (after - before).abs().max() > 1e-3


def test_layers_used_match_router_decisions(checkpoint):
    model = fresh_model(checkpoint)
    gates = {i: [] for i in FLEXIDEPTH_LAYERS}
    for i in FLEXIDEPTH_LAYERS:
        model.layers[i].router.register_forward_hook(
            lambda m, inp, out, i=i: gates[i].append(torch.sigmoid(out)[0, -1, 0].item()))
    tokens, stats = generate(model, PROMPT, STEPS)
    assert len(stats.layers_used) == len(tokens) == STEPS
    for j, used in enumerate(stats.layers_used):  # token j came from forward call j (the prefill's last row first)
        want = [i for i in range(len(model.layers)) if i not in FLEXIDEPTH_LAYERS or gates[i][j] > 0.5]
        assert used == want
    counts = {len(u) for u in stats.layers_used}
    assert len(counts) > 1  # the depth varies from token to token


@pytest.mark.parametrize("bounded", [False, True], ids=["whole_cache", "bounded"])
def test_compiled_decode_agrees_and_does_not_recompile(checkpoint, monkeypatch, bounded):
    """The real skip under compile (torch.cond): eager's logits and layers, one graph for every skip pattern; bounded
    (chat, the server: the slots read grow with the position), one graph for every position too."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    from steps import live_slots
    monkeypatch.setattr(inductor_config, "freezing", inductor_config.freezing)  # compile_steps sets it; restore
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", torch._dynamo.config.cache_size_limit)
    torch._dynamo.reset()
    eager, compiled = fresh_model(checkpoint), fresh_model(checkpoint)
    tokens = greedy_tokens(eager)
    want = decode_logits(eager, tokens)
    graphs_before = counters["stats"]["unique_graphs"]
    steps = compile_steps("cpu", compile_prefill=False, bounded=bounded)

    def decode(model, x, input_pos):
        return steps.decode(model, x, input_pos, slots=live_slots(model, steps, int(input_pos[-1]) + 1))
    got = decode_logits(compiled, tokens, step=decode)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # one graph for every skip pattern
    assert (got - want).abs().max() <= 1e-4
    positions = torch.arange(len(PROMPT), len(PROMPT) + STEPS)
    ran = compiled.layers_ran(positions)
    assert torch.equal(ran, eager.layers_ran(positions))
    assert len({tuple(row.tolist()) for row in ran}) >= 3  # several skip patterns went through that graph
    torch._dynamo.reset()


def test_speculation_is_refused(checkpoint):
    model = fresh_model(checkpoint)
    with pytest.raises(ValueError, match="FlexiDepth"):
        generate(model, PROMPT, 8, speculate_k=2, early_exit=2)


# ---------------------------------------------------------------- CLIs

@pytest.fixture(scope="module")
def hf_flexidepth(tmp_path_factory):
    return make_flexidepth(tmp_path_factory.mktemp("hf_flexidepth"))


def routing_outside_range(folder):
    config = json.loads((folder / "config.json").read_text())
    config["routing_layers"] = [2, 3, 4]
    (folder / "config.json").write_text(json.dumps(config))


def drop_tensor(name):
    def damage(folder):
        weights = load_file(str(folder / "model.safetensors"))
        del weights[name]
        save_file(weights, str(folder / "model.safetensors"))
    damage.__name__ = f"drop_{name.split('.', 3)[-1]}"
    return damage


def wrong_adapter_shape(folder):
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.2.router_proj.up_proj.weight"] = torch.zeros(64, 5)
    save_file(weights, str(folder / "model.safetensors"))


@pytest.mark.parametrize("damage, pattern", [
    (routing_outside_range, r"routing_layers \[4\] are outside the model's 4 layers"),
    (drop_tensor("model.layers.1.router.router_head.weight"), "missing .*layers.1.router.head.weight"),
    (drop_tensor("model.layers.3.router_proj.gate_proj.weight"), "missing .*layers.3.adapter.gate_proj.weight"),
    (wrong_adapter_shape, r"router_proj.up_proj.weight has shape \(64, 5\)"),
], ids=lambda v: v.__name__ if callable(v) else "")
def test_convert_refuses_bad_flexidepth(hf_flexidepth, tmp_path, damage, pattern):
    folder = tmp_path / "hf"
    shutil.copytree(hf_flexidepth, folder)
    damage(folder)
    assert_one_line_error(run_cli("convert_hf_checkpoint.py", "--checkpoint_dir", folder), pattern)
    assert not (folder / "model.pth").exists()


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """A tiny FlexiDepth model with SmolLM2's vocabulary and tokenizer, for the generate CLI."""
    folder = make_flexidepth(tmp_path_factory.mktemp("cli"), vocab_size=49152, tie_word_embeddings=True)
    checkpoint = convert(folder)
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(DEFAULT_CHECKPOINT.parent / name, folder / name)
    return checkpoint


def run_generate_24(checkpoint, *args):
    return run_generate(checkpoint, "--max_new_tokens", 24, *args, prompt="Hello there")


def test_cli_show_depth_and_html(cli_checkpoint, tmp_path):
    html_path = tmp_path / "depth.html"
    result = run_generate_24(cli_checkpoint, "--show_depth", "--depth_html", html_path)
    assert result.returncode == 0, result.stderr
    counts = [int(c) for c in re.findall(r"\x1b\[0m\x1b\[2m(\d+)\x1b\[0m", result.stdout)]
    assert len(counts) == 24 and set(counts) <= {1, 2, 3, 4} and len(set(counts)) > 1
    mean = float(re.search(r"layers used: mean ([\d.]+) of 4", result.stdout).group(1))
    assert mean == pytest.approx(sum(counts) / len(counts), abs=0.01)
    page = html_path.read_text()
    titles = re.findall(r'<div class="col" title="token (\d+): .*?, (\d)/4 layers"', page)
    assert [int(c) for _, c in titles] == counts  # the map shows the same depths as the stream
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("flags, pattern", [
    (["--skip_threshold", "1.5"], r"--skip_threshold must be in \[0, 1\]"),
    (["--self_speculative", "--early_exit", "2"], "speculative decoding with a FlexiDepth checkpoint"),
    (["--depth_html", "/nonexistent/dir/depth.html"], "does not exist"),
])
def test_cli_refuses(cli_checkpoint, flags, pattern):
    assert_one_line_error(run_generate_24(cli_checkpoint, *flags), pattern)


def test_bench_flexidepth_trained_table(cli_checkpoint, tmp_path):
    # the full model the routers sit on: the same weights (same seed and shape), no routers
    base = make_converted_llama(tmp_path / "base", num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(DEFAULT_CHECKPOINT.parent / name, base.parent / name)
    result = run_cli("scripts/bench_flexidepth.py", "--base", base, "--routed", cli_checkpoint, "--prompts", 2,
                     "--max_new_tokens", 12, "--rounds", 1, "--precision", "fp32", "--threads", 1)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if "|" in line}
    full, routed = rows[base.parent.name], rows[cli_checkpoint.parent.name]
    assert float(full[1]) == 4.0 and 2.0 < float(routed[1]) < 4.0  # mean layers used: routers skip some
    assert float(routed[2]) < float(full[2])  # MB read per token
    assert float(full[-1]) == 1.0 and float(routed[-1]) > 1.0  # the bytes ideal, relative to the full model


@pytest.mark.parametrize("case, pattern", [
    ("plain as routed", "has no routed layers"),
    ("routed as base", "has routed layers"),
    ("other shape", "was not trained on --base"),
    ("zero rounds", "must be at least 1"),
])
def test_bench_flexidepth_refuses(cli_checkpoint, tmp_path, case, pattern):
    other = make_converted_llama(tmp_path / "other", num_key_value_heads=2)  # SmolLM2-sized vocabulary it lacks
    base, routed, extra = {"plain as routed": (other, other, []), "routed as base": (cli_checkpoint, cli_checkpoint, []),
                           "other shape": (other, cli_checkpoint, []),
                           "zero rounds": (other, cli_checkpoint, ["--rounds", 0])}[case]
    shutil.copy(DEFAULT_CHECKPOINT.parent / "tokenizer.json", other.parent / "tokenizer.json")
    assert_one_line_error(run_cli("scripts/bench_flexidepth.py", "--base", base, "--routed", routed, *extra),
                          pattern)
