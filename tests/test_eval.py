"""scripts/eval.py's lm-eval integration, on the real default model: our loglikelihood against HF transformers, and
whole lm-eval runs of offline tasks against the same runs through lm-eval's own HF backend (HFLM), same weights."""
import json
import os
import subprocess
import sys

os.environ["HF_DATASETS_OFFLINE"] = "1"  # read when datasets / huggingface_hub are first imported
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import eval as ev  # noqa: E402
import generate as g  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

MAX_LENGTH = 144  # short enough that pydoc topic 4 (174 tokens) takes two rolling windows; HumanEval 0-1 fit
MAX_GEN_TOKS = 8
SAMPLES = {"tiny_mc": [0, 1, 2, 3], "pydoc_perplexity": [4, 8], "humaneval_offline": [0, 1]}

MC_DOCS = [
    dict(question="What is the capital of France?", choices=["Paris", "Berlin", "a banana"], answer=0),
    dict(question="Which number comes after 3?", choices=["7", "4", "blue"], answer=1),
    dict(question="What colour is the sky on a clear day?", choices=["green", "loud", "blue"], answer=2),
    dict(question="Which keyword defines a function in Python?", choices=["def", "func", "lambda x"], answer=0),
]
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def ours(default_checkpoint):
    model = g.load_model(default_checkpoint, "cpu", torch.float32)
    return ev.FlexFastLM(model, load_tokenizer(default_checkpoint.parent), batch_size=2, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def hflm(default_checkpoint):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=str(default_checkpoint.parent), device="cpu", dtype="float32", batch_size=1,
                max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def mc_task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "tiny_mc.yaml").write_text(MC_YAML.format(data=data))
    return folder


def test_loglikelihood_matches_transformers(ours, hflm):
    """Sum of continuation log-probs and the greedy flag, against HF LlamaForCausalLM on the same tokens (batched
    with right padding on our side, one by one on HF's)."""
    pairs = [("The capital of France is", " Paris"), ("def add(a, b):\n    return", " a + b"), ("", "Hello world"),
             ("1, 2, 3,", " 4, 5, 6"), ("Question: what is 2 + 2?\nAnswer: ", "4")]
    got = ours.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            context_ids, continuation_ids = ours._encode_pair(context, continuation)
        else:
            context_ids, continuation_ids = [ours.prefix_token_id], ours.tok_encode(continuation)
        with torch.no_grad():
            logits = hflm.model(torch.tensor([context_ids + continuation_ids])).logits[0, :-1].float()
        rows = logits[-len(continuation_ids):].log_softmax(-1)
        target = torch.tensor(continuation_ids)
        expected = float(rows.gather(-1, target[:, None]).sum())
        assert abs(logprob - expected) <= 1e-4, (context, continuation, logprob, expected)
        assert greedy == bool((rows.argmax(-1) == target).all())


@pytest.fixture(scope="module")
def plain_run(ours, mc_task_dir):
    return ev.run_tasks(ours, list(SAMPLES), include_paths=[mc_task_dir], samples=SAMPLES,
                        max_gen_toks=MAX_GEN_TOKS, log_samples=True)


def test_local_tasks_match_lm_eval_hf_backend(plain_run, hflm, mc_task_dir):
    """The same lm-eval run (multiple choice, rolling perplexity over two windows, HumanEval generation) through
    FlexFastLM and through lm-eval's HFLM: every figure within lm-eval's stderr, and request by request too."""
    reference = ev.run_tasks(hflm, list(SAMPLES), include_paths=[mc_task_dir], samples=SAMPLES,
                             max_gen_toks=MAX_GEN_TOKS, log_samples=True)
    for task in SAMPLES:
        ours_figures, hf_figures = plain_run["results"][task], reference["results"][task]
        metrics = [k for k in hf_figures if "," in k and "_stderr" not in k]
        assert metrics, task
        for key in metrics:
            name, filt = key.split(",")
            stderr = hf_figures.get(f"{name}_stderr,{filt}")
            tolerance = stderr if isinstance(stderr, float) and stderr > 0 else 0.0
            assert abs(ours_figures[key] - hf_figures[key]) <= max(tolerance, 1e-4 * abs(hf_figures[key])), \
                (task, key, ours_figures[key], hf_figures[key])
        ours_samples = sorted(plain_run["samples"][task], key=lambda s: s["doc_id"])
        hf_samples = sorted(reference["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in ours_samples] == SAMPLES[task]
        for a, b in zip(ours_samples, hf_samples):
            for x, y in zip(a["filtered_resps"], b["filtered_resps"]):
                if task == "humaneval_offline":
                    assert x == y  # greedy fp32 text, cut at the same stop strings
                else:
                    x = x[0] if isinstance(x, (list, tuple)) else x
                    y = y[0] if isinstance(y, (list, tuple)) else y
                    assert abs(float(x) - float(y)) <= 1e-3, (task, a["doc_id"], x, y)
    pydoc = plain_run["results"]["pydoc_perplexity"]
    assert 1.0 < pydoc["byte_perplexity,none"] < 10.0  # a real model on English prose about Python
    assert plain_run["results"]["tiny_mc"]["acc,none"] >= 0.5


def test_generation_columns(plain_run, ours, mc_task_dir, tmp_path):
    """Plain decoding uses all 30 layers and has no acceptance; self-speculative decoding (greedy, fp32) gives the
    same text and fills acceptance and layer passes per token from the speculation steps."""
    summary = ev.generation_summary(ours)["humaneval_offline"]
    assert summary["requests"] == 2 and summary["layers_per_token"] == 30 and summary["mean_accepted"] is None
    assert 0 < summary["tokens"] <= 2 * MAX_GEN_TOKS and summary["tokens_per_second"] > 0

    E, k = 10, 2
    speculative = ev.FlexFastLM(ours.model, ours.tokenizer, max_length=MAX_LENGTH, early_exit=E, speculate_k=k)
    run = ev.run_tasks(speculative, ["humaneval_offline"], samples={"humaneval_offline": [0, 1]},
                       max_gen_toks=MAX_GEN_TOKS, log_samples=True)
    def texts(results):
        return [s["filtered_resps"] for s in sorted(results["samples"]["humaneval_offline"], key=lambda s: s["doc_id"])]
    assert texts(run) == texts(plain_run)
    stats = speculative.generation_stats["humaneval_offline"]
    steps = [(n, kk) for s in stats for n, kk in zip(s.accepted, s.speculate_k)]
    summary = ev.generation_summary(speculative)["humaneval_offline"]
    assert summary["mean_accepted"] == pytest.approx(sum(n for n, _ in steps) / len(steps))
    assert 0 <= summary["mean_accepted"] <= k
    passes = sum(kk * E + 30 for _, kk in steps)  # k drafts through E layers, then the last draft + verify: E + 30 - E
    assert summary["layers_per_token"] == pytest.approx(passes / sum(n + 1 for n, _ in steps))


def test_cli_table_with_self_speculation(default_checkpoint, capsys, tmp_path):
    out = tmp_path / "results.json"
    ev.main(["--checkpoint_path", str(default_checkpoint), "--tasks", "humaneval_offline", "--limit", "1",
             "--max_gen_toks", "6", "--self_speculative", "--early_exit", "12", "--speculate_k", "2",
             "--output_path", str(out)])
    printed = capsys.readouterr().out
    assert "|humaneval_offline|" in printed.replace(" ", "") and "syntax_ok" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| humaneval_offline |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1" and float(cells[3]) > 0 and float(cells[4]) > 0 and 0 <= float(cells[5]) <= 2
    saved = json.loads(out.read_text())
    assert saved["generation"]["humaneval_offline"]["mean_accepted"] == pytest.approx(float(cells[5]), abs=1e-3)


class CharTokenizer:
    """One character per token id (chr(id)), for the tiny random models, which have no tokenizer files."""
    bos_token = eos_token = bos_id = None
    eos_ids = {0}
    folder = "chars"

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 256 for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def generation_request(context, until, max_gen_toks, task="tiny"):
    return Instance("generate_until", {}, (context, {"until": until, "max_gen_toks": max_gen_toks}), 0,
                    metadata=(task, 0, 1))


def test_flexidepth_layers_and_stop_strings(tmp_path):
    """A tiny random FlexiDepth checkpoint: the layers column is the mean count of layers each generated token ran
    (fewer than all: the routers skip), and a stop string ends decoding early, the text cut before it."""
    from conftest import make_flexidepth
    from convert_hf_checkpoint import convert
    model = g.load_model(convert(make_flexidepth(tmp_path / "flexi")), "cpu", torch.float32)
    lm = ev.FlexFastLM(model, CharTokenizer(), max_length=64)
    (full,) = lm.generate_until([generation_request("some prompt", [], 12, "free")], disable_tqdm=True)
    (stats,) = lm.generation_stats["free"]
    assert len(full) == stats.new_tokens == 12
    mean_layers = sum(len(u) for u in stats.layers_used) / len(stats.layers_used)
    assert ev.generation_summary(lm)["free"]["layers_per_token"] == pytest.approx(mean_layers)
    assert 1 <= mean_layers < 4

    stop = full[5:7]
    (cut,) = lm.generate_until([generation_request("some prompt", [stop], 12, "stopped")], disable_tqdm=True)
    assert cut == full[:full.index(stop)]
    assert lm.generation_stats["stopped"][0].new_tokens < 12


def test_exit_ppl_still_runs(default_checkpoint, capsys):
    ev.main(["--checkpoint_path", str(default_checkpoint), "--tasks", "exit_ppl", "--max_tokens", "64",
             "--window", "32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 30 and rows[-1].endswith("| 1.00 |")


def test_unknown_task_is_one_line_error(default_checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--checkpoint_path", str(default_checkpoint), "--tasks", "humaneval_offline,no_such_task"])
    assert str(e.value).startswith("error: unknown task no_such_task")
    with pytest.raises(SystemExit) as e:
        ev.main(["--tasks", "humaneval_offline", "--include_path", "/nonexistent/tasks"])
    assert str(e.value) == "error: --include_path /nonexistent/tasks is not a folder"


def test_hub_task_without_hub_is_one_line_error(default_checkpoint):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ROOT / "scripts/eval.py"), "--checkpoint_path",
                             str(default_checkpoint), "--tasks", "arc_easy", "--limit", "2"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: task arc_easy cannot load its data"), result.stderr
    assert "Hub" in lines[0] and result.stdout == ""
