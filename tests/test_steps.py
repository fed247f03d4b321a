"""steps.py: warm_up compiles each step shape before anything is timed, and says whether it compiled anything."""
import argparse

import pytest
import torch

from conftest import PROMPT, greedy, restore_compile_settings, tiny_model
from figures import merge_stats, print_stats
from generate import cache_length_needed, generate
from model import ModelArgs, Transformer
from steps import Steps

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(vocab_size=256)


def generate_tiny(model, steps, **spec):
    model.setup_caches(1, cache_length_needed(len(PROMPT), NEW_TOKENS, spec.get("speculate_k", 0)))
    return generate(model, PROMPT, NEW_TOKENS, steps=steps, **spec)[1]


def test_compile_line_only_when_this_call_compiled(tiny, capsys):
    """The figures say "compile and warm-up" only for a generate() call whose warm_up compiled something: not for
    eager steps, nor for a call whose step shapes an earlier one (the CLI's own warm_up, a previous sample) made."""
    eager = generate_tiny(tiny, Steps())
    # eager functions marked compiled: warm_up's bookkeeping without the compile time
    marked = Steps(compiled=True)
    first, again = generate_tiny(tiny, marked), generate_tiny(tiny, marked)
    assert eager.compile_seconds is None and again.compile_seconds is None
    assert first.compile_seconds is not None
    assert merge_stats([eager, again]).compile_seconds is None
    assert merge_stats([eager, first, again]).compile_seconds == first.compile_seconds
    cli_args = argparse.Namespace(compile=True, speculate_k=None)
    for stats, shown in ((eager, False), (again, False), (first, True)):
        print_stats(stats, tiny, cli_args, "cpu", 0.5)
        assert ("compile and warm-up:" in capsys.readouterr().out) == shown


def tiny_draft():
    torch.manual_seed(3)
    args = ModelArgs(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, intermediate_size=48)
    return Transformer(args).eval().requires_grad_(False)


@pytest.mark.parametrize("bounded", [False, True], ids=["whole_cache", "bounded"])
@pytest.mark.parametrize("spec", [{}, dict(early_exit=1, speculate_k=2), dict(draft_model=True, speculate_k=2)],
                         ids=["plain", "self_speculative", "draft_model"])
def test_no_compiling_in_the_timed_loop(tiny, monkeypatch, spec, bounded):
    """After warm_up, generate() compiles nothing: its decode loop runs only graphs warm_up made, with the same
    shapes, constants and grad mode. A step shape warm_up misses would be compiled inside the timed loop. Bounded
    (chat's and the server's steps, a cache of the whole context), the slots each step reads grow by a token or more
    a step: one graph serves them all. The tokens are eager's."""
    from torch._dynamo.utils import counters
    from steps import compile_steps, warm_up
    restore_compile_settings(monkeypatch)
    torch._dynamo.reset()
    spec = dict(spec, draft_model=tiny_draft()) if spec.get("draft_model") else spec
    try:
        steps = compile_steps("cpu", compile_prefill=False, bounded=bounded)
        for m in (tiny, spec.get("draft_model")):
            if m is not None:  # bounded: a cache of twice what the run needs, as chat's is longer than a turn
                m.setup_caches(1, (2 if bounded else 1) * cache_length_needed(len(PROMPT), NEW_TOKENS,
                                                                           spec.get("speculate_k", 0)))
        counters.clear()
        warm_up(tiny, steps, len(PROMPT), **spec)
        assert counters["stats"]["unique_graphs"] > 0  # the counters see compiling at all
        counters.clear()
        # the cache warm_up saw, as in the CLI
        tokens, stats = generate(tiny, PROMPT, NEW_TOKENS, steps=steps, **spec)
        assert stats.compile_seconds is None
        assert counters["stats"]["unique_graphs"] == 0, {name: dict(c) for name, c in counters.items()}
        assert tokens.tolist() == generate(tiny, PROMPT, NEW_TOKENS, steps=Steps(bounded=False), **spec)[0].tolist()
    finally:
        torch._dynamo.reset()


def test_bounded_steps_read_no_slot_past_their_position(tiny, monkeypatch):
    """Bounded steps (compile_steps(bounded=True): chat, the server) read only the cache slots up to their last
    position. With NaN in every slot past it, the compiled decode and verify give the logits of a clean cache, at
    several positions, from the one graph warm_up compiled; a step that reads the whole cache gives NaN."""
    from torch._dynamo.utils import counters
    from steps import compile_steps, forward_last, live_slots, verify_step, warm_up
    restore_compile_settings(monkeypatch)
    torch._dynamo.reset()
    tokens = [5, 7, 9, 11, 13, 17, 19, 23, 29, 31]
    try:
        steps = compile_steps("cpu", compile_prefill=False, bounded=True)
        tiny.setup_caches(1, 32)
        with torch.no_grad():
            warm_up(tiny, steps, 1)
            warm_up(tiny, steps, 1, speculate_k=2, early_exit=1)
            counters.clear()
            forward_last(tiny, torch.tensor([tokens]), torch.arange(10))  # a clean cache at positions 0..9
            caches = [(layer.attention.kv_cache.k_cache.clone(), layer.attention.kv_cache.v_cache.clone())
                      for layer in tiny.layers]
            hidden = torch.randn(1, 3, tiny.args.dim)
            for p in (2, 5, 7):
                x, pos = torch.tensor([[tokens[p]]]), torch.tensor([p])
                rows, last = torch.arange(p, p + 3), torch.tensor([2])
                want = forward_last(tiny, x, pos), verify_step(tiny, x, last, hidden, rows, 1)
                for layer in tiny.layers:
                    layer.attention.kv_cache.k_cache[:, :, p + 3:] = float("nan")
                    layer.attention.kv_cache.v_cache[:, :, p + 3:] = float("nan")
                got = (steps.decode(tiny, x, pos, slots=live_slots(tiny, steps, p + 1)),
                       steps.verify(tiny, x, last, hidden, rows, 1, live_slots(tiny, steps, p + 3)))
                torch.testing.assert_close(got, want)
                assert forward_last(tiny, x, pos).isnan().all()  # the NaN are there for a step that reads them
                for layer, (k, v) in zip(tiny.layers, caches):
                    layer.attention.kv_cache.k_cache.copy_(k)
                    layer.attention.kv_cache.v_cache.copy_(v)
        assert counters["stats"]["unique_graphs"] == 0, {name: dict(c) for name, c in counters.items()}
    finally:
        torch._dynamo.reset()


def test_one_set_of_steps_serves_two_models_after_checked_guards():
    """generate() checks only the guards that tell cached graphs apart once every step has run with all of them
    (steps.checked_once). Compiled steps hold a model's weights (freezing), so a second model of the same shapes
    decoded by the same steps must still get its own graph, plain and self-speculative, and its own tokens."""
    from steps import compile_steps
    models = [tiny_model(vocab_size=256, seed=seed) for seed in (1, 2)]
    steps = compile_steps("cpu", False)
    try:
        for spec in ({}, dict(early_exit=1, speculate_k=2)):
            for model in models + models:  # back and forth: both graphs cached
                model.setup_caches(1, cache_length_needed(len(PROMPT), NEW_TOKENS, spec.get("speculate_k", 0)))
                want = generate(model, PROMPT, NEW_TOKENS, steps=Steps(), **spec)[0]
                got = generate(model, PROMPT, NEW_TOKENS, steps=steps, **spec)[0]
                assert got.tolist() == want.tolist()
        assert generate(models[0], PROMPT, NEW_TOKENS)[0].tolist() != generate(models[1], PROMPT, NEW_TOKENS)[0].tolist()
    finally:
        torch._dynamo.reset()


def test_one_token_steps_compile_unfrozen_so_their_graphs_are_cached(tiny):
    """Decode with GEMV linears compiles without freezing: AOTAutograd caches the graph (a frozen one it bypasses,
    and every start traced and froze it again). The verify keeps freezing."""
    from torch._dynamo.utils import counters
    from steps import compile_steps, one_token_compile_args
    assert one_token_compile_args("linear", {"frozen": True}) == {"frozen": True}
    assert one_token_compile_args("gemv", {})["options"] == {"freezing": False, "size_asserts": False}
    steps = compile_steps("cpu", False)
    tiny.setup_caches(1, 16)
    counters.clear()
    try:
        with torch.no_grad():
            steps.decode(tiny, torch.tensor([[3]]), torch.tensor([0]))
        assert counters["aot_autograd"]["autograd_cache_bypass"] == 0, dict(counters["aot_autograd"])
        assert counters["aot_autograd"]["total"] == 1
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["gemv", "kernel"])
def test_flexidepth_steps_load_from_the_cache_and_decode_the_same(monkeypatch, tmp_path, kind):
    """inductor's and AOTAutograd's caches refuse a graph that holds a torch.cond unless compile_steps marks it
    cacheable: FlexiDepth's decode then loads from the cache in a later process (here: after a reset), with the
    Python wrapper (the GEMV) and the C++ one (the CPU kernels), and the graph loaded decodes the tokens of the one
    compiled."""
    import cpu_kernels
    import model
    from torch._dynamo.utils import counters
    from steps import compile_steps
    if kind == "kernel":
        if not cpu_kernels.load():
            pytest.skip("the CPU kernels need AVX-512 and a C++ compiler")
        monkeypatch.setattr(model, "ONE_TOKEN_LINEAR",
                            {("torch.float32", False): "kernel", ("torch.float32", True): "kernel"})
    restore_compile_settings(monkeypatch)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    routed = tiny_model(vocab_size=256, routing_layers=[1, 2], router_dim=8, adapter_dim=12)
    runs = []
    try:
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            tokens, _ = greedy(routed, PROMPT, NEW_TOKENS, steps=compile_steps("cpu", False, one_token_kind=kind))
            runs.append((tokens, counters["inductor"].copy(), counters["aot_autograd"].copy()))
    finally:
        torch._dynamo.reset()
    (first, compiled, _), (second, loaded, aot_loaded) = runs
    assert compiled["fxgraph_cache_miss"] == 1 and compiled["fxgraph_cache_bypass"] == 0, compiled
    assert loaded["fxgraph_cache_hit"] == 1 and loaded["fxgraph_cache_miss"] == 0, loaded
    assert aot_loaded["autograd_cache_hit"] == 1, aot_loaded
    assert first == second


def test_capped_kernel_groups_are_part_of_the_cache_key(monkeypatch):
    """compile_steps caps inductor's CPU kernel groups, a class constant its caches are not keyed on, so it tags the
    cache key too (once, however often it is called, and after a tag of the user's own)."""
    from torch._inductor.codegen.cpp import CppScheduling
    from steps import CACHE_KEY_TAG, KERNEL_GROUP_ARGS, compile_steps
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "users-own")
    compile_steps("cpu", False)
    compile_steps("cpu", False)
    assert torch.compiler.config.cache_key_tag == "users-own" + CACHE_KEY_TAG
    assert CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM == KERNEL_GROUP_ARGS


def test_few_row_probe_waits_for_a_step_with_few_rows(tiny, monkeypatch):
    """A machine's first plain decode does not pay for the few-row probe (8 s on 2 cores): compile_steps probes one
    row at once, and the rows only before the first verify or compiled prefill (whose traces read the choice)."""
    import cpu_linear
    import steps as steps_module
    probed = []
    monkeypatch.setattr(cpu_linear, "choose", lambda dtype, mode: probed.append("one row"))
    monkeypatch.setattr(cpu_linear, "choose_rows", lambda dtype, mode: probed.append("rows"))
    monkeypatch.setattr(steps_module, "compile_one_token", lambda step, **kwargs: step)
    monkeypatch.setattr(torch, "compile", lambda step, **kwargs: step)  # eager: only the order of calls matters
    steps = steps_module.compile_steps("cpu", True, torch.float32)
    tiny.setup_caches(1, 16)
    with torch.no_grad():
        steps.decode(tiny, torch.tensor([[3]]), torch.tensor([0]))
        assert probed == ["one row"]
        for _ in range(2):
            steps.verify_full(tiny, torch.tensor([[3, 4]]), torch.tensor([1, 2]))
            steps.prefill(tiny, torch.tensor([[3, 4]]), torch.tensor([0, 1]))
    assert probed == ["one row", "rows", "rows"]  # once per step


@pytest.mark.parametrize("kind", ["gemv", "kernel"])
def test_regional_steps_trace_the_repeated_block_once(tiny, monkeypatch, kind):
    """Regional one-token steps (model.run_layers, generate.py --compile_regional): every plain layer calls one
    subgraph, traced once, so compiling takes one layer's time, not n_layers'. A guard the region cannot rebuild
    (a torch.dtype key in model.ONE_TOKEN_LINEAR, say) makes dynamo raise here; a region per layer would show
    several subgraphs."""
    import functools
    import torch._inductor.config as inductor_config
    import model
    from steps import forward_last
    monkeypatch.setattr(model, "ONE_TOKEN_LINEAR", {(str(torch.float32), False): kind})
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    tiny.setup_caches(1, 16)
    torch._dynamo.reset()
    try:
        for regional in (True, False):
            compiled = torch.compile(functools.partial(forward_last, regional=regional), backend=keep_graph,
                                     fullgraph=True)
            with torch.no_grad(), inductor_config.patch(freezing=False):
                got = compiled(tiny, torch.tensor([[3]]), torch.tensor([0]))
            torch.testing.assert_close(got, forward_last(tiny, torch.tensor([[3]]), torch.tensor([0])))
    finally:
        torch._dynamo.reset()
    calls = [[node.args[0].target for node in gm.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]
             for gm in graphs]
    assert len(calls[0]) == tiny.args.n_layers and len(set(calls[0])) == 1, calls
    assert calls[1] == []  # not regional: the layers inlined into one graph


def test_regional_steps_decode_and_draft_as_eager(tiny):
    """compile_steps(regional=True) (generate.py --compile_regional): the one-token steps through inductor, the
    repeated block compiled once, give eager's logits, and the draft's logits and hidden states at two exits."""
    from steps import compile_steps, draft_step, forward_last
    steps = compile_steps("cpu", False, regional=True)
    tiny.setup_caches(1, 16)
    x, pos = torch.tensor([[3]]), torch.tensor([0])
    try:
        with torch.no_grad():
            torch.testing.assert_close(steps.decode(tiny, x, pos), forward_last(tiny, x, pos))
            for early_exit in (1, 2):
                got, want = steps.draft(tiny, x, pos, early_exit), draft_step(tiny, x, pos, early_exit)
                torch.testing.assert_close(got, want)
    finally:
        torch._dynamo.reset()


def test_kernel_groups_end_at_layer_ends(monkeypatch):
    """compile_steps ends inductor's CPU kernel groups at each layer's end (steps.end_kernel_groups_at_layer_ends), so
    that the layers share C++ functions, each compiled once: the GEMV decode of an 8-layer model calls one function
    per layer, and from the third layer on two functions alternate (inductor reuses a buffer in place every other
    layer). Groups capped by arguments alone straddle layers, and all differ. The logits stay eager's."""
    import re
    import model
    from torch._inductor.utils import run_and_get_code
    from steps import compile_steps, forward_last, one_token_compile_args, own_code
    eight = tiny_model(vocab_size=256, n_layers=8)
    eight.setup_caches(1, 16)
    monkeypatch.setattr(model, "ONE_TOKEN_LINEAR", {(str(torch.float32), False): "gemv"})
    compile_steps("cpu", False)
    decode = torch.compile(own_code(forward_last, "decode_grouped_by_layer"), **one_token_compile_args("gemv", {}))
    x, pos = torch.tensor([[3]]), torch.tensor([0])
    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch.compiler.config.patch(force_disable_caches=True):
            got, (code,) = run_and_get_code(decode, eight, x, pos)
            torch.testing.assert_close(got, forward_last(eight, x, pos))
    finally:
        torch._dynamo.reset()
    calls = re.findall(r"\n\s+(cpp_fused\w+)\(", code[code.index("def call"):])
    assert len(calls) == eight.args.n_layers, calls
    assert all(calls[i] == calls[i - 2] for i in range(4, eight.args.n_layers - 1)) and len(set(calls)) == 5, calls


def test_dynamic_prefill_compiles_in_one_pass(tiny, monkeypatch):
    """The prefill compiles with dynamic shapes; its float argument (skip_threshold) is specialized from the start
    (compile_steps), so dynamo does not trace and lower the whole graph, then restart with the float specialized (22
    s of an 80 s cold prefill compile of SmolLM2 on 2 cores). Its logits stay eager's."""
    import torch._dynamo.convert_frame as convert_frame
    from steps import compile_steps, forward_last
    logged = []
    monkeypatch.setattr(convert_frame.log, "info", lambda msg, *args, **kwargs: logged.append(str(msg) % args))
    steps = compile_steps("cpu", True)
    tiny.setup_caches(1, 16)
    tokens, pos = torch.tensor([[3, 4, 5, 6]]), torch.arange(4)
    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch.compiler.config.patch(force_disable_caches=True):
            got = steps.prefill(tiny, tokens, pos)
            torch.testing.assert_close(got, forward_last(tiny, tokens, pos))
    finally:
        torch._dynamo.reset()
    assert not [line for line in logged if "Restarting analysis" in line], logged
