"""cpu_kernels.cpp against the paths it replaces: F.linear for bf16/fp32 weights, torch's int8 and int4 kernels and
the dequantized weight for quantized ones; and compiled models that call it against eager ones."""
import re

import pytest
import torch
import torch.nn.functional as F

import cpu_kernels
from conftest import greedy, tiny_model

pytestmark = pytest.mark.skipif(not cpu_kernels.load(), reason="the CPU kernels need AVX-512 and a C++ compiler")

ROWS = (1, 2, 3, 5, 8)


def tolerance(dtype):
    # bf16 results are rounded to bf16 once (relative 2^-8); fp32 differ from F.linear only in summation order
    return dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=8e-3)


def ran_kernel(fn, name):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.name == f"flexfast::{name}" for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
def test_dense_matches_f_linear(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    for N, K in ((4, 32), (96, 64), (200, 160)):
        w = torch.randn(N, K, generator=gen).to(dtype)
        x = torch.randn(1, rows, K, generator=gen).to(dtype)
        got = cpu_kernels.linear(x, [w])
        assert got.shape == (1, rows, N) and got.dtype == dtype
        torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), **tolerance(dtype))
        # a non-contiguous x (a slice, as compiled graphs may pass) reads the same values
        wide = torch.randn(rows, 2 * K, generator=gen).to(dtype)
        torch.testing.assert_close(cpu_kernels.linear(wide[:, ::2], [w]).float(),
                                   F.linear(wide[:, ::2].float(), w.float()), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", (1, 3, 8))
def test_weights_in_one_call_match_one_linear_of_the_joined_weights(dtype, rows):
    gen = torch.Generator().manual_seed(20 + rows)
    ws = [torch.randn(n, 64, generator=gen).to(dtype) for n in (96, 32, 4)]  # wq, wk, wv of unequal heights
    x = torch.randn(1, rows, 64, generator=gen).to(dtype)
    got = cpu_kernels.linear(x, ws)
    assert got.shape == (1, rows, 132) and got.dtype == dtype
    torch.testing.assert_close(got.float(), F.linear(x.float(), torch.cat(ws).float()), **tolerance(dtype))
    with pytest.raises(RuntimeError, match="one dtype and K"):
        cpu_kernels.linear(x, [ws[0], torch.randn(8, 32).to(dtype)])


def int16_rows(x):
    """x as the int8 kernel sees it: each row rounded to int16 with scale max|x| / 32767."""
    scale = x.float().abs().amax(-1, keepdim=True) / 32767
    return torch.round(x.float() / scale.clamp(min=1e-30)) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
def test_int8_matches_torch_and_dequantized(dtype, rows):
    from quantize import dequantize_int8, quantize_int8
    gen = torch.Generator().manual_seed(10 + rows)
    w = torch.randn(100, 96, generator=gen).to(dtype)
    q, scales = quantize_int8(w)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    x[:, 7] *= 30  # an outlier column, as hidden states have: the rows' scale follows it
    got = cpu_kernels.linear_int8(x, [q], [scales])
    weight = dequantize_int8(q, scales)
    # exactly the int16-rounded x times the dequantized weight, up to summation order
    torch.testing.assert_close(got.float(), F.linear(int16_rows(x), weight), **tolerance(dtype))
    # against exact x, the rounding moves each output by at most half a step of x times its row of |w|
    bound = weight.abs().sum(-1) * (x.float().abs().amax(-1, keepdim=True) / 32767 / 2)
    assert ((got.float() - F.linear(x.float(), weight)).abs() <= bound + tolerance(dtype)["atol"]
            + tolerance(dtype)["rtol"] * F.linear(x.float(), weight).abs()).all()
    torch.testing.assert_close(got.float(), torch._weight_int8pack_mm(x, q, scales).float(),
                               atol=bound.max().item() + tolerance(dtype)["atol"], rtol=tolerance(dtype)["rtol"])


@pytest.mark.parametrize("rows", (1, 3))
def test_int8_sums_past_one_int32_chunk(rows):
    """Columns past the kernel's first 4096 (INT16_CHUNK) are summed in a second int32 sum: a Llama 3 8B w2 has
    14336. Every weight and x at the int range's edge: one int32 over all columns would overflow."""
    K = 4096 * 2 + 64
    q = torch.full((8, K), -128, dtype=torch.int8)
    q[1::2] = 127
    scales = torch.full((8,), 1e-3)
    x = torch.full((rows, K), -2.0)
    got = cpu_kernels.linear_int8(x, [q], [scales])
    want = x.double() @ (q.double() * scales.double()[:, None]).T
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def int8_blocks(x):
    """x as the int4 kernel sees it: rounded to int8 in blocks of 32 columns, each with scale max|x| / 127."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / scale.clamp(min=1e-30)) * scale).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groupsize", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", (1, 2, 3, 8))
def test_int4_matches_torch_and_dequantized(dtype, groupsize, rows):
    from quantize import Int4Linear, dequantize_int4, quantize_int4
    gen = torch.Generator().manual_seed(groupsize + rows)
    N, K = 64, 576 if groupsize <= 64 else 768  # SmolLM2's K where it divides into the groups
    w = torch.randn(N, K, generator=gen).to(dtype)
    nibbles, scales, zeros = quantize_int4(w, groupsize)
    x = torch.randn(1, rows, K, generator=gen).to(dtype)
    x[0, 0, :32] = 0  # an all-zero block
    interleaved, scales_zeros = cpu_kernels.interleave_int4(nibbles, scales, zeros)
    got = cpu_kernels.linear_int4(x, [interleaved], [scales_zeros]).float()
    weight = dequantize_int4(nibbles, scales, zeros)
    # the scheme exactly: x rounded to int8 per block of 32
    torch.testing.assert_close(got, F.linear(int8_blocks(x), weight), **tolerance(dtype))
    # against exact x, and torch's own CPU int4 kernel (as Int4Linear calls it for more rows than the kernel takes),
    # the rounding of x costs well under 2% of the output's range
    exact = F.linear(x.float(), weight)
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    linear = Int4Linear(K, N, groupsize)
    linear.weight.data, linear.scales.data, linear.zeros.data = nibbles, scales, zeros
    linear.pack()
    x_many = torch.cat([x] * (cpu_kernels.MAX_ROWS // rows + 1), dim=1)
    torch_rows, used_kernel = ran_kernel(lambda: linear(x_many), "linear_int4")
    assert not used_kernel
    kernel_rows, used_kernel = ran_kernel(lambda: linear(x), "linear_int4")
    assert used_kernel and torch.equal(kernel_rows.float(), got)
    assert (got - torch_rows[:, :rows].float()).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_weights_in_one_call_match_one_call_each(mode):
    """model.linears on quantized modules (wq/wk/wv of unequal heights): one kernel call, each output as its own
    module's call gives it."""
    from model import linears
    from quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8
    gen = torch.Generator().manual_seed(3)
    modules = []
    for n in (96, 32, 32):
        w = torch.randn(n, 128, generator=gen).to(torch.bfloat16)
        if mode == "int8":
            m = Int8Linear(128, n)
            m.weight.data, m.scales.data = quantize_int8(w)
        else:
            m = Int4Linear(128, n, 32)
            m.weight.data, m.scales.data, m.zeros.data = quantize_int4(w, 32)
            m.pack()  # on CPU it keeps the nibbles the kernel reads
        modules.append(m)
    x = torch.randn(1, 2, 128, generator=gen).to(torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        together = linears(x, tuple(modules))
    assert sum(e.name == f"flexfast::linear_{mode}" for e in prof.events()) == 1  # one call for all three
    assert [t.shape[-1] for t in together] == [96, 32, 32]
    for got, m in zip(together, modules):
        torch.testing.assert_close(got, m(x), atol=0, rtol=0)


def int4_module(n, k, gen, dtype=torch.bfloat16):
    """An Int4Linear of a random weight, packed for CPU, and its dequantized weight (fp32)."""
    from quantize import Int4Linear, dequantize_int4, quantize_int4
    m = Int4Linear(k, n, 32)
    m.weight.data, m.scales.data, m.zeros.data = quantize_int4((0.1 * torch.randn(n, k, generator=gen)).to(dtype), 32)
    dense = dequantize_int4(m.weight, m.scales, m.zeros).float()
    m.pack()  # on CPU it keeps the nibbles the kernel reads
    return m, dense


def int8_module(n, k, gen, dtype=torch.bfloat16):
    """An Int8Linear of a random weight, and its dequantized weight (fp32)."""
    from quantize import Int8Linear, dequantize_int8, quantize_int8
    m = Int8Linear(k, n)
    m.weight.data, m.scales.data = quantize_int8((0.1 * torch.randn(n, k, generator=gen)).to(dtype))
    return m, dequantize_int8(m.weight, m.scales).float()


MLP_SHAPES = ((192, 128), (192, 128), (128, 192))  # gate, up, down: (out, in)


@pytest.mark.parametrize("mode", ["dense", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
def test_swiglu_in_one_call_matches_three_calls(mode, dtype, rows):
    """The MLP in one kernel call gives what the format's linear kernel of gate and up, the activation in fp32, and
    its kernel of down give: in bf16 exactly (each output rounded as the three calls round it); in fp32 the
    sigmoid's exp is its own (a few fp32 ulps). And the dense MLP within the format's own error. Quantized, through
    model.swiglu on the modules, as the model calls it (one call, not the linear kernels)."""
    from model import swiglu
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 128, generator=gen).to(dtype)
    x[0, 0, :32] = 0  # an all-zero block
    if mode == "dense":
        (w1, w3, w2) = (torch.randn(n, k, generator=gen).mul(0.1).to(dtype) for n, k in MLP_SHAPES)
        dense = [w.float() for w in (w1, w3, w2)]
        got = torch.ops.flexfast.swiglu(x, w1, w3, w2)
        gate_out, up_out = cpu_kernels.linear(x, [w1, w3]).split(192, dim=-1)
        want = cpu_kernels.linear((F.silu(gate_out.float()) * up_out.float()).to(dtype), [w2])
    else:
        make = int8_module if mode == "int8" else int4_module
        (gate, dense_gate), (up, dense_up), (down, dense_down) = (make(n, k, gen, dtype) for n, k in MLP_SHAPES)
        dense = [dense_gate, dense_up, dense_down]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = swiglu(x, gate, up, down)
        names = [e.name for e in prof.events()]
        assert names.count(f"flexfast::swiglu_{mode}") == 1 and f"flexfast::linear_{mode}" not in names
        want = down((F.silu(gate(x).float()) * up(x).float()).to(dtype))
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    exact = F.linear(F.silu(F.linear(x.float(), dense[0])) * F.linear(x.float(), dense[1]), dense[2])
    assert (got.float() - exact).abs().max() < 0.03 * exact.abs().max()


@pytest.mark.parametrize("mode", ["dense", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("D", [64, 128])
def test_attention_with_wo_in_one_call_matches_two_calls(mode, dtype, rows, D):
    """Attention then wo in one kernel call against few_token_attention and wo's own kernel call, on a cache view
    narrowed to the slots the mask covers (37: not a multiple of 4 or 16), GQA, the later slots masked for the
    earlier rows; within bf16's rounding of the attention output, which the two round apart. Quantized, through the
    module class's attention(), as model.Attention.attend_q calls it."""
    import model
    gen = torch.Generator().manual_seed(rows)
    H, KV, S = 6, 2, 37
    q = torch.randn(1, H, rows, D, generator=gen).to(dtype)
    cache = torch.randn(2, 1, KV, 50, D, generator=gen).to(dtype)
    k, v = cache[0].narrow(2, 0, S), cache[1].narrow(2, 0, S)
    mask = model.causal_mask(torch.arange(S - rows - 3, S - 3), torch.arange(S))
    attended = model.few_token_attention(q, k, v, mask).transpose(1, 2).reshape(1, rows, H * D)
    if mode == "dense":
        wo = (0.1 * torch.randn(128, H * D, generator=gen)).to(dtype)
        dense_wo, name = wo.float(), "flexfast::attention"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = torch.ops.flexfast.attention(q, k, v, mask, wo)
        want = cpu_kernels.linear(attended, [wo])
    else:
        wo, dense_wo = (int8_module if mode == "int8" else int4_module)(128, H * D, gen, dtype)
        name = f"flexfast::attention_{mode}"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = type(wo).attention(q, k, v, mask, wo)
        want = wo(attended)
    names = [e.name for e in prof.events()]
    assert names.count(name) == 1 and not any(n.startswith("flexfast::linear") for n in names)
    assert got.shape == want.shape == (1, rows, 128) and got.dtype == dtype
    torch.testing.assert_close(got, want, **tolerance(dtype))
    exact = F.linear(F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
                     .transpose(1, 2).reshape(1, rows, H * D), dense_wo)
    assert (got.float() - exact).abs().max() < 0.03 * exact.abs().max()


def test_attention_keeps_two_calls_where_the_kernel_cannot_or_a_hook_must_see_wo():
    import model
    gen = torch.Generator().manual_seed(0)
    args = model.ModelArgs(vocab_size=64, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64,
                           intermediate_size=256)
    attention = model.Attention(args)
    attention.wo, _ = int4_module(128, 256, gen)
    q = torch.randn(1, 4, 1, 64, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, 9, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    mask = model.causal_mask(torch.tensor([8]), torch.arange(9))
    rope = model.rope_rows(model.rope_cache(args, 16), torch.tensor([8]))
    x = q.transpose(1, 2).reshape(1, 1, 256)
    _, used = ran_kernel(lambda: attention.attend_q(x, rope, mask, k, v), "attention_int4")
    assert used
    seen = []
    handle = attention.wo.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        _, used = ran_kernel(lambda: attention.attend_q(x, rope, mask, k, v), "attention_int4")
    finally:
        handle.remove()
    assert not used and len(seen) == 1  # tp.py's all-reduce is such a hook
    q32 = torch.randn(1, 8, 1, 32, generator=gen).to(torch.bfloat16)  # head_dim 32: the kernel's not
    k32 = torch.randn(1, 2, 9, 32, generator=gen).to(torch.bfloat16)
    assert type(attention.wo).attention(q32, k32, k32, mask, attention.wo) is None
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.flexfast.attention_int4(q, k, v, mask.float(), attention.wo.nibbles,
                                          attention.wo.kernel_scales_zeros)


def test_swiglu_keeps_three_calls_where_the_kernel_cannot_or_a_hook_must_see_down():
    from model import swiglu
    gen = torch.Generator().manual_seed(0)
    gate, up, down = (int4_module(n, k, gen)[0] for n, k in ((192, 128), (192, 128), (128, 192)))
    x = torch.randn(1, 1, 128, generator=gen).to(torch.bfloat16)
    seen = []
    handle = down.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        _, used = ran_kernel(lambda: swiglu(x, gate, up, down), "swiglu_int4")
    finally:
        handle.remove()
    assert not used and len(seen) == 1  # tp.py's all-reduce is such a hook
    x_many = torch.randn(1, cpu_kernels.MAX_ROWS + 1, 128, generator=gen).to(torch.bfloat16)
    _, used = ran_kernel(lambda: swiglu(x_many, gate, up, down), "swiglu_int4")
    assert not used
    narrow_up = int4_module(96, 128, gen)[0]
    with pytest.raises(RuntimeError, match="w1, w3 must be"):
        torch.ops.flexfast.swiglu_int4(x, gate.nibbles, gate.kernel_scales_zeros, narrow_up.nibbles,
                                       narrow_up.kernel_scales_zeros, down.nibbles, down.kernel_scales_zeros)


def test_unsupported_shapes_keep_torch_paths():
    x = torch.randn(1, 48)
    assert not cpu_kernels.supports(x, [torch.randn(8, 48)], 48)  # K not a multiple of 32
    # one weight's N not a multiple of 4
    assert not cpu_kernels.supports(torch.randn(1, 64), [torch.randn(8, 64), torch.randn(6, 64)], 64)
    assert not cpu_kernels.supports(torch.randn(cpu_kernels.MAX_ROWS + 1, 64), [torch.randn(8, 64)], 64)
    assert cpu_kernels.supports(torch.randn(cpu_kernels.MAX_ROWS, 64), [torch.randn(8, 64), torch.randn(4, 64)], 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_kernels.linear(x, [torch.randn(8, 48)])
    with pytest.raises(RuntimeError, match="multiple of 16"):  # the int4 kernel's interleaved rows
        cpu_kernels.linear_int4(torch.randn(1, 64), [torch.zeros(8, 32, dtype=torch.uint8)], [torch.zeros(8, 2, 2)])
    many = [torch.randn(4, 64) for _ in range(cpu_kernels.MAX_WEIGHTS + 1)]
    assert not cpu_kernels.supports(torch.randn(1, 64), many, 64)
    with pytest.raises(ValueError, match="2 weights but 1 scales"):
        cpu_kernels.linear_int8(torch.randn(1, 64), many[:2], [torch.ones(4)])
    with pytest.raises(RuntimeError, match="a third weight or scale without a second"):
        torch.ops.flexfast.linear(torch.randn(1, 64), many[0], None, many[1])
    with pytest.raises(RuntimeError, match="flexfast::linear_int8: weights must be int8"):  # each op its formats
        torch.ops.flexfast.linear_int8(torch.randn(1, 64), many[0], torch.ones(4))


def layer_block(dtype, D, gen, mode="dense"):
    """A plain layer of 4 query heads of D and 2 KV heads (dim 128, MLP 192), random weights (int8 or int4 linears
    for those modes), a cache of batch 2 and 40 slots filled with random history."""
    import model
    args = model.ModelArgs(vocab_size=64, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=D,
                           intermediate_size=192)
    block = model.TransformerBlock(args).eval().requires_grad_(False)
    for p in block.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() > 1 else 1.0) + (p.dim() == 1))
    block = block.to(dtype)
    block.attention.kv_cache = model.KVCache(2, 39, 2, D, dtype)
    if mode != "dense":
        for parent, name in ((block.attention, "wq"), (block.attention, "wk"), (block.attention, "wv"),
                             (block.attention, "wo"), (block.feed_forward, "w1"), (block.feed_forward, "w3"),
                             (block.feed_forward, "w2")):
            dense = getattr(parent, name)
            quantized = (int8_module if mode == "int8" else int4_module)(dense.out_features, dense.in_features, gen,
                                                                         dtype)[0]
            setattr(parent, name, quantized)
    for cache in (block.attention.kv_cache.k_cache, block.attention.kv_cache.v_cache):
        cache.copy_(torch.randn(cache.shape, generator=gen))
    return args, block


@pytest.mark.parametrize("mode", ["dense", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", (1, 3, 8))
@pytest.mark.parametrize("D", [64, 128])
def test_layer_in_one_call_matches_the_layers_ops(monkeypatch, mode, dtype, rows, D):
    """TransformerBlock.block where its linears are the kernel (one call, the layer op) against the same block as
    its ops: torch's (eager) for dense weights; for int8 and int4 the layer's three kernel calls (the projections,
    attention with wo, the MLP), which round the activations to integers as the layer op does. The output, and the
    cache, where only batch 0's slots at the step's positions change; the mask covers 33 slots of 40, the step's
    rows at 30 - rows to 29 (each row sees the earlier ones, not the later)."""
    import model
    gen = torch.Generator().manual_seed(rows * D)
    args, block = layer_block(dtype, D, gen, mode)
    x = torch.randn(1, rows, 128, generator=gen).to(dtype)
    positions = torch.arange(30 - rows, 30)
    rope = model.rope_rows(model.rope_cache(args, 40), positions)
    mask = model.causal_mask(positions, torch.arange(33))
    cache = block.attention.kv_cache
    before = cache.k_cache.clone(), cache.v_cache.clone()
    monkeypatch.setattr(model, "ONE_TOKEN_LINEAR", {(str(dtype), False): "kernel"})
    monkeypatch.setattr(model, "FEW_ROW_LINEAR", {str(dtype): "kernel"})
    if mode != "dense":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # few_row_kind: the compiled steps' kinds
    monkeypatch.setattr(model, "LAYER_IN_ONE_CALL", False)
    want, used = ran_kernel(lambda: block.block(x, rope, mask, positions), "layer")
    assert not used
    monkeypatch.setattr(model, "LAYER_IN_ONE_CALL", True)
    want_cache = cache.k_cache.clone(), cache.v_cache.clone()
    cache.k_cache.copy_(before[0])
    cache.v_cache.copy_(before[1])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got, used = ran_kernel(lambda: block.block(x, rope, mask, positions), "layer")
    assert used and got.shape == want.shape and got.dtype == dtype

    def close(got, want):
        if dtype == torch.float32 and mode == "dense":
            torch.testing.assert_close(got, want, **tolerance(dtype))
        else:  # bf16 rounds the intermediates apart, and a last-bit difference of an activation can round it to
            # another integer (int8 to int16, int4 to int8 per 32 columns): a few ulps of the largest value
            assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
    close(got, want)
    for got_cache, want_cache_, old in zip((cache.k_cache, cache.v_cache), want_cache, before):
        close(got_cache, want_cache_)
        changed = (got_cache != old).any(-1)  # [B, KV, slots]
        assert changed[0][:, positions].all() and changed.sum() == 2 * rows


def test_layer_in_one_call_on_three_threads(monkeypatch):
    """Three threads split dim 128 into shares of 40, 44 and 44 columns (4-row blocks): a share's residual ends
    inside a 16-value vector, where adding whole vectors ran into the next share and past the output's end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        test_layer_in_one_call_matches_the_layers_ops(monkeypatch, "dense", torch.float32, 3, 64)
        test_layer_in_one_call_matches_the_layers_ops(monkeypatch, "int8", torch.bfloat16, 1, 64)
    finally:
        torch.set_num_threads(threads)


def test_layer_keeps_its_ops_where_the_kernel_cannot_or_a_hook_must_see_an_output(monkeypatch):
    import model
    gen = torch.Generator().manual_seed(0)
    args, block = layer_block(torch.float32, 64, gen)
    x = torch.randn(1, 1, 128, generator=gen)
    positions = torch.tensor([20])
    rope = model.rope_rows(model.rope_cache(args, 40), positions)
    mask = model.causal_mask(positions, torch.arange(21))
    monkeypatch.setattr(model, "ONE_TOKEN_LINEAR", {("torch.float32", False): "kernel"})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ran_kernel(lambda: block.block(x, rope, mask, positions), "layer")[1]
    seen = []
    handle = block.feed_forward.w2.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        _, used = ran_kernel(lambda: block.block(x, rope, mask, positions), "layer")
    finally:
        handle.remove()
    assert not used and len(seen) == 1  # tp.py's all-reduce is such a hook
    monkeypatch.setattr(model, "LAYER_IN_ONE_CALL", False)
    assert not ran_kernel(lambda: block.block(x, rope, mask, positions), "layer")[1]
    monkeypatch.setattr(model, "LAYER_IN_ONE_CALL", True)
    block.feed_forward.w1, _ = int8_module(192, 128, gen, torch.float32)  # linears of two classes: their ops
    assert not ran_kernel(lambda: block.block(x, rope, mask, positions), "layer")[1]
    a, cache = block.attention, block.attention.kv_cache
    call = dict(x=x, attn_norm=block.attention_norm.weight, ffn_norm=block.ffn_norm.weight, cos=rope[0], sin=rope[1],
                input_pos=positions, k_cache=cache.k_cache, v_cache=cache.v_cache, mask=mask, eps=1e-5,
                wq=a.wq.weight, wk=a.wk.weight, wv=a.wv.weight, wo=a.wo.weight, w1=a.wq.weight[:192],
                w3=a.wq.weight[:192], w2=torch.randn(128, 192))
    torch.ops.flexfast.layer(**call)
    with pytest.raises(RuntimeError, match="position 40 is outside the cache's 40 slots"):
        torch.ops.flexfast.layer(**dict(call, input_pos=torch.tensor([40])))
    with pytest.raises(RuntimeError, match=re.escape("wo [dim, H D]")):  # more rows than h has columns
        torch.ops.flexfast.layer(**dict(call, wo=torch.cat([call["wo"], call["wo"][:4]])))
    halves = {name: call[name].half() for name in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")}
    with pytest.raises(RuntimeError, match="weights must be fp32, bf16, int8 or uint8"):
        torch.ops.flexfast.layer(**dict(call, **halves))
    int8 = {name: call[name].to(torch.int8) for name in halves}
    with pytest.raises(RuntimeError, match="quantized weights need their scales"):
        torch.ops.flexfast.layer(**dict(call, **int8))


@pytest.mark.parametrize("mode, options", [("dense", {}), ("int4", {}), ("dense", {"bounded": True}),
                                           ("dense", {"regional": True})])
def test_compiled_decode_with_the_layer_op_matches_eager_and_self_speculation_is_plain_greedy(monkeypatch, mode,
                                                                                             options):
    """A model of head_dim 64 (the layer op's), fp32, its linears the kernel (dense) or int4: compiled decode gives
    eager's logits through one layer op per layer (the op writes the cache, which inductor must not copy), and
    self-speculation (the verify's 4 rows through it too) gives plain greedy. Bounded (the live slots a dynamic
    size: chat, the server) the same; regional, the repeated block is the layer's ops (a nested compile region
    refuses an op that writes its inputs)."""
    import model
    from steps import compile_steps, forward_last, live_slots
    monkeypatch.setattr(model, "ONE_TOKEN_LINEAR", {("torch.float32", False): "kernel"})
    monkeypatch.setattr(model, "FEW_ROW_LINEAR", {"torch.float32": "kernel"})
    torch.manual_seed(0)
    args = model.ModelArgs(vocab_size=128, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=64,
                           intermediate_size=192)
    net = model.Transformer(args).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    for block in net.layers if mode == "int4" else ():
        for parent, name in ((block.attention, "wq"), (block.attention, "wk"), (block.attention, "wv"),
                             (block.attention, "wo"), (block.feed_forward, "w1"), (block.feed_forward, "w3"),
                             (block.feed_forward, "w2")):
            dense = getattr(parent, name)
            setattr(parent, name, int4_module(dense.out_features, dense.in_features, gen, torch.float32)[0])
    prompt = torch.tensor([1, 7, 42, 9])
    plain, _ = greedy(net, prompt, 10)
    try:
        steps = compile_steps("cpu", False, one_token_kind="kernel", **options)
        net.setup_caches(1, 16)
        for pos, token in enumerate([5, 17, 99, 3], start=2):  # bounded: a live-slot count of 1 would be specialized
            x, input_pos = torch.tensor([[token]]), torch.tensor([pos])
            slots = live_slots(net, steps, pos + 1)
            want = forward_last(net, x, input_pos)
            steps.decode(net, x, input_pos, slots=slots)  # compiles at the first
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                got = steps.decode(net, x, input_pos, slots=slots)
            layer_ops = [e.name for e in prof.events()].count("flexfast::layer")
            assert layer_ops == (0 if options.get("regional") else 3)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        if not options:
            spec, used = ran_kernel(lambda: greedy(net, prompt, 10, steps, early_exit=1, speculate_k=3), "layer")
            assert used and spec[0] == plain
    finally:
        torch._dynamo.reset()


def test_compiled_flexidepth_with_kernel_matches_eager(monkeypatch):
    """The kernel chosen for one-token linears, in the main graph and inside FlexiDepth's torch.cond branches: the
    compiled decode gives eager's logits with routed layers both running and skipping, and really calls it."""
    import model
    from torch._inductor.utils import run_and_get_code
    from steps import compile_steps, forward_last
    monkeypatch.setattr(model, "ONE_TOKEN_LINEAR",
                        {("torch.float32", False): "kernel", ("torch.float32", True): "kernel"})
    tiny = tiny_model(routing_layers=[1, 2], router_dim=8, adapter_dim=12)
    tiny.setup_caches(1, 16)
    steps = compile_steps("cpu", False, one_token_kind="kernel")
    try:
        ran, called = [], []
        for pos, token in enumerate([5, 17, 99, 3, 64, 42]):
            x, input_pos = torch.tensor([[token]]), torch.tensor([pos])
            want = forward_last(tiny, x, input_pos)  # eager: writes this position's K/V and routing record
            ran += [bool(layer.ran[0, pos]) for layer in tiny.layers[1:]]
            if pos == 0:  # the first call compiles
                got, code = run_and_get_code(steps.decode, tiny, x, input_pos)
                assert len(code) == 1 and "torch.ops.flexfast" in code[0]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                got = steps.decode(tiny, x, input_pos)
            names = [e.name for e in prof.events()]
            called.append("flexfast::linear" in names and "flexfast::swiglu" in names)  # the MLP in one call
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert any(ran) and not all(ran), ran  # both branches were exercised
        assert all(called)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("bounded", [False, True])
def test_compiled_self_speculation_with_kernel_is_plain_greedy(monkeypatch, bounded):
    """Draft (one row) and verify (k + 1 rows) both through the kernel: fp32 greedy output equals plain decoding.
    Both steps are then compiled unfrozen (the verify's rows to the kernel: steps.rows_to_kernels); bounded: reading only the live cache slots, a dynamic size (chat, the server)."""
    import model
    from torch._inductor.utils import run_and_get_code
    from steps import compile_steps
    monkeypatch.setattr(model, "ONE_TOKEN_LINEAR",
                        {("torch.float32", False): "kernel", ("torch.float32", True): "kernel"})
    monkeypatch.setattr(model, "FEW_ROW_LINEAR", {"torch.float32": "kernel"})
    tiny = tiny_model()
    prompt = torch.tensor([1, 7, 42, 9])
    plain, _ = greedy(tiny, prompt, 12)
    try:
        steps = compile_steps("cpu", False, one_token_kind="kernel", bounded=bounded)
        (spec, _), code = run_and_get_code(greedy, tiny, prompt, 12, steps, early_exit=1, speculate_k=3)
        assert spec == plain
        assert len(code) == 2 and all("torch.ops.flexfast" in c and "_frozen_param" not in c for c in code)
        spec, used = ran_kernel(lambda: greedy(tiny, prompt, 12, steps, early_exit=1, speculate_k=3), "linear")
        assert used and spec[0] == plain
        # 9 rows, more than the kernel takes (cpu_kernels.MAX_ROWS): F.linear, so a frozen verify in Python
        (spec, _), code = run_and_get_code(greedy, tiny, prompt, 12, steps, early_exit=1, speculate_k=8)
        assert spec == plain
        assert sum("_frozen_param" in c for c in code) == 1, len(code)  # the frozen verify
    finally:
        torch._dynamo.reset()
