"""One hand-written Llama with a static KV cache and addressable depth (embed / run_layers / head).

Covers Llama 2 (MHA), Llama 3/3.1/3.2 (GQA, llama3 rope scaling, tied embeddings), MQA and SmolLM2.
The q/k projections keep Hugging Face's row layout, so the rope here is the rotate-half form.
FlexiDepth layers (a router and an adapter on the layers in `routing_layers`) live here too.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import cpu_kernels


# quantize.py's int4 weights and tp.py's split of them both need it, so it sits below both
INT4_ROW_MULTIPLE = 16  # torch's CPU int4 packer and cpu_kernels' (16 rows interleaved) need out_features % 16 == 0


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # llama3 type: factor, low/high_freq_factor, original_max_position_embeddings
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    # FlexiDepth: layers that carry a router and an adapter; empty for a plain Llama.
    routing_layers: list = field(default_factory=list)
    router_dim: int = 0
    adapter_dim: int = 0
    # Self-speculation extras (config.json fields of the same names, written by scripts/train_exit.py):
    # exit_heads {E: "affine"} puts a trained head on the layer-E exit of the draft; draft_vocab_size N > 0 gives the
    # draft an LM head of N rows (the buffer draft_vocab holds their token ids).
    exit_heads: dict = field(default_factory=dict)
    draft_vocab_size: int = 0
    # self_speculative {"early_exit": E, "speculate_k": k}: the fastest pair scripts/sweep.py --write_best measured,
    # which generate.py --self_speculative uses for the flags not given; either key may be absent.
    self_speculative: dict = field(default_factory=dict)

    def route(self, layers: list):
        """Makes `layers` FlexiDepth layers, their routers and adapters sized as FlexiDepth's checkpoints have them."""
        self.routing_layers = list(layers)
        self.router_dim = self.dim // 16
        self.adapter_dim = self.intermediate_size // 16

    @classmethod
    def from_folder(cls, folder) -> "ModelArgs":
        """The architecture in a checkpoint folder's config.json; any defect in it is one error naming the file."""
        path = Path(folder) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        try:
            config = json.loads(path.read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_config(config)
        except (TypeError, KeyError, ZeroDivisionError, AttributeError) as e:
            raise ValueError(f"{path} is not a usable Llama config: {type(e).__name__}: {e}") from None

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        if not isinstance(config, dict):
            raise ValueError("config.json does not hold a JSON object")
        model_type = config.get("model_type")
        if model_type not in ("llama", "ddllama"):
            raise ValueError(f"config.json describes a {model_type!r} model; only Llama-family models are supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in config]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        given = {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "head_dim") if k in config}
        given = {k: v for k, v in given.items() if not (k in ("num_key_value_heads", "head_dim") and v is None)}
        bad = [f"{k}={v!r}" for k, v in given.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"config.json sizes must be positive integers: {', '.join(bad)}")
        n_heads = config["num_attention_heads"]
        dim = config["hidden_size"]
        # transformers >= 5 writes rope_parameters; hub checkpoints carry rope_theta and rope_scaling.
        rope_params = config.get("rope_parameters") or {}
        rope_base = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = config.get("rope_scaling") or rope_params
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default")) if rope_scaling else "default"
        if rope_type == "llama3":
            llama3_keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if not all(k in rope_scaling for k in llama3_keys):
                raise ValueError(f"llama3 rope scaling needs {', '.join(llama3_keys)}; config.json has {rope_scaling}")
            rope_scaling = {k: rope_scaling[k] for k in llama3_keys}
        elif rope_type == "default":
            rope_scaling = None
        else:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported (only llama3)")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ValueError("Llama variants with attention or MLP biases are not supported")
        args = cls(
            vocab_size=config["vocab_size"],
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or dim // n_heads,
            intermediate_size=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_base=float(rope_base),
            rope_scaling=rope_scaling,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
        )
        if "routing_layers" in config:
            layers = sorted(int(i) for i in config["routing_layers"])
            bad = [i for i in layers if not 0 <= i < args.n_layers]
            if bad:
                raise ValueError(f"routing_layers {bad} are outside the model's {args.n_layers} layers")
            args.route(layers)
        sizes = dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.intermediate_size,
                     num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                     num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                     max_position_embeddings=args.max_position_embeddings)
        bad = [f"{k}={v!r}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"config.json sizes must be positive integers: {', '.join(bad)}")
        if args.head_dim % 2:
            raise ValueError(f"head_dim {args.head_dim} is odd; the rope rotates pairs of dimensions")
        params = args.vocab_size * args.dim * 2 + args.n_layers * (
            args.dim * args.head_dim * (args.n_heads * 2 + args.n_kv_heads * 2) + 3 * args.dim * args.intermediate_size)
        if params > 2e12:
            raise ValueError(f"config.json describes about {params:.2g} parameters; that is not a real checkpoint")
        if not (isinstance(args.norm_eps, (int, float)) and 0 < args.norm_eps < 1 and args.rope_base > 0):
            raise ValueError(f"rms_norm_eps ({args.norm_eps}) must be in (0, 1) and rope_theta ({args.rope_base}) > 0")
        exit_heads = config.get("exit_heads") or {}
        if not isinstance(exit_heads, dict):
            raise ValueError(f"config.json: exit_heads must map layer numbers to a head kind, got {exit_heads!r}")
        for e, kind in exit_heads.items():
            if not (str(e).isdigit() and 1 <= int(e) < args.n_layers):
                raise ValueError(f"config.json: exit head at {e!r} is outside 1..{args.n_layers - 1}")
            if kind not in EXIT_HEAD_KINDS:
                raise ValueError(f"config.json: exit head kind {kind!r} at {e} is not one of {', '.join(EXIT_HEAD_KINDS)}")
        args.exit_heads = {int(e): kind for e, kind in sorted(exit_heads.items(), key=lambda item: int(item[0]))}
        args.draft_vocab_size = config.get("draft_vocab_size", 0)
        if not (isinstance(args.draft_vocab_size, int) and 0 <= args.draft_vocab_size <= args.vocab_size):
            raise ValueError(f"config.json: draft_vocab_size must be an integer in 0..{args.vocab_size}, "
                             f"got {args.draft_vocab_size!r}")
        best = config.get("self_speculative") or {}
        if not isinstance(best, dict):
            raise ValueError(f'config.json: self_speculative must be {{"early_exit": E, "speculate_k": k}}, '
                             f"got {best!r}")
        args.self_speculative = {k: best[k] for k in ("early_exit", "speculate_k") if k in best}
        bad = [f"{k}={v!r}" for k, v in args.self_speculative.items()
               if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"config.json: self_speculative values must be positive integers: {', '.join(bad)}")
        if args.self_speculative.get("early_exit", 0) >= args.n_layers:
            raise ValueError(f"config.json: self_speculative early_exit {args.self_speculative['early_exit']} is "
                             f"outside 1..{args.n_layers - 1}")
        if args.n_heads % args.n_kv_heads:
            raise ValueError(f"{args.n_heads} attention heads are not a multiple of {args.n_kv_heads} KV heads")
        return args


class KVCache(nn.Module):
    def __init__(self, max_batch_size, max_seq_length, n_kv_heads, head_dim, dtype):
        super().__init__()
        # a slot more than positions: attention reads a prefix of the cache (Attention.attend_q) whose length is a
        # dynamic size in compiled steps, and a prefix that could be the whole buffer would let dynamo compare it
        # with the buffer's strides and fix the length to one value
        shape = (max_batch_size, n_kv_heads, max_seq_length + 1, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        # k, v: [B, n_kv_heads, T, head_dim], written at input_pos. Entries past the live position stay but are
        # masked out by position, which is what makes speculative rollback free. B may be below the cache's batch.
        k_cache, v_cache = self.k_cache, self.v_cache
        if k.shape[0] < k_cache.shape[0]:  # sliced only then: each op in a layer is traced 30 times per compile
            k_cache, v_cache = k_cache[:k.shape[0]], v_cache[:k.shape[0]]
        k_cache.index_copy_(2, input_pos, k)
        v_cache.index_copy_(2, input_pos, v)
        return k_cache, v_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # in fp32, then rounded to x's dtype before the weight, as Hugging Face's LlamaRMSNorm. One op for dynamo
        # to trace instead of five (inductor gets the same five after decomposition)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.type_as(x)


# Linears of few rows on CPU under torch.compile, chosen per machine by cpu_linear.choose() (a measurement cached on
# disk). One row, per (str(dtype), inside a FlexiDepth torch.cond branch): "gemv" (multiply-and-sum, inductor's own
# reduction kernel, fused with its neighbours), "linear" (F.linear: oneDNN/MKL, prepacked by freezing in the main
# graph only) or "kernel" (cpu_kernels.cpp); "gemv" where the probe has not run. 2 to cpu_kernels.MAX_ROWS rows (the
# self-speculative verify), per str(dtype): "linear" or "kernel"; "linear" where the probe has not run. Keyed by the
# dtype's name: a compiled region that every layer reuses (run_layers) must rebuild its guards, and a key holding a
# torch.dtype it cannot.
ONE_TOKEN_LINEAR = {}
FEW_ROW_LINEAR = {}


class Linear(nn.Linear):
    """A bias-free nn.Linear. For few rows on CPU under torch.compile it follows ONE_TOKEN_LINEAR (above), so that
    it streams its weight once in every graph and branch. in_branch: this linear runs inside a FlexiDepth torch.cond
    branch, where freezing does not prepack weights (BENCHMARKS.md has the figures)."""
    in_branch = False

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.in_branch)

    @staticmethod
    def joined(x: Tensor, modules: tuple) -> Optional[list]:
        """Every module's output, the kind resolved once for them all (see linears); None (each module runs its own
        forward and hooks) outside the few-row CPU steps under compile."""
        kind = few_row_kind(x, modules[0].in_branch)
        return None if kind is None else plain_linears(x, [m.weight for m in modules], kind)

    @staticmethod
    def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, wo: "Linear") -> Optional[Tensor]:
        """wo(few_token_attention(q, k, v, mask)) from one kernel call (see Attention.attend_q), or None where wo's
        linears are not the kernel or it does not take them (cpu_kernels.takes_attention)."""
        if few_row_kind(q[:, 0], wo.in_branch) != "kernel" or not cpu_kernels.takes_attention(q, k, [wo.weight]):
            return None
        return torch.ops.flexfast.attention(q, k, v, mask, wo.weight)

    @staticmethod
    def layer(block: "TransformerBlock", modules: tuple, x: Tensor, rope: tuple, mask: Tensor,
              input_pos: Tensor) -> Optional[Tensor]:
        """block.block(x, rope, mask, input_pos) from one kernel call (see whole_layer), or None where the linears
        are not the kernel or it does not take the layer (cpu_kernels.layer)."""
        if few_row_kind(x, modules[0].in_branch) != "kernel":
            return None
        weights = []
        for m in modules:
            weights.append(m.weight)
        return cpu_kernels.layer(block, modules, weights, [], x, rope, mask, input_pos)

    @staticmethod
    def swiglu(x: Tensor, gate: "Linear", up: "Linear", down: "Linear") -> Optional[Tensor]:
        """down(silu(gate(x)) * up(x)) from one kernel call (see swiglu), or None where the linears are not the
        kernel or it does not take them."""
        if few_row_kind(x, gate.in_branch) != "kernel" or not (
                cpu_kernels.supports(x, [gate.weight, up.weight], gate.in_features)
                and cpu_kernels.supports(x, [down.weight], down.in_features)):
            return None
        return torch.ops.flexfast.swiglu(x, gate.weight, up.weight, down.weight)


def few_row_kind(x: Tensor, in_branch: bool) -> Optional[str]:
    """The kind (see ONE_TOKEN_LINEAR) this machine uses for a linear of x, or None: eager, CUDA or many rows."""
    if not (torch.compiler.is_compiling() and x.device.type == "cpu"):
        return None
    rows = x.shape[:-1].numel()
    if rows == 1:
        return ONE_TOKEN_LINEAR.get((str(x.dtype), in_branch), "gemv")
    return FEW_ROW_LINEAR.get(str(x.dtype)) if rows <= cpu_kernels.MAX_ROWS else None


def linear(x: Tensor, weight: Tensor, in_branch: bool = False) -> Tensor:
    """x @ weight.T; few-row CPU steps under compile as ONE_TOKEN_LINEAR chose (see Linear). Eager is F.linear."""
    return plain_linears(x, [weight], few_row_kind(x, in_branch))[0]


def plain_linears(x: Tensor, weights: list, kind: Optional[str]) -> list:
    """x @ w.T for each weight (of one K) as a linear of `kind` (few_row_kind): the kernel in one call, the GEMV, or
    F.linear. Loops, not list comprehensions: dynamo traces each comprehension as a call of a function of its own."""
    if kind == "kernel" and cpu_kernels.supports(x, weights, weights[0].shape[1]):
        sizes = []
        for w in weights:
            sizes.append(w.shape[0])
        return cpu_kernels.linear(x, weights).split(sizes, dim=-1)
    outputs = []
    if kind in ("gemv", "kernel") and x.shape[:-1].numel() == 1:  # the kernel's fallback for shapes it does not take
        row = x.unsqueeze(-2)
        for w in weights:
            outputs.append((row * w).sum(-1, dtype=torch.float32).to(x.dtype))
        return outputs
    for w in weights:
        outputs.append(F.linear(x, w))
    return outputs


def linears(x: Tensor, modules: tuple) -> tuple:
    """Each module applied to x (wq/wk/wv, w1/w3), through their class's joined(x, modules), which resolves the
    kind of linear once for them all and, where the CPU kernels take them (Linear, Int8Linear and Int4Linear), reads
    every weight in one call: a call per weight costs a fork and join of the threads, as long as reading a small
    weight takes (BENCHMARKS.md). Per linear, that resolution was a fifth of dynamo's trace of a decode step. The
    modules' own forward (and any hook on them) does not run then; where joined() returns None (eager, CUDA, many
    rows) each module runs its own."""
    # the modules' own joined() compared, not their types: `type(m) is type(modules[0])` put a check of every
    # layer's types into dynamo's Python guard function, which runs at every call (0.14 ms a token; BENCHMARKS.md)
    joined = getattr(modules[0], "joined", None)
    for m in modules[1:]:
        if getattr(m, "joined", None) is not joined:
            joined = None
    outputs = joined(x, modules) if joined is not None else None
    return tuple(outputs) if outputs is not None else tuple(m(x) for m in modules)


def rope_frequencies(args: ModelArgs) -> Tensor:
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    if args.rope_scaling is not None:
        s = args.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_context = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_context / low, inv_freq / factor,
                               torch.where(wavelen < old_context / high, inv_freq, blended))
    return inv_freq


def rope_cache(args: ModelArgs, seq_len: int) -> Tensor:
    """[seq_len, 2, head_dim] float32: cos and sin laid out for the rotate-half rope, the sin of the first half
    negated (apply_rope)."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), rope_frequencies(args))
    cos, sin = torch.cat([angles, angles], dim=-1).cos(), torch.cat([-angles, angles], dim=-1).sin()
    return torch.stack([cos, sin], dim=1).float()


def rope_rows(rope: Tensor, positions: Tensor) -> tuple:
    """(cos, sin) of the rope cache's rows at positions, each [1, T, 1, head_dim]: what apply_rope takes. Made once a
    step for every layer (slicing them in each layer was 4 more ops a layer for dynamo to trace). Indexed apart, not
    as views of one tensor: torch.cond (FlexiDepth's real skip) refuses operands that alias each other."""
    return rope[positions, 0][None, :, None], rope[positions, 1][None, :, None]


def causal_mask(positions: Tensor, slots: Tensor) -> Tensor:
    """[1, 1, T, len(slots)] bool: the query at each position sees every cache slot at or before it, never a stale
    one past it. Attention reads only the slots the mask covers (Attention.attend_q)."""
    return (slots <= positions[:, None])[None, None]


def apply_rope(x: Tensor, rope: tuple) -> Tensor:
    # x: [B, T, heads, head_dim]; rope: rope_rows(). Rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    # per half; the cache's sin carries the minus. The halves are swapped as a flip of a size-2 dimension, which
    # inductor reads as two contiguous loads; with roll's modular index it gathered element by element, and it
    # recomputes the query's rope for every cache slot the query meets (1.13x bf16, 1.30x int4 decode; BENCHMARKS.md)
    cos, sin = rope
    x_float = x.float()
    swapped = x_float.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return (x_float * cos + swapped * sin).type_as(x)


# False: every step uses F.scaled_dot_product_attention, and no kernel of attention with wo (scripts/benchmark.py
# --sdpa_row times both in one run)
FEW_TOKEN_ATTENTION = True
# False: attention and wo always run as their own calls (scripts/bench_decode_ab.py -attn2)
ATTENTION_WITH_WO = True
FEW_TOKENS = 8  # the most query rows few_token_attention takes: decode, draft and the self-speculative verify


def few_token_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of a few queries per sequence, q [B, H, T, D], against the cache k, v [B, KV, S, D] (mask
    [1, 1, T, S]), written as two reductions that inductor fuses into the layer's own kernel. On CPU the
    flash-attention kernel costs 0.1-0.5 ms a call for one query (more than the layer's weights take to read;
    BENCHMARKS.md), and the self-speculative verify calls it in every layer above the exit."""
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    q = q.reshape(B, n_kv, H // n_kv, T, 1, D)  # the query heads that share each KV head
    scores = (q * k[:, :, None, None]).sum(-1, dtype=torch.float32) * D ** -0.5  # [B, KV, H/KV, T, S]
    probs = torch.softmax(scores.masked_fill(~mask[:, :, None], float("-inf")), dim=-1)
    y = (probs.unsqueeze(-1) * v[:, :, None, None]).sum(-2, dtype=torch.float32)  # [B, KV, H/KV, T, D]
    return y.to(q.dtype).reshape(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.kv_cache: Optional[KVCache] = None

    def write_kv(self, x: Tensor, rope: tuple, input_pos: Tensor):
        """Project, rotate and store this step's keys and values; returns the whole cache."""
        return self.store_kv(*linears(x, (self.wk, self.wv)), rope, input_pos)

    def store_kv(self, k: Tensor, v: Tensor, rope: tuple, input_pos: Tensor):
        B, T, _ = k.shape
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), rope)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        return self.kv_cache.update(input_pos, k.transpose(1, 2), v.transpose(1, 2))

    def attend(self, x: Tensor, rope: tuple, mask: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Queries of x against the cache k, v (already holding this step's keys and values)."""
        return self.attend_q(self.wq(x), rope, mask, k, v)

    def attend_q(self, q: Tensor, rope: tuple, mask: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, T, _ = q.shape
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), rope).transpose(1, 2)
        k, v = k.narrow(2, 0, mask.shape[-1]), v.narrow(2, 0, mask.shape[-1])  # only the slots the mask covers
        with_wo = getattr(self.wo, "attention", None)  # the class's kernel for attention and wo in one call
        if (FEW_TOKEN_ATTENTION and ATTENTION_WITH_WO and with_wo is not None
                and not self.wo._forward_hooks):  # tp.py's all-reduce is a hook
            y = with_wo(q, k, v, mask, self.wo)
            if y is not None:
                return y
        if FEW_TOKEN_ATTENTION and T <= FEW_TOKENS and torch.compiler.is_compiling() and q.device.type == "cpu":
            y = few_token_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def forward(self, x: Tensor, rope: tuple, mask: Tensor, input_pos: Tensor) -> Tensor:
        q, k, v = linears(x, (self.wq, self.wk, self.wv))
        k, v = self.store_kv(k, v, rope, input_pos)
        return self.attend_q(q, rope, mask, k, v)


# False: swiglu() always runs as its linears and the activation between them (scripts/bench_decode_ab.py -mlp3)
SWIGLU_IN_ONE_CALL = True


def swiglu(x: Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> Tensor:
    """down(silu(gate(x)) * up(x)): the MLP of a layer and of FlexiDepth's adapter. Where the linears' class has a
    kernel for all of it (its swiglu(); few rows on CPU, cpu_kernels) it is one call, one parallel region: as three
    calls, each forking and joining the threads, it cost int4 decode 5% (BENCHMARKS.md). Not where a hook on down
    must see its output (tp.py's all-reduce)."""
    whole = getattr(gate, "swiglu", None)
    if (SWIGLU_IN_ONE_CALL and whole is not None and getattr(up, "swiglu", None) is whole
            and getattr(down, "swiglu", None) is whole and not down._forward_hooks):
        y = whole(x, gate, up, down)
        if y is not None:
            return y
    gate_out, up_out = linears(x, (gate, up))
    return down(F.silu(gate_out) * up_out)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.intermediate_size)  # gate
        self.w3 = Linear(args.dim, args.intermediate_size)  # up
        self.w2 = Linear(args.intermediate_size, args.dim)  # down

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.w1, self.w3, self.w2)


# False: a plain layer runs as its ops (scripts/bench_decode_ab.py -layer3)
LAYER_IN_ONE_CALL = True


def whole_layer(block: "TransformerBlock", x: Tensor, rope: tuple, mask: Tensor, input_pos: Tensor) -> Optional[Tensor]:
    """block.block(x, rope, mask, input_pos) from one call where the layer's linears' class has a kernel for the
    whole layer (its layer(): Linear where the kernel is the kind, Int8Linear, Int4Linear; few rows on CPU; the
    norms, the projections, the rope and the cache write, attention with wo, the MLP and both residual adds in one
    parallel region, cpu_kernels.cpp), else None; None also where a hook must see wo's or w2's output (tp.py's
    all-reduce). As three ops (the projections, attention with wo, the MLP) with inductor's kernels between them a
    decode step was slower (BENCHMARKS.md)."""
    attention, mlp = block.attention, block.feed_forward
    modules = (attention.wq, attention.wk, attention.wv, attention.wo, mlp.w1, mlp.w3, mlp.w2)  # the op's order
    whole = getattr(modules[0], "layer", None)
    if not (LAYER_IN_ONE_CALL and FEW_TOKEN_ATTENTION and ATTENTION_WITH_WO and SWIGLU_IN_ONE_CALL
            and whole is not None):
        return None
    for m in modules:
        if getattr(m, "layer", None) is not whole:
            return None
    if attention.wo._forward_hooks or mlp.w2._forward_hooks:  # the ops skip the others' hooks too (linears, swiglu)
        return None
    return whole(block, modules, x, rope, mask, input_pos)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, rope: tuple, mask: Tensor, input_pos: Tensor, regional: bool = False) -> Tensor:
        """regional: compiled as one region that every plain layer reuses (see Transformer.run_layers)."""
        return repeated_block(self, x, rope, mask, input_pos) if regional else self.block(x, rope, mask, input_pos)

    def block(self, x: Tensor, rope: tuple, mask: Tensor, input_pos: Tensor) -> Tensor:
        y = whole_layer(self, x, rope, mask, input_pos)
        return self.ops(x, rope, mask, input_pos) if y is None else y

    def ops(self, x: Tensor, rope: tuple, mask: Tensor, input_pos: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# the layer as its ops, never the layer op: a nested compile region refuses an op that writes its inputs (the layer
# op writes the cache), where the ops' index_copy_ into the cache is functionalized
repeated_block = torch.compiler.nested_compile_region(TransformerBlock.ops)


class Router(nn.Module):
    """FlexiDepth router: a bottleneck MLP on the layer's normed input, one logit per token."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.enc = Linear(args.dim, args.router_dim)
        self.norm = RMSNorm(args.router_dim, args.norm_eps)
        self.dec = Linear(args.router_dim, args.dim)
        self.head = Linear(args.dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dec(torch.tanh(self.norm(self.enc(x)))))


class Adapter(nn.Module):
    """The small MLP a skipped token goes through. The checkpoint's names are swapped relative to a Llama MLP:
    down_proj widens like the gate, up_proj brings the result back to dim."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.dim, args.adapter_dim)
        self.down_proj = Linear(args.dim, args.adapter_dim)
        self.up_proj = Linear(args.adapter_dim, args.dim)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj, self.down_proj, self.up_proj)


class FlexiDepthBlock(TransformerBlock):
    """A routed layer. Every token writes its K/V; a token whose gate is closed skips attention and MLP and
    goes through the adapter instead. The rule is route() + run_branch() + skip_branch(), shared by both forms:
    masking (all tokens through both branches, select per token: prefill, batches, the test reference) and
    real skip (one token: only the chosen branch runs)."""
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.router = Router(args)
        self.adapter = Adapter(args)
        # [max_batch, max_seq] bool, made by setup_caches: did the token at each position run this layer
        self.register_buffer("ran", None, persistent=False)
        for linear in (self.attention.wq, self.attention.wo, *self.feed_forward.children(), *self.adapter.children()):
            linear.in_branch = True  # one-token steps run these inside torch.cond (forward)

    def route(self, x: Tensor, rope: tuple, mask: Tensor, input_pos: Tensor, threshold: float):
        """The part every token takes: the gate w = sigmoid(router(input_norm(x))), the decision w > threshold, and
        this step's K/V written for every token. Returns (w, run, the operands both branches take)."""
        normed = self.attention_norm(x)
        w = torch.sigmoid(self.router(normed))  # [B, T, 1]
        k, v = self.attention.write_kv(normed, rope, input_pos)
        return w, w > threshold, (x, normed, w, rope, mask, k, v)

    def run_branch(self, x, normed, w, rope, mask, k, v):
        h = x + self.attention.attend(normed, rope, mask, k, v)
        return h + w * self.feed_forward(self.ffn_norm(h))

    def skip_branch(self, x, normed, w, rope, mask, k, v):
        return x + (1 - w) * self.adapter(self.ffn_norm(x))

    def masked(self, x: Tensor, rope: tuple, mask: Tensor, input_pos: Tensor, threshold: float,
               straight_through: bool = False):
        """The masking form: every token through both branches, each keeps its own. Returns (out, w, run).
        straight_through (router training) adds 0 to the value but gives w the gradient of switching branches,
        dLoss/dout . (run_out - skip_out); without it w only learns to scale the branch a token is already on."""
        w, run, operands = self.route(x, rope, mask, input_pos, threshold)
        run_out, skip_out = self.run_branch(*operands), self.skip_branch(*operands)
        out = torch.where(run, run_out, skip_out)
        if straight_through:
            out = out + (w - w.detach()) * (run_out - skip_out).detach()
        return out, w, run

    def forward(self, x: Tensor, rope: tuple, mask: Tensor, input_pos: Tensor, threshold: float = 0.5,
                real_skip: bool = False) -> Tensor:
        B = x.shape[0]
        if not real_skip:
            out, _, run = self.masked(x, rope, mask, input_pos, threshold)
        else:
            _, run, operands = self.route(x, rope, mask, input_pos, threshold)
            if torch.compiler.is_compiling():
                # a device-side branch: no host sync, and one graph for every skip pattern
                out = torch.cond(run.view(()), self.run_branch, self.skip_branch, operands)
            else:
                out = self.run_branch(*operands) if bool(run) else self.skip_branch(*operands)
        self.ran[:B].index_copy_(1, input_pos, run[..., 0])
        return out


EXIT_HEAD_KINDS = ("affine",)


class AffineExitHead(nn.Module):
    """h + A h + b on the layer-E hidden state (a "tuned lens" translator), before the shared final norm and LM head.
    A and b start at zero, so an untrained head is the plain early exit."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.proj = Linear(args.dim, args.dim)
        self.bias = nn.Parameter(torch.zeros(args.dim))
        nn.init.zeros_(self.proj.weight)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.proj(h) + self.bias


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(FlexiDepthBlock(args) if i in args.routing_layers else TransformerBlock(args)
                                    for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.exit_heads = nn.ModuleDict({str(e): AffineExitHead(args) for e in args.exit_heads})
        if args.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.arange(args.draft_vocab_size))
        # the draft's LM head: rows draft_vocab of output.weight, cut by setup_caches once the weights have their
        # final dtype and device (not a buffer: it is no part of the checkpoint, and plain decoding never reads it)
        self.draft_output_weight = None
        self.max_batch_size = -1
        self.max_seq_length = -1

    def trim_draft_head(self):
        weight = getattr(self.output, "weight", None)
        if not self.args.draft_vocab_size or weight is None or not weight.is_floating_point():
            return  # no draft vocabulary, or a quantized head: the draft reads the full head (still exact)
        stale = self.draft_output_weight is None or self.draft_output_weight.dtype != weight.dtype \
            or self.draft_output_weight.device != weight.device
        if stale:
            vocab = self.draft_vocab
            if vocab.dtype != torch.long or len(vocab) and not (0 <= int(vocab.min()) and int(vocab.max()) < len(weight)):
                raise ValueError(f"draft_vocab must hold token ids in 0..{len(weight) - 1} (int64)")
            self.draft_output_weight = weight.detach().index_select(0, vocab).contiguous()

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        self.trim_draft_head()
        if self.max_batch_size >= max_batch_size and self.max_seq_length >= max_seq_length:
            return
        dtype = self.norm.weight.dtype
        device = self.norm.weight.device
        for layer in self.layers:
            # the layer's own count: under tensor parallelism it holds only this rank's KV heads
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, layer.attention.n_kv_heads,
                                               self.args.head_dim, dtype).to(device)
        for layer in self.layers:
            if isinstance(layer, FlexiDepthBlock):
                layer.register_buffer("ran", torch.ones(max_batch_size, max_seq_length, dtype=torch.bool,
                                                        device=device), persistent=False)
        self.register_buffer("rope", rope_cache(self.args, max_seq_length).to(device), persistent=False)
        self.register_buffer("slots", torch.arange(max_seq_length, device=device), persistent=False)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    def embed(self, idx: Tensor) -> Tensor:
        return self.tok_embeddings(idx)

    def run_layers(self, x: Tensor, input_pos: Tensor, start: int, end: int, skip_threshold: float = 0.5,
                   masking: bool = False, regional: bool = False, slots: Optional[Tensor] = None) -> Tensor:
        """Layers [start, end) on hidden states x at positions input_pos (each writes its K/V there).
        FlexiDepth: a token runs a routed layer iff its gate exceeds skip_threshold (0.5 is the checkpoint's rule);
        a one-token step skips for real unless masking asks for the masking form (the reference in tests).
        regional (compiled one-token CPU steps, steps.compile_one_token): dynamo traces the plain block once and
        inductor compiles it once for every layer. Not for frozen graphs: a region's weights must stay inputs.
        slots: the cache slots attention reads, a prefix of self.slots (live_slots); all of them by default."""
        rope = rope_rows(self.rope, input_pos)
        mask = causal_mask(input_pos, self.slots if slots is None else slots)
        real_skip = x.shape[0] == 1 and x.shape[1] == 1 and not masking
        # a list, not self.layers[start:end]: dynamo would trace the building of that new ModuleList
        for layer in list(self.layers)[start:end]:
            if isinstance(layer, FlexiDepthBlock):
                x = layer(x, rope, mask, input_pos, skip_threshold, real_skip)
            else:
                x = layer(x, rope, mask, input_pos, regional)
        return x

    def layers_ran(self, positions: Tensor) -> Tensor:
        """FlexiDepth record, [len(positions), n_layers] bool: which layers the token at each position (batch row 0)
        ran, as written by the last forward over that position. Plain layers always run."""
        rows = [layer.ran[0, positions] if isinstance(layer, FlexiDepthBlock)
                else torch.ones(len(positions), dtype=torch.bool, device=positions.device) for layer in self.layers]
        return torch.stack(rows, dim=1)

    def head(self, x: Tensor) -> Tensor:
        return self.output(self.norm(x))

    def exit_logits(self, h: Tensor, early_exit: int) -> Tensor:
        """The self-speculative draft's logits from the layer-E hidden state h: the exit head at E if the model has
        one, the final norm, then the draft LM head. With a draft vocabulary the logits of every other token are
        -inf (probability 0 in the draft: the acceptance rule stays exact), in full-vocabulary order."""
        head = self.exit_heads[str(early_exit)] if str(early_exit) in self.exit_heads else None
        x = self.norm(head(h) if head is not None else h)
        if self.draft_output_weight is None:
            return self.output(x)
        logits = linear(x, self.draft_output_weight)
        full = logits.new_full((*logits.shape[:-1], self.args.vocab_size), float("-inf"))
        return full.index_copy(-1, self.draft_vocab, logits)

    def forward(self, idx: Tensor, input_pos: Tensor, skip_threshold: float = 0.5, masking: bool = False,
                regional: bool = False, slots: Optional[Tensor] = None) -> Tensor:
        return self.head(self.run_layers(self.embed(idx), input_pos, 0, self.args.n_layers, skip_threshold, masking,
                                         regional, slots))
