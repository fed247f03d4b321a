"""Few-row CPU linears written for the memory read (cpu_kernels.cpp), built on first use.

Decode, the self-speculative draft and the verify multiply at most 8 rows of activations by each weight, so they are
bound by reading the weight once. cpu_kernels.cpp streams bf16, fp32, int8 and int4 weights at that rate on x86 CPUs
with AVX-512 (BENCHMARKS.md has the figures against inductor's GEMV, F.linear and torch's int8/int4 kernels). It is
compiled here with the C++ compiler torch.compile itself needs, once per machine (the name carries a hash of the
source, the CPU and the torch version), into ~/.cache/flexfast/kernels. Where it cannot be built (no AVX-512, no
compiler) or FLEXFAST_KERNELS=0, load() says so once and the callers keep torch's own kernels.

The ops, each checked in tests/test_cpu_kernels.py against the torch path it replaces and a dequantized reference,
take up to MAX_WEIGHTS weights of one K and one format, and return x @ cat(weights).T without the cat (wq/wk/wv and
w1/w3 in one call; model.linears), called through the functions below, which pass each weight as an argument of its
own (why: cpu_kernels.cpp); and per format the MLP, w2 @ (silu(w1 @ x) * (w3 @ x)), in one call (model.swiglu):
    linear(x, [w, ...])                        w [N, K] bf16 or fp32
    linear_int8(x, [w, ...], [scales, ...])    w [N, K] int8, scales [N]; x rounded to int16 per row (integer
                                               products)
    linear_int4(x, [w, ...], [sz, ...])        w, sz from interleave_int4 (16 rows at a time); x rounded to int8 per
                                               32 columns
    torch.ops.flexfast.swiglu(x, w1, w3, w2), swiglu_int8(x, w1, s1, w3, s3, w2, s2), swiglu_int4(x, w1, sz1, ...)
and attention then wo in one call (model.Attention.attend_q; q [1, H, T, 64 or 128] against a cache's slots):
    torch.ops.flexfast.attention(q, k, v, mask, wo), attention_int8(..., wo, scales), attention_int4(..., wo, sz)
and a whole plain layer in one call, which writes this step's keys and values into the cache (model.whole_layer):
    layer(block, modules, weights, scales, x, rope, mask, input_pos), which calls torch.ops.flexfast.layer(x,
    attention_norm, ffn_norm, cos, sin, input_pos, k_cache, v_cache, mask, eps, wq, wk, wv, wo, w1, w3, w2,
    [their scales, for int8 or int4 weights])
x is [..., K], fp32 or bf16, at most MAX_ROWS rows; the result has x's dtype. K must be a multiple of 32 and N of 4
(supports()); for int4 N must be a multiple of INT4_ROWS, as quantize.py's int4 rule (model.INT4_ROW_MULTIPLE) makes it.
"""
import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from cli import cpu_model

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
BUILD_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flexfast" / "kernels"
MAX_ROWS = 8
MAX_WEIGHTS = 3  # weights one linear op takes (wq/wk/wv; the ops' schemas in cpu_kernels.cpp)
INT4_ROWS = 16  # the int4 kernel's rows per interleaved block (cpu_kernels.cpp)
LOADED = False  # set by load(); a plain global, which torch.compile reads as a constant at trace time
PREFETCH_L2 = False  # where the kernels' software prefetches put the weights (set_prefetch_l2)
_LOAD_LOCK = threading.Lock()
_LOAD_RESULT = None  # load()'s answer, once it has one


def supports(x: Tensor, weights: list, in_features: int) -> bool:
    """Whether the kernels take x against these weights, all of in_features columns, in one call (checked at trace
    time in compiled steps, so it costs nothing per token). False until load() has succeeded in this process."""
    return (LOADED and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.shape[:-1].numel() <= MAX_ROWS and in_features % 32 == 0 and len(weights) <= MAX_WEIGHTS
            and all(w.shape[0] % 4 == 0 for w in weights))


def takes_attention(q: Tensor, k: Tensor, wo: list) -> bool:
    """Whether the attention ops take q [B, H, T, D] against the cache slots k with this wo: batch 1, T rows as
    supports() takes them, head_dim 64 or 128, k of q's dtype."""
    return (q.shape[0] == 1 and q.shape[-1] in (64, 128) and k.dtype == q.dtype
            and supports(q[:, 0], wo, q.shape[1] * q.shape[-1]))


def layer(block, modules: tuple, weights: list, scales: list, x: Tensor, rope: tuple, mask: Tensor,
          input_pos: Tensor) -> Optional[Tensor]:
    """block (a plain model.TransformerBlock) for x [1, T, dim] in one call of the layer op, which writes this
    step's keys and values into its cache; modules: its linears wq, wk, wv, wo, w1, w3, w2, weights what the kernels
    read of them, scales their scales (none for dense weights). None where the op does not take it: the linear,
    attention and swiglu ops would not take its parts, or its norms or cache are not of x's dtype."""
    attention, cache = block.attention, block.attention.kv_cache
    if not (cache is not None and x.shape[0] == 1 and attention.head_dim in (64, 128)
            and cache.k_cache.dtype == x.dtype == block.attention_norm.weight.dtype == block.ffn_norm.weight.dtype
            and supports(x, weights[:3], modules[0].in_features) and supports(x, weights[3:4], modules[3].in_features)
            and supports(x, weights[4:6], modules[4].in_features) and supports(x, weights[6:], modules[6].in_features)):
        return None
    return torch.ops.flexfast.layer(x, block.attention_norm.weight, block.ffn_norm.weight, rope[0], rope[1], input_pos,
                                    cache.k_cache, cache.v_cache, mask, block.attention_norm.eps, *weights, *scales)


def turned_off() -> bool:
    return os.environ.get("FLEXFAST_KERNELS", "1") == "0"


def has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def will_try() -> bool:
    """Whether load() will try to build the kernels here (not turned off, AVX-512), known before it does."""
    return not turned_off() and has_avx512()


def load() -> bool:
    """Builds (first time on this machine: ~20 s on 2 cores) and loads the kernels; False, with one line on stderr,
    if not. FLEXFAST_KERNELS=0 turns them off. Once per process: a call while another thread builds (a compile's
    setup: cpu_linear.machine_setup) waits for that build's answer."""
    global _LOAD_RESULT
    with _LOAD_LOCK:
        if _LOAD_RESULT is None:
            _LOAD_RESULT = build_and_load()
        return _LOAD_RESULT


def build_and_load() -> bool:
    global LOADED
    if turned_off():
        return False
    if not has_avx512():
        print(f"note: CPU kernels need AVX-512 (this CPU: {torch.backends.cpu.get_cpu_capability()}); "
              "using torch's", file=sys.stderr)
        return False
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + cpu_model().encode() + torch.__version__.encode()).hexdigest()[:12]
    name = f"flexfast_cpu_{digest}"
    build_dir = BUILD_ROOT / name
    try:
        from torch.utils.cpp_extension import load as build
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            print("building the CPU kernels (first run on this machine only)...", file=sys.stderr, flush=True)
        build(name=name, sources=[str(SOURCE)], build_directory=str(build_dir), is_python_module=False,
              extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a missing compiler or headers: torch's kernels still work
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"note: could not build the CPU kernels ({first_line}); using torch's", file=sys.stderr)
        return False
    register_fakes()
    LOADED = True
    set_prefetch_l2(PREFETCH_L2)
    return True


def linear(x: Tensor, weights: list) -> Tensor:
    """x @ cat(weights).T, weights [N_j, K] bf16 or fp32 (at most MAX_WEIGHTS)."""
    return torch.ops.flexfast.linear(x, *weights)


def linear_int8(x: Tensor, weights: list, scales: list) -> Tensor:
    """x @ cat(weights * scales).T, weights [N_j, K] int8 with row scales [N_j] (at most MAX_WEIGHTS)."""
    return torch.ops.flexfast.linear_int8(x, *paired(weights, scales))


def linear_int4(x: Tensor, weights: list, scales_zeros: list) -> Tensor:
    """x @ cat(dequantized weights).T, weights and scales_zeros from interleave_int4 (at most MAX_WEIGHTS)."""
    return torch.ops.flexfast.linear_int4(x, *paired(weights, scales_zeros))


def paired(weights: list, scales: list) -> list:
    """w0, s0, w1, s1, ...: the quantized ops' arguments (a loop, as in model.plain_linears)."""
    if len(weights) != len(scales):
        raise ValueError(f"{len(weights)} weights but {len(scales)} scales")
    arguments = []
    for w, s in zip(weights, scales):
        arguments += [w, s]
    return arguments


def set_prefetch_l2(l2: bool):
    """The kernels' software prefetches into the second-level cache (True) or the first (False): which streams a
    weight from memory faster depends on the CPU, so cpu_linear's probe measures both and calls this. Process-wide
    state the kernels read at every call, not at trace time: compiled steps need no recompile. Kept for load() if
    the kernels are not loaded yet."""
    global PREFETCH_L2
    PREFETCH_L2 = l2
    if LOADED:
        torch.ops.flexfast.set_prefetch_l2(l2)


def interleave_int4(nibbles: Tensor, scales: Tensor, zeros: Tensor) -> tuple:
    """quantize.py's int4 form (nibbles uint8 [N, K/2], scales and zeros [N, K/g]) in linear_int4's layout: the
    nibbles of 16 rows interleaved 4 bytes (8 columns) at a time, and per 16 rows and group the 16 scales, then the
    16 zeros (why: cpu_kernels.cpp). Shapes [N, K/2] and [N, K/g, 2]; N must be a multiple of INT4_ROWS."""
    N, half = nibbles.shape
    groups = scales.shape[1]
    weight = nibbles.reshape(N // INT4_ROWS, INT4_ROWS, half // 4, 4).transpose(1, 2).reshape(N, half)
    scales_zeros = torch.stack([scales, zeros], dim=1).reshape(N // INT4_ROWS, INT4_ROWS, 2, groups).permute(0, 3, 2, 1)
    return weight, scales_zeros.reshape(N, groups, 2)  # both reshapes copy: contiguous


def register_fakes():
    """Shapes for torch.compile: the ops are opaque calls in compiled graphs. Once per process (load() is cached)."""
    def rows_of(x, *weights):
        return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights if w is not None))

    torch.library.register_fake("flexfast::linear")(lambda x, w0, w1=None, w2=None: rows_of(x, w0, w1, w2))
    for op in ("flexfast::linear_int8", "flexfast::linear_int4"):
        torch.library.register_fake(op)(lambda x, w0, s0, w1=None, s1=None, w2=None, s2=None: rows_of(x, w0, w1, w2))
    torch.library.register_fake("flexfast::swiglu")(lambda x, w1, w3, w2: torch.empty_like(x))
    torch.library.register_fake("flexfast::attention")(
        lambda q, k, v, mask, wo: q.new_empty(1, q.shape[2], wo.shape[0]))
    torch.library.register_fake("flexfast::attention_int8")(
        lambda q, k, v, mask, wo, scales: q.new_empty(1, q.shape[2], wo.shape[0]))
    torch.library.register_fake("flexfast::attention_int4")(
        lambda q, k, v, mask, wo, sz: q.new_empty(1, q.shape[2], wo.shape[0]))
    torch.library.register_fake("flexfast::swiglu_int8")(lambda x, w1, s1, w3, s3, w2, s2: torch.empty_like(x))
    torch.library.register_fake("flexfast::swiglu_int4")(lambda x, w1, sz1, w3, sz3, w2, sz2: torch.empty_like(x))
    torch.library.register_fake("flexfast::layer")(lambda x, *args: torch.empty_like(x))
