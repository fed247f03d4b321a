"""scripts/train_router.py on a tiny random Llama: the loss falls, a skip penalty removes layers, the written
FlexiDepth folder round-trips through the converter and generate.load_model, resume equals an unbroken run,
bad input is refused in one line."""
import json
import sys

import pytest
import torch

from conftest import ROOT, make_converted_llama

sys.path.insert(0, str(ROOT / "scripts"))
import train_router  # noqa: E402
from convert_hf_checkpoint import convert  # noqa: E402
from generate import load_model  # noqa: E402
from model import causal_mask, rope_rows  # noqa: E402

COMMON = ["--routing_layers", "2-3", "--seq_len", "32", "--batch_size", "4", "--lr", "1e-2", "--eval_windows", "8"]


def train(checkpoint, out_dir, *extra):
    argv = ["--checkpoint_path", str(checkpoint), "--out_dir", str(out_dir)] + COMMON + list(extra)
    return train_router.train(train_router.parse_args(argv))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return make_converted_llama(tmp_path_factory.mktemp("tiny"), num_key_value_heads=2)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {p: (train(tiny, root / f"p{p}", "--penalty", str(p), "--steps", "30"), root / f"p{p}")
            for p in (0.0, 1.0)}


def test_loss_falls(runs):
    report, _ = runs[0.0]
    losses = report["train_losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert report["heldout_ppl"] < report["heldout_ppl_full"]  # adapters and gates learnt something on held-out text


def test_penalty_removes_layers(runs):
    free, penalised = runs[0.0][0], runs[1.0][0]
    assert free["mean_layers_used"] > 3.5  # starts near full depth and stays there without a penalty
    assert penalised["mean_layers_used"] < free["mean_layers_used"] - 0.5


def test_folder_round_trips(runs):
    report, out = runs[1.0]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ddllama" and config["routing_layers"] == [2, 3]
    from safetensors.torch import load_file
    names = load_file(str(out / "model.safetensors")).keys()
    assert {"model.layers.2.router.router_enc.weight", "model.layers.3.router_proj.up_proj.weight"} <= set(names)
    assert "model.layers.1.router.router_enc.weight" not in names
    convert(out)  # the ordinary converter, again
    model = load_model(out / "model.pth", "cpu", torch.float32)
    model.setup_caches(4, 32)
    _, eval_windows = train_router.split_windows(train_router.text_tokens(out, 256), 32, 8)
    ppl, _, layers = train_router.evaluate(model, eval_windows, 4)
    assert ppl == pytest.approx(report["heldout_ppl"], rel=1e-5)
    assert layers == pytest.approx(report["mean_layers_used"])
    # decode (real skipping) through a freshly loaded copy: prefill, then one token
    model = load_model(out / "model.pth", "cpu", torch.float32)
    model.setup_caches(1, 32)
    prompt = eval_windows[0, :8]
    model(prompt[None], torch.arange(8))
    assert model(prompt[None, :1], torch.tensor([8])).shape == (1, 1, 256)
    ran = model.layers_ran(torch.arange(9))
    assert ran[:, :2].all() and ran.shape == (9, 4)


def test_resume_matches_unbroken_run(tiny, tmp_path):
    straight = train(tiny, tmp_path / "a", "--penalty", "0.1", "--steps", "12", "--save_every", "6")
    train(tiny, tmp_path / "b", "--penalty", "0.1", "--steps", "6")
    resumed = train(tiny, tmp_path / "b", "--penalty", "0.1", "--steps", "12", "--resume")
    assert resumed["train_losses"] == straight["train_losses"][6:]
    assert resumed["heldout_ppl"] == pytest.approx(straight["heldout_ppl"], rel=1e-6)


def test_continues_a_flexidepth_checkpoint(runs, tmp_path):
    _, out = runs[1.0]
    argv = ["--checkpoint_path", str(out / "model.pth"), "--out_dir", str(tmp_path / "c"), "--seq_len", "32",
            "--eval_windows", "8", "--steps", "2", "--penalty", "1.0"]
    report = train_router.train(train_router.parse_args(argv))  # no --routing_layers: continues its own
    assert report["routing_layers"] == [2, 3]


@pytest.mark.parametrize("extra, message", [
    (["--routing_layers", "2-9", "--penalty", "0"], "outside the model's 4 layers"),
    (["--routing_layers", "3-1", "--penalty", "0"], "empty range"),
    (["--routing_layers", "x", "--penalty", "0"], "expected A-B"),
    (["--routing_layers", "2-3", "--penalty", "-1"], "--penalty must be >= 0"),
    (["--penalty", "0"], "--routing_layers is needed"),
    (["--routing_layers", "2-3", "--penalty", "0", "--resume"], "no .* to resume from"),
    (["--routing_layers", "2-3", "--penalty", "0", "--save_every", "0"], "--save_every >= 1"),
])
def test_bad_input(tiny, tmp_path, capsys, extra, message):
    argv = ["--checkpoint_path", str(tiny), "--out_dir", str(tmp_path / "o"), "--steps", "1"] + extra
    with pytest.raises(SystemExit) as e:
        train_router.main(argv)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert __import__("re").search(message, str(e.value))
    assert not (tmp_path / "o" / "model.pth").exists()


def test_refuses_other_routing_layers_on_flexidepth(runs, tmp_path):
    _, out = runs[1.0]
    with pytest.raises(SystemExit, match="already FlexiDepth"):
        train_router.main(["--checkpoint_path", str(out / "model.pth"), "--out_dir", str(tmp_path / "o"),
                           "--routing_layers", "1-3", "--steps", "1"])


def test_compare_adds_the_branch_difference_to_the_gate_gradient(runs):
    """FlexiDepthBlock.masked as the trainer calls it: the value is the checkpoint's rule (the model's own masking
    forward); straight_through (--compare) only adds dLoss/dout . (run_out - skip_out) to dLoss/dw, which is what
    lets a token move back across the threshold."""
    _, out = runs[1.0]
    model = load_model(out / "model.pth", "cpu", torch.float32)
    model.setup_caches(2, 16)
    layer = model.layers[2]
    layer.router.requires_grad_(True)
    x = torch.randn(2, 16, model.args.dim)
    pos = torch.arange(16)
    rope, mask = rope_rows(model.rope, pos), causal_mask(pos, pos)
    with torch.no_grad():
        reference = layer(x, rope, mask, pos, 0.5, False)
    results = {}
    for compare in (False, True):
        train_router.fresh_caches(model, 2, 16)
        y, w, _ = layer.masked(x, rope, mask, pos, 0.5, straight_through=compare)
        upstream = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
        results[compare] = y, torch.autograd.grad((y * upstream).sum(), w)[0], upstream
    torch.testing.assert_close(results[True][0], reference)
    torch.testing.assert_close(results[False][0], reference)
    with torch.no_grad():
        train_router.fresh_caches(model, 2, 16)
        _, _, ops = layer.route(x, rope, mask, pos, 0.5)
        difference = layer.run_branch(*ops) - layer.skip_branch(*ops)
    upstream = results[True][2]
    torch.testing.assert_close(results[True][1] - results[False][1], (upstream * difference).sum(-1, keepdim=True))
