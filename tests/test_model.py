"""Our Llama against Hugging Face's LlamaForCausalLM, for every variant docs/design.md lists, through the real converter
and generate.load_model; plus the config dialects and the weight-file layouts the converter reads."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import generate
from conftest import TINY_BASE, VARIANTS, make_converted_llama, make_hf_llama, tiny_model
from convert_hf_checkpoint import convert
from model import ModelArgs

# Long enough that the rope-scaling variants (original_max_position_embeddings 32 and 16) run well past it.
SEQ_LEN = 160
PREFILL_LEN = 100
DECODE_STEPS = 8
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(our model, HF model, token ids [1, SEQ_LEN]) for one variant."""
    from transformers import LlamaForCausalLM
    folder = tmp_path_factory.mktemp(request.param)
    checkpoint = make_converted_llama(folder, **VARIANTS[request.param])
    ours = generate.load_model(checkpoint, "cpu", torch.float32)
    ours.setup_caches(1, TINY_BASE["max_position_embeddings"])
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert SEQ_LEN > (VARIANTS[request.param].get("rope_scaling") or {}).get("original_max_position_embeddings", 0)
    tokens = torch.randint(0, TINY_BASE["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_logits = hf(tokens).logits
    return ours, hf_logits, tokens


def test_full_sequence_logits_match_hf(variant):
    ours, hf_logits, tokens = variant
    with torch.no_grad():
        logits = ours(tokens, torch.arange(SEQ_LEN))
    assert logits.shape == hf_logits.shape
    assert hf_logits.abs().max() > 1.0  # the comparison means something only if logits are not all tiny
    assert (logits - hf_logits).abs().max().item() <= TOLERANCE


def test_prefill_then_decode_matches_hf(variant):
    """Prefill a prompt, then decode one token at a time through the static cache (teacher-forced)."""
    ours, hf_logits, tokens = variant
    with torch.no_grad():
        prefill = ours(tokens[:, :PREFILL_LEN], torch.arange(PREFILL_LEN))
        assert (prefill - hf_logits[:, :PREFILL_LEN]).abs().max().item() <= TOLERANCE
        for pos in range(PREFILL_LEN, PREFILL_LEN + DECODE_STEPS):
            step = ours(tokens[:, pos:pos + 1], torch.tensor([pos]))
            assert (step[:, 0] - hf_logits[:, pos]).abs().max().item() <= TOLERANCE, f"position {pos}"


def test_stale_cache_entries_are_masked(variant):
    """Write garbage tokens past a position, move back, decode again: the result ignores the stale slots."""
    ours, hf_logits, tokens = variant
    pos = PREFILL_LEN
    with torch.no_grad():
        ours(tokens[:, :pos], torch.arange(pos))
        ours(torch.zeros(1, 5, dtype=torch.long), torch.arange(pos, pos + 5))  # rejected drafts, say
        step = ours(tokens[:, pos:pos + 1], torch.tensor([pos]))
    assert (step[:, 0] - hf_logits[:, pos]).abs().max().item() <= TOLERANCE


# ---------------------------------------------------------------- config dialects

LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
BASE_CONFIG = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                   max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True)


@pytest.mark.parametrize("dialect", [
    dict(rope_parameters=dict(rope_theta=500000.0, rope_type="llama3", **LLAMA3_SCALING)),  # transformers >= 5
    dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **LLAMA3_SCALING)),  # hub
    dict(rope_theta=500000.0, rope_scaling=dict(type="llama3", **LLAMA3_SCALING)),  # older hub
])
def test_config_dialects_read_alike(dialect):
    args = ModelArgs.from_hf_config(dict(BASE_CONFIG, **dialect))
    assert args == ModelArgs(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                             intermediate_size=8192, norm_eps=1e-5, rope_base=500000.0, rope_scaling=LLAMA3_SCALING,
                             tie_embeddings=True, max_position_embeddings=131072)


@pytest.mark.parametrize("dialect", [
    dict(rope_parameters=dict(rope_theta=100000.0, rope_type="default")),
    dict(rope_theta=100000.0),
    dict(rope_theta=100000.0, rope_scaling=None),
])
def test_config_dialects_without_scaling(dialect):
    args = ModelArgs.from_hf_config(dict(BASE_CONFIG, **dialect))
    assert args.rope_base == 100000.0 and args.rope_scaling is None


def test_config_defaults_follow_hf():
    """Fields HF fills in when absent: KV heads = heads, head_dim = hidden / heads, no tying."""
    config = {k: v for k, v in BASE_CONFIG.items()
              if k not in ("num_key_value_heads", "head_dim", "tie_word_embeddings")}
    args = ModelArgs.from_hf_config(config)
    assert (args.n_kv_heads, args.head_dim, args.tie_embeddings, args.rope_base) == (32, 64, False, 10000.0)


@pytest.mark.parametrize("bad, message", [
    (dict(model_type="gpt2"), "gpt2"),
    (dict(rope_theta=1e4, rope_scaling=dict(type="linear", factor=2.0)), "linear"),
    (dict(rope_parameters=dict(rope_theta=1e4, rope_type="yarn", factor=4.0)), "yarn"),
    (dict(attention_bias=True), "bias"),
    (dict(num_key_value_heads=5), "multiple"),
    (dict(hidden_size=None), "lacks hidden_size"),
    (dict(rope_theta=1e4, rope_scaling=dict(rope_type="llama3", factor=8.0)), "llama3 rope scaling needs"),
])
def test_config_refuses_what_it_cannot_run(bad, message):
    config = {k: v for k, v in dict(BASE_CONFIG, **bad).items() if v is not None}
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_hf_config(config)
    with pytest.raises(ValueError, match="JSON object"):
        ModelArgs.from_hf_config([config])


def test_saved_config_reads_like_its_hub_form(tmp_path):
    """The transformers-5 config.json of a real save and its hand-written hub form give the same ModelArgs."""
    make_hf_llama(tmp_path, **VARIANTS["llama3.1_rope_scaling"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved
    hub = copy.deepcopy(saved)
    params = hub.pop("rope_parameters")
    hub["rope_theta"] = params.pop("rope_theta")
    hub["rope_scaling"] = params
    assert ModelArgs.from_hf_config(saved) == ModelArgs.from_hf_config(hub)
    assert ModelArgs.from_hf_config(saved).rope_scaling["original_max_position_embeddings"] == 32


# ---------------------------------------------------------------- weight-file layouts

@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    checkpoint = make_converted_llama(folder, **VARIANTS["llama3_gqa"])
    return folder, torch.load(checkpoint, weights_only=True)


def assert_same_state_dict(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sharded_safetensors_convert_alike(reference_folder, tmp_path):
    from transformers import LlamaForCausalLM
    folder, reference = reference_folder
    LlamaForCausalLM.from_pretrained(folder).save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    assert_same_state_dict(torch.load(convert(tmp_path), weights_only=True), reference)


def test_bin_files_convert_alike(reference_folder, tmp_path):
    """pytorch_model.bin, single and sharded with its index (transformers 5 no longer writes them; the hub has many)."""
    folder, reference = reference_folder
    hf_weights = load_file(str(folder / "model.safetensors"))
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    for out in (single, sharded):
        out.mkdir()
        (out / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf_weights, single / "pytorch_model.bin")
    names = sorted(hf_weights)
    weight_map = {}
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: hf_weights[n] for n in part}, sharded / shard)
        weight_map.update({n: shard for n in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_state_dict(torch.load(convert(single), weights_only=True), reference)
    assert_same_state_dict(torch.load(convert(sharded), weights_only=True), reference)


def test_converter_writes_to_another_folder(reference_folder, tmp_path):
    folder, reference = reference_folder
    out = convert(folder, tmp_path / "out")
    assert out == tmp_path / "out" / "model.pth" and (tmp_path / "out" / "config.json").exists()
    assert_same_state_dict(torch.load(out, weights_only=True), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_one_token_linear_is_a_gemv(dtype):
    # model.Linear: one token under torch.compile on CPU is multiply-and-sum (inductor's own GEMV kernel, no mm);
    # several tokens stay F.linear. Same numbers as F.linear to accumulation order either way.
    from torch._inductor.utils import run_and_get_code
    from model import Linear
    torch.manual_seed(0)
    linear = Linear(96, 40).to(dtype)
    try:
        for shape, one_token in [((1, 1, 96), True), ((1, 5, 96), False), ((3, 1, 96), False)]:
            torch._dynamo.reset()
            x = torch.randn(shape, dtype=dtype)
            got, code = run_and_get_code(torch.compile(linear, fullgraph=True), x)
            assert ("extern_kernels.mm" in "".join(code)) != one_token
            want = torch.nn.functional.linear(x.double(), linear.weight.double())
            assert got.shape == want.shape and got.dtype == dtype
            assert (got.double() - want).abs().max() <= (1e-4 if dtype == torch.float32 else 2e-2)
    finally:
        torch._dynamo.reset()


def test_one_token_linear_as_f_linear_matches_eager(monkeypatch):
    """cpu_linear's other choice: one-token linears as F.linear (prepacked by freezing in the main graph, an mm in
    FlexiDepth's torch.cond branches). A tiny FlexiDepth model decoded by the compiled step gives eager's logits,
    with routed layers both running and skipping."""
    import model
    from steps import compile_steps, forward_last
    monkeypatch.setattr(model, "ONE_TOKEN_LINEAR",
                        {("torch.float32", False): "linear", ("torch.float32", True): "linear"})
    tiny = tiny_model(routing_layers=[1, 2], router_dim=8, adapter_dim=12)
    tiny.setup_caches(1, 16)
    steps = compile_steps("cpu", False)
    try:
        ran = []
        for pos, token in enumerate([5, 17, 99, 3, 64, 42]):
            x, input_pos = torch.tensor([[token]]), torch.tensor([pos])
            want = forward_last(tiny, x, input_pos)  # eager: writes this position's K/V and routing record
            ran += [bool(layer.ran[0, pos]) for layer in tiny.layers[1:]]
            torch.testing.assert_close(steps.decode(tiny, x, input_pos), want, atol=1e-4, rtol=1e-4)
        assert any(ran) and not all(ran), ran  # both branches were exercised
    finally:
        torch._dynamo.reset()


def test_linear_choice_probe_is_cached_atomically(tmp_path, monkeypatch):
    import json
    import cpu_linear
    import model
    monkeypatch.setattr(model, "ONE_TOKEN_LINEAR", {})
    monkeypatch.setattr(model, "FEW_ROW_LINEAR", {})
    probes = []

    def fake_probe(dtype, mode):
        probes.append((dtype, mode))
        return {"graph": "linear", "branch": "gemv", "prefetch_l2": dtype == torch.bfloat16, "us_per_mb": {}}

    def fake_rows_probe(dtype, mode):
        probes.append((dtype, mode, "rows"))
        return {"rows": "kernel", "us_per_mb": {}}

    import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "set_prefetch_l2", lambda l2: setattr(cpu_kernels, "PREFETCH_L2", l2))
    monkeypatch.setattr(cpu_kernels, "PREFETCH_L2", None)
    path = tmp_path / "cache/one_token_linear.json"
    assert cpu_linear.choose(torch.bfloat16, None, path, fake_probe)["graph"] == "linear"
    assert model.ONE_TOKEN_LINEAR == {("torch.bfloat16", False): "linear", ("torch.bfloat16", True): "gemv"}
    assert cpu_kernels.PREFETCH_L2 is True  # the probe's prefetch level, for every kernel call
    assert model.FEW_ROW_LINEAR == {} and len(probes) == 1  # few rows wait for a step that has them
    assert cpu_linear.choose(torch.bfloat16, None, path, fake_probe)["branch"] == "gemv"  # read back, no probe
    assert len(probes) == 1 and cpu_linear.probe_key(torch.bfloat16) in json.loads(path.read_text())
    cpu_linear.choose_rows(torch.bfloat16, None, path, fake_rows_probe)  # its own entry beside it
    cpu_linear.choose_rows(torch.bfloat16, None, path, fake_rows_probe)
    assert model.FEW_ROW_LINEAR == {"torch.bfloat16": "kernel"} and probes[1:] == [(torch.bfloat16, None, "rows")]
    cpu_linear.choose(torch.float32, "max-autotune-no-cudagraphs", path, fake_probe)  # a third entry beside them
    assert len(probes) == 3 and len(json.loads(path.read_text())) == 3 and cpu_kernels.PREFETCH_L2 is False
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    before = path.read_text()

    def dies_half_way(self, text, **kwargs):
        with open(self, "w") as f:
            f.write(text[:10])
        raise OSError("disk full")

    monkeypatch.setattr(type(path), "write_text", dies_half_way)
    cpu_linear.choose(torch.float16, None, path, fake_probe)  # a cache that cannot be written costs only a probe
    assert path.read_text() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    monkeypatch.undo()
    monkeypatch.setattr(model, "ONE_TOKEN_LINEAR", {})
    path.write_text("{not json")  # a damaged cache is probed again and replaced
    cpu_linear.choose(torch.bfloat16, None, path, fake_probe)
    assert len(probes) == 5 and cpu_linear.probe_key(torch.bfloat16) in json.loads(path.read_text())


def test_one_process_probes_at_a_time(tmp_path, capsys):
    """Two processes that need the same probe on a new machine (a server and a CLI started together): one probes and
    the other waits for its result rather than timing the kernels under its load; the lock leaves no file behind.
    Two threads here, each taking the lock through its own open of the folder, as a process does."""
    import threading
    import time
    import cpu_linear
    path = tmp_path / "cache/one_token_linear.json"
    probes, results = [], []
    start_together = threading.Barrier(2)

    def slow_probe():
        probes.append(1)
        time.sleep(0.5)
        return {"graph": "kernel", "branch": "gemv"}

    def choose():
        start_together.wait()
        results.append(cpu_linear.measured("key", ("graph", "branch"), "bf16", slow_probe, path))

    threads = [threading.Thread(target=choose) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(probes) == 1 and results == [{"graph": "kernel", "branch": "gemv"}] * 2
    assert "waiting for another process timing the bf16 linear kernels" in capsys.readouterr().err
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_precompiled_header_is_named_once_per_machine(tmp_path, monkeypatch):
    """inductor preprocesses its C++ header in every process to name the header's precompiled file; the name is kept
    on disk, so a later process (a new wrapper over inductor's function) asks inductor only when the kept files are
    gone or the command differs."""
    import cpu_linear
    from torch._inductor import codecache
    calls = []

    def inductors(header, hashable_cmd_line, **compile_command):  # stands for codecache._precompile_header
        calls.append(hashable_cmd_line)
        named = tmp_path / f"header{len(calls)}.h"
        named.write_text("")
        (tmp_path / f"header{len(calls)}.h.gch").write_text("")
        return str(named)

    path = tmp_path / "precompiled_headers.json"

    def new_process():
        monkeypatch.setattr(codecache, "_precompile_header", inductors)
        assert cpu_linear.reuse_precompiled_header(path)
        return codecache._precompile_header

    first = new_process()("torch/csrc/inductor/cpp_prefix.h", "g++ -O3", vec_isa="avx512")
    assert calls == ["g++ -O3"]
    assert new_process()("torch/csrc/inductor/cpp_prefix.h", "g++ -O3", vec_isa="avx512") == first
    assert len(calls) == 1  # read back: inductor not asked
    new_process()("torch/csrc/inductor/cpp_prefix.h", "g++ -O2", vec_isa="avx512")
    assert len(calls) == 2  # another command: asked
    (tmp_path / "header1.h.gch").unlink()
    assert new_process()("torch/csrc/inductor/cpp_prefix.h", "g++ -O3", vec_isa="avx512") != first
    assert len(calls) == 3  # the precompiled file is gone: asked again


def test_vector_isa_check_runs_once_per_machine(tmp_path, monkeypatch):
    """inductor's check of the compiler's vector instruction sets runs in the first process only, and there only for
    the set inductor will build with where that one builds; later processes tell inductor it passes, but only where
    the kept answer is every set the CPU reports (what inductor then assumes)."""
    import json
    import cpu_linear
    from torch._inductor import config as inductor_config, cpu_vec_isa
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
    cpu_flags = cpu_vec_isa.x86_isa_checker()
    reported = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in cpu_flags for f in str(isa).split())]
    if not reported:
        pytest.skip("the CPU reports no x86 vector set")
    builds, checks = [], []
    monkeypatch.setattr(type(reported[0]), "__bool__", lambda isa: builds.append(str(isa)) or True)
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: checks.append(1) or reported)
    path = tmp_path / "vector_isa.json"
    assert cpu_linear.reuse_vector_isa_check(path) and inductor_config.cpp.vec_isa_ok is True
    assert builds == [str(reported[0])] and checks == []  # the first set built: the others are not
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
    assert cpu_linear.reuse_vector_isa_check(path) and len(builds) == 1  # read back: no check
    (key,) = json.loads(path.read_text())
    path.write_text(json.dumps({key: ["a set this compiler could not build"]}))  # the check found less: no shortcut
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
    assert not cpu_linear.reuse_vector_isa_check(path) and inductor_config.cpp.vec_isa_ok is None
    monkeypatch.setattr(type(reported[0]), "__bool__", lambda isa: bool(builds.append(str(isa))))
    path.write_text("{not json")  # a damaged cache is checked again; the first set fails, so every set is checked
    assert cpu_linear.reuse_vector_isa_check(path) and len(builds) == 2 and checks == [1]
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", False)  # TORCHINDUCTOR_VEC_ISA_OK=0: the user decides
    assert not cpu_linear.reuse_vector_isa_check(path) and inductor_config.cpp.vec_isa_ok is False


def test_linear_probe_times_every_kind_while_the_kernels_build(monkeypatch):
    """The real probe on a tiny model: its decode step with the GEMV and with the kernel is compiled and timed (the
    kernel once its build, started on a thread at the probe's start, has finished; F.linear instead where the
    kernels cannot build), F.linear against the kernel in FEW_ROWS rows (the verify), and, where F.linear won the
    graph, every kind inside FlexiDepth's branches; the linear tables and the prefetch level are left as found."""
    import math
    import cpu_kernels
    import cpu_linear
    import model
    monkeypatch.setattr(cpu_linear, "PROBE_ARGS", dict(vocab_size=128, dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                                                       intermediate_size=96, tie_embeddings=True))
    monkeypatch.setattr(cpu_linear, "PROBE_LAYERS", 1)
    monkeypatch.setattr(cpu_linear, "PROBE_ROUNDS", 2)
    monkeypatch.setattr(cpu_linear, "MARGIN", math.inf)  # the default keeps the graph: no torch.cond branch probe
    prefetch_l2 = cpu_kernels.PREFETCH_L2
    tables = dict(model.ONE_TOKEN_LINEAR), dict(model.FEW_ROW_LINEAR)
    try:
        entry, rows = cpu_linear.probe(torch.float32), cpu_linear.probe_rows(torch.float32)
        branch = cpu_linear.time_kinds(["gemv"], torch.float32, graph="linear")
    finally:
        torch._dynamo.reset()
    built = cpu_kernels.load()
    default = "kernel" if built else "gemv"
    assert entry["graph"] == entry["branch"] == default and "branch" not in entry["us_per_mb"]
    # the kernel timed at both prefetch levels (F.linear only where the kernels cannot build), and the state it
    # found left as it was
    other = ["kernel", "kernel-l2"] if built else ["linear"] * (not cpu_kernels.will_try())
    assert sorted(entry["us_per_mb"]["graph"]) == sorted(["gemv"] + other)
    graph = entry["us_per_mb"]["graph"]
    assert entry["prefetch_l2"] == (built and graph["kernel-l2"] < graph["kernel"])
    assert cpu_kernels.PREFETCH_L2 == prefetch_l2
    assert (dict(model.ONE_TOKEN_LINEAR), dict(model.FEW_ROW_LINEAR)) == tables
    assert rows["rows"] in (("linear", "kernel") if built else ("linear",))
    assert (sorted(rows["us_per_mb"]["rows"]) == ["kernel", "kernel-l2", "linear"]) if built \
        else rows["us_per_mb"] == {}
    assert list(branch) == ["gemv"]
    times = [t for probed in (entry, rows) for context in probed["us_per_mb"].values() for t in context.values()]
    assert all(0 < t < math.inf for t in times + list(branch.values())), entry


def test_linear_probe_times_branches_only_where_f_linear_wins_the_graph(monkeypatch):
    """The main graph's candidates are the GEMV and the kernel, or the GEMV and F.linear where the kernels cannot
    build; the kernel where timed (else the GEMV) is kept unless another kind is MARGIN faster. FlexiDepth's
    torch.cond branches are timed only where F.linear wins the main graph (it loses freezing's prepacking in a
    branch); where the GEMV or the kernel wins, a branch takes the same, which runs there as it runs in the graph."""
    import cpu_linear
    for kernels, graph_times, branch_times, want in (
            (True, {"gemv": 50.0, "kernel": 40.0, "kernel-l2": 45.0}, None, ("kernel", "kernel")),
            (True, {"gemv": 48.0, "kernel": 49.0, "kernel-l2": 50.0}, None, ("kernel", "kernel")),  # within MARGIN
            (True, {"gemv": 45.0, "kernel": 49.0, "kernel-l2": 48.0}, None, ("gemv", "gemv")),
            (False, {"gemv": 50.0, "linear": 60.0}, None, ("gemv", "gemv")),
            (False, {"gemv": 50.0, "linear": 30.0}, {"gemv": 50.0, "linear": 90.0}, ("linear", "gemv"))):
        timed = []

        def fake_time_kinds(kinds, dtype, mode=None, graph=None, **_):
            in_branch = graph is not None
            timed.append((in_branch, kinds))
            return dict(branch_times if in_branch else graph_times)
        monkeypatch.setattr(cpu_linear, "time_kinds", fake_time_kinds)
        monkeypatch.setattr(cpu_linear.cpu_kernels, "will_try", lambda: kernels)
        monkeypatch.setattr(cpu_linear.cpu_kernels, "load", lambda: kernels)
        entry = cpu_linear.probe(torch.bfloat16)
        assert (entry["graph"], entry["branch"]) == want
        # F.linear is timed in the graph only where the kernels cannot build
        assert timed[0] == (False, ["gemv", "kernel"] if kernels else ["gemv", "linear"])
        assert [in_branch for in_branch, _ in timed] == ([False, True] if branch_times else [False])
        assert ("branch" in entry["us_per_mb"]) == bool(branch_times)
        assert entry["prefetch_l2"] == (graph_times.get("kernel-l2", 1e9) < graph_times.get("kernel", 1e9))


def test_linear_probe_reads_past_the_largest_cache(tmp_path):
    """Between timed calls the probe reads twice the largest cache sysfs reports, so that its weights come from
    memory as a model's do (a Xeon here reports 480 MiB of L3, which would hold the whole 78 MB probe)."""
    import cpu_linear
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "491520K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert cpu_linear.evicting_bytes(tmp_path) == 2 * 480 << 20
    (tmp_path / "index3" / "size").write_text("2G\n")
    assert cpu_linear.evicting_bytes(tmp_path) == 2 << 30  # at most 2 GiB
    assert cpu_linear.evicting_bytes(tmp_path / "absent") == 2 * cpu_linear.ASSUMED_CACHE_BYTES


@pytest.mark.parametrize("T", [1, 3, 8])
def test_few_token_attention_matches_sdpa(T):
    """The decode/verify attention written as two reductions equals SDPA with GQA and the causal cache mask, including
    cache slots past the queries that the mask hides."""
    from model import few_token_attention
    gen = torch.Generator().manual_seed(T)
    B, H, KV, S, D, start = 1, 6, 2, 20, 16, 5
    q = torch.randn(B, H, T, D, generator=gen)
    k, v = torch.randn(B, KV, S, D, generator=gen), torch.randn(B, KV, S, D, generator=gen)
    positions = torch.arange(start, start + T)
    mask = (torch.arange(S)[None, :] <= positions[:, None])[None, None]  # [1, 1, T, S]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(few_token_attention(q, k, v, mask), want, atol=1e-5, rtol=1e-5)


def compiled_tiny_decode(vocab_size: int = 64) -> tuple:
    """(compiled logits, eager logits, generated code) of one bf16 decode step of a one-layer model, compiled as the
    one-token steps are (unfrozen); head_dim 64 as SmolLM2's: a bf16 vector is 32 lanes, so each rope half is one."""
    from torch._inductor.utils import run_and_get_code
    from model import Transformer
    from steps import UNFROZEN, forward_last
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=vocab_size, dim=128, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=64,
                     intermediate_size=64)
    tiny = Transformer(args).to(torch.bfloat16).eval().requires_grad_(False)
    tiny.setup_caches(1, 32)
    x, pos = torch.tensor([[3]]), torch.tensor([5])
    try:
        torch._dynamo.reset()
        step = torch.compile(forward_last, fullgraph=True, dynamic=False, options=UNFROZEN)
        with torch.no_grad():
            got, code = run_and_get_code(step, tiny, x, pos)
            want = forward_last(tiny, x, pos)
    finally:
        torch._dynamo.reset()
    return got, want, "".join(code)


def test_compiled_one_token_rope_loads_whole_vectors():
    """Inductor may compute the query's rope inside the attention loop, once per cache slot. Its two halves must come
    in as whole vector loads: swapped with roll, their index was modular and inductor gathered it element by
    element into a temporary array (`tmpbuf` in the C++), which made int4 decode 1.3x slower (BENCHMARKS.md)."""
    got, want, code = compiled_tiny_decode()
    assert "softmax" in code and "scaled_dot_product" not in code  # the attention is inductor's own C++
    assert "tmpbuf" not in code
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def gemv_row_loops(code: str, rows: int) -> list:
    """The bodies of the parallel loops over `rows` weight rows, one row an iteration: the GEMVs."""
    head = f"x0<static_cast<int64_t>({rows}L); x0+=static_cast<int64_t>(1L))"
    return [part.split("#pragma omp", 1)[0] for part in code.split("#pragma omp for")[1:]
            if head in part.split("\n")[1]]


def test_compiled_one_token_gemv_reads_the_normed_input_once(monkeypatch):
    """The RMSNorm before the lm head (and wq/wk/wv, w1/w3) is computed once and read back by the GEMV, which reads
    it once per weight row: inductor recomputed it inside the row loop (compile_steps' realize threshold), and the
    head's GEMV took 1.85x as long on a Xeon (BENCHMARKS.md)."""
    import model
    from steps import compile_steps
    compile_steps("cpu", False)  # inductor's settings
    monkeypatch.setitem(model.ONE_TOKEN_LINEAR, (str(torch.bfloat16), False), "gemv")  # whatever this CPU's probe chose
    vocab = 96  # no other loop has 96 rows
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # on one thread inductor writes no parallel loop
    try:
        got, want, code = compiled_tiny_decode(vocab)
    finally:
        torch.set_num_threads(threads)
    (head,) = gemv_row_loops(code, vocab)
    assert "sqrt" not in head and "tmp_acc0_vec" in head  # a reduction over the row, the norm's rsqrt outside
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
