"""scripts/benchmark.py: the table arithmetic and the CLI's error handling (the timed runs themselves are not tested:
they take minutes on the real model)."""
import os
import sys
from pathlib import Path

from conftest import ROOT, run_cli

sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402


def test_table_figures():
    rows = [dict(precision="fp32", what="FlexFast compiled", rate=40.0, cpu_rate=60.0, bytes=500e6, warmup=90.0,
                 same=True, note=""),
            dict(precision="fp32", what="HF transformers eager", rate=20.0, cpu_rate=20.0, bytes=500e6, warmup=1.0,
                 same=False, note=""),
            dict(precision="fp32", what="llama.cpp (llama-cpp-python)", note="not measured: not installed")]
    table = benchmark.markdown_table(rows, read_bw={"fp32": 25.0}, read_gib=20.0, copy_bw=30.0,
                                     bytes_per_token={"fp32": 500e6})
    lines = table.splitlines()
    limit = next(line for line in lines if "**limit**" in line)
    assert "| 50.0 | 25.0 | 100% |" in limit  # 25 GB/s / 0.5 GB per token
    assert all(line.count("|") == lines[0].count("|") for line in lines[:5])
    ours = next(line for line in lines if "FlexFast compiled" in line)
    assert "| 40.0 | 20.0 | 80% | 2.00 | 60.0 | 3.00 | 90.0 | yes |" in ours  # 40 tok/s x 0.5 GB; twice HF eager
    hf = next(line for line in lines if "HF transformers eager" in line)
    assert "| 1.00 |" in hf and "| no |" in hf
    assert "not measured: not installed" in next(line for line in lines if "llama.cpp" in line)
    assert "25.0 GB/s over 500 MB (fp32), 20.0 GB/s over 1 GiB" in lines[-1]


def test_bad_arguments_give_one_error_line(tmp_path):
    for args, message in [(["--max_new_tokens", "1"], "--max_new_tokens"),
                          (["--checkpoint_path", str(tmp_path / "missing/model.pth")], "not found")]:
        result = run_cli("scripts/benchmark.py", *args)
        assert result.returncode != 0
        assert result.stderr.strip().startswith("error:") and message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert result.stdout == ""


def test_flexfast_row_times_the_tokens_generate_returns(tmp_path):
    import torch
    import generate
    from conftest import make_converted_llama
    model = generate.load_model(make_converted_llama(tmp_path / "tiny"), "cpu", torch.float32)
    model.setup_caches(1, 32)
    prompt = torch.tensor([1, 2, 3])
    (rate, cpu_rate), tokens = benchmark.flexfast_runner(model, prompt, generate.Steps())(8)
    assert tokens == generate.generate(model, prompt, 8)[0].tolist() and len(tokens) == 8
    assert rate > 0 and cpu_rate > 0


def test_random_checkpoint_matches_transformers(tmp_path):
    """scripts/random_checkpoint.py (what bench_gpu.sh builds on the GPU machine): the shape asked for, converted by
    our converter, with the tokenizer of --like, and the same logits as transformers on the saved weights."""
    import torch
    from conftest import make_hf_llama, run_cli
    from generate import load_model
    from transformers import AutoModelForCausalLM
    like = make_hf_llama(tmp_path / "like")
    (like / "tokenizer_config.json").write_text("{}")
    result = run_cli("scripts/random_checkpoint.py", "--like", like, "--out", tmp_path / "r", "--hidden_size", 96,
                     "--num_hidden_layers", 3, "--num_attention_heads", 6, "--num_key_value_heads", 2)
    assert result.returncode == 0, result.stderr
    model = load_model(tmp_path / "r/model.pth", "cpu", torch.float32)
    assert (model.args.dim, model.args.n_layers, model.args.n_heads, model.args.head_dim) == (96, 3, 6, 16)
    assert (tmp_path / "r/tokenizer_config.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    idx = torch.randint(0, 256, (1, 12))
    model.setup_caches(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, torch.arange(12)), hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_random_checkpoint_bad_like(tmp_path):
    from conftest import assert_one_line_error, run_cli
    assert_one_line_error(run_cli("scripts/random_checkpoint.py", "--like", tmp_path, "--out", tmp_path / "r"),
                          "config.json not found")


def test_kernel_times_counts_what_the_compiled_graph_launched():
    from types import SimpleNamespace as Event
    graph = Event(name="## Call CompiledFxGraph abc ##", cpu_parent=None, cpu_time_total=900.0)
    other = Event(name="aten::add", cpu_parent=None, cpu_time_total=50.0)
    events = [graph, other]
    for _ in range(2):  # two tokens
        events += [Event(name="cpp_fused_layer_0", cpu_parent=graph, cpu_time_total=100.0),
                   Event(name="cpp_fused_layer_0", cpu_parent=graph, cpu_time_total=120.0),
                   Event(name="aten::_scaled_dot_product_flash_attention_for_cpu", cpu_parent=graph,
                         cpu_time_total=30.0),
                   Event(name="aten::empty", cpu_parent=graph, cpu_time_total=1.0),
                   Event(name="aten::transpose", cpu_parent=other, cpu_time_total=1.0)]
    rows = benchmark.kernel_times(events, steps=2)
    assert rows == [("cpp_fused_layer_0", 2.0, 110.0, 220.0),
                    ("aten::_scaled_dot_product_flash_attention_for_cpu", 1.0, 30.0, 30.0)]
def test_llama_bench_output_parsed():
    text = ('[{"n_prompt": 512, "n_gen": 0, "avg_ts": 212.5, "stddev_ts": 3.0},'
            ' {"n_prompt": 0, "n_gen": 128, "avg_ts": 64.25, "stddev_ts": 1.0}]')
    assert benchmark.parse_llama_bench(text) == {"pp": 212.5, "tg": 64.25}


def test_llama_cpp_row_skipped_with_a_reason(tmp_path, capsys):
    args = benchmark.parse_args(["--checkpoint_path", str(tmp_path / "model.pth"),
                                 "--llama_bench", str(tmp_path / "no-llama-bench")])
    assert "llama-bench not found" in benchmark.llama_cpp_table(args)
    binary = tmp_path / "llama-bench"
    binary.write_text("")
    args.llama_bench = binary
    assert f"no GGUF in {tmp_path}" in benchmark.llama_cpp_table(args)
    (tmp_path / "m.Q4_1.gguf").write_text("")
    assert benchmark.llama_cpp_skip_reason(args) is None and benchmark.find_gguf(args) == tmp_path / "m.Q4_1.gguf"


def test_quantized_table_figures():
    rows = [dict(what="FlexFast compiled, bf16", bytes=250e6, rates=[40.0, 50.0], note=""),
            dict(what="FlexFast compiled, int4 g32", bytes=100e6, rates=[90.0, 110.0], note=""),
            dict(what="llama.cpp llama-bench", note="skipped: llama-bench not found")]
    lines = benchmark.quantized_markdown(rows, read_bw=25.0).splitlines()
    assert "| 250 | 40.0 / 50.0 | 50.0 | 1.00 | 100 | 50% |" in lines[2]  # 25 GB/s / 0.25 GB per token = 100 tok/s
    assert "| 100 | 90.0 / 110.0 | 110.0 | 2.20 | 250 | 44% |" in lines[3]
    assert "skipped: llama-bench not found" in lines[4]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_decode_ab_times_every_variant_in_each_round(tmp_path, capsys):
    """scripts/bench_decode_ab.py on a tiny model: one row per variant, a figure for every round, a later turn
    (--start_pos) in a longer cache."""
    import cpu_kernels
    import model
    from conftest import make_converted_llama
    import bench_decode_ab
    from torch._inductor.codegen.cpp import CppScheduling
    from steps import KERNEL_GROUP_ARGS
    import torch._inductor.config as inductor_config
    variants = ["gemv-regional", "kernel-separate" if cpu_kernels.load() else "gemv-frozen", "gemv-wide-bounded",
                "gemv-smallpages-recompute-mlp3-attn2-l2" if cpu_kernels.load()
                else "gemv-smallpages-recompute-mlp3-attn2"]
    before = dict(model.ONE_TOKEN_LINEAR), model.linears
    prefetch_l2 = cpu_kernels.PREFETCH_L2
    try:
        bench_decode_ab.run(bench_decode_ab.parse_args([
            "--checkpoint_path", str(make_converted_llama(tmp_path / "tiny")), "--precision", "fp32",
            "--variants", *variants, "--rounds", "2", "--max_new_tokens", "4", "--cache_slots", "40",
            "--start_pos", "3"]))
    finally:
        model.ONE_TOKEN_LINEAR.clear()
        model.ONE_TOKEN_LINEAR.update(before[0])
        import torch
        torch._dynamo.reset()
    assert model.linears is before[1] and CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM == KERNEL_GROUP_ARGS  # back
    assert model.SWIGLU_IN_ONE_CALL and model.ATTENTION_WITH_WO and cpu_kernels.PREFETCH_L2 == prefetch_l2
    assert inductor_config.realize_cpu_opcount_threshold == 8 and "FLEXFAST_HUGE_PAGES" not in os.environ
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == variants
    for row in rows[1:]:
        cells = row.strip("| ").split(" | ")
        assert float(cells[1]) > 0 and len(cells[4].split(" / ")) == 2


def test_decode_ab_unknown_variant_is_one_error_line():
    import pytest
    import bench_decode_ab
    from conftest import assert_one_line_error
    assert_one_line_error(run_cli("scripts/bench_decode_ab.py", "--variants", "gemv", "fastest"), "unknown variant")
    with pytest.raises(ValueError, match="unknown variant"):
        bench_decode_ab.parse_variant("kernel-pywrapper")


def test_bench_compile_runs_each_mode_cold_then_warm_on_its_own_caches(monkeypatch, capsys):
    """scripts/bench_compile.py: per round and mode, a cold run on an empty inductor cache, then a warm one on the
    same cache; --fresh_machine also empties FlexFast's per-machine cache and the temporary directory (inductor's
    precompiled headers). (generate.py itself is not run here: a fresh machine's first compiled run costs about a
    minute.)"""
    import bench_compile
    calls, temporary_dirs = [], []

    def fake_run(args, mode, env):
        calls.append((mode, env["TORCHINDUCTOR_CACHE_DIR"], env.get("XDG_CACHE_HOME")))
        tmp = env.get("TMPDIR")
        temporary_dirs.append((tmp, bool(tmp) and Path(tmp).is_dir() and not any(Path(tmp).iterdir())))
        return 10.0 + len(calls), 20.0 + len(calls)

    monkeypatch.setattr(bench_compile, "timed_run", fake_run)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    bench_compile.run(bench_compile.parse_args(["--rounds", "2", "--checkpoint_path", str(bench_compile.ROOT /
                                                 bench_compile.DEFAULT_CHECKPOINT), "--fresh_machine"]))
    assert [mode for mode, _, _ in calls] == ["default", "default", "regional", "regional"] * 2
    inductor_dirs = [d for _, d, _ in calls]
    assert inductor_dirs[0::2] == inductor_dirs[1::2] and len(set(inductor_dirs)) == 4  # warm reuses its cold's
    assert all(xdg and xdg.startswith(str(Path(d).parent)) for _, d, xdg in calls)
    assert all(tmp.startswith(str(Path(d).parent)) and empty for (_, d, _), (tmp, empty) in zip(calls, temporary_dirs))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| default")
             or line.startswith("| regional")]
    assert table == ["| default | cold | 11.0 / 15.0 | 21.0 / 25.0 |",
                     "| default | warm | 12.0 / 16.0 | 22.0 / 26.0 |",
                     "| regional | cold | 13.0 / 17.0 | 23.0 / 27.0 |",
                     "| regional | warm | 14.0 / 18.0 | 24.0 / 28.0 |"]
    calls.clear()
    bench_compile.run(bench_compile.parse_args(["--modes", "regional"]))
    assert [xdg for _, _, xdg in calls] == [None, None]  # the machine's own probe and kernels
    assert [tmp for tmp, _ in temporary_dirs[-2:]] == [os.environ.get("TMPDIR")] * 2


def test_bench_compile_bad_arguments_give_one_error_line(tmp_path):
    from conftest import assert_one_line_error
    assert_one_line_error(run_cli("scripts/bench_compile.py", "--modes", "fastest"), "unknown mode")
    assert_one_line_error(run_cli("scripts/bench_compile.py", "--checkpoint_path", tmp_path / "none.pth"),
                          "no checkpoint")


def test_profile_times_the_step_unprofiled_and_lists_the_kernels(tmp_path):
    """--profile's cost model on a tiny model: the step time comes from a compile without the kernels' profiler
    records (which slow a C++-wrapped step), the kernels from a second one."""
    import torch
    from conftest import make_converted_llama
    args = benchmark.parse_args(["--checkpoint_path", str(make_converted_llama(tmp_path / "tiny")),
                                 "--max_new_tokens", "4", "--repeats", "1"])
    try:
        table = benchmark.profile_decode(args, "fp32", torch.tensor([1, 2, 3]))
    finally:
        torch._dynamo.reset()
    step = next(line for line in table.splitlines() if line.startswith("| measured step time"))
    assert float(step.split("| ")[2].split(" ms")[0]) > 0
    kernels = [line for line in table.splitlines() if line.startswith("| `")]
    assert kernels and all(float(line.split(" | ")[1]) > 0 for line in kernels)
