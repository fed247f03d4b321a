"""Weight-only int8 and int4 quantization of a converted checkpoint.

    python quantize.py --checkpoint_path checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth --mode int8
    python quantize.py --checkpoint_path .../model.pth --mode int4 --groupsize 32

int8: symmetric, one scale per output channel. int4: asymmetric, a scale and a zero per group of `groupsize` input
columns. The LM head is int8 in both modes (linear_modes says why); FlexiDepth routers and adapters are not
quantized.

The file is device-neutral: int8 weights [N, K] + scales [N]; int4 weights as two 4-bit values per byte
[N, K/2] (even column in the high nibble) + scales and zeros [N, K/groupsize]. Every kernel dequantizes int4 as
(q - 8) * scale + zero, so `zeros` are stored in that form. The file carries its mode under the key
"quantization", which is how generate.py recognises it.

Kernels: calls of at most cpu_kernels.MAX_ROWS rows on CPU (decode, draft, verify) take cpu_kernels.cpp's int8 and
int4 kernels, which stream the file's int8 rows, and int4 rows interleaved 16 at a time (Int4Linear.pack)
(BENCHMARKS.md: 1.6-2.3x torch's at one row); more rows (prefill), CUDA, and CPUs where the kernels cannot be
built take torch._weight_int8pack_mm and torch._weight_int4pack_mm(_for_cpu), whose packed int4 layout differs per
device, so load_model packs at load time (pack_for_device). An inductor-generated dequantize-and-reduce loses to
both (scripts/bench_quant_kernels.py): it converts int8/int4 to float at ~5 GB/s a core, and under compile_steps'
freezing a `.float()` dequantization of a frozen int8 weight is constant-folded into an fp32 copy (4 bytes a weight
read per token).
"""
import argparse
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

import cpu_kernels
from cli import main_guard, save_atomic
from model import INT4_ROW_MULTIPLE, ModelArgs, Transformer

MODES = ("int8", "int4")
GROUPSIZES = (32, 64, 128, 256)


def linear_modes(model: nn.Module, mode: str) -> dict:
    """{linear name: "int8" or "int4"}: the linears that get quantized, and how. Every layer projection takes the
    file's mode. The LM head is quantized too (tied to the embedding in SmolLM2 / Llama 3.2, it is ~21% of the
    bytes read per token; compiled int8 decode measured no slower with it int8 than with it bf16), but always to
    int8: at int4 it alone costs ~4% perplexity on the offline default (the layers' cost is ~0), the reason
    llama.cpp's 4-bit files keep their output tensor at 6 bits. FlexiDepth routers and adapters stay in high
    precision (small, and the router's 0.5 threshold is sensitive to rounding)."""
    return {name: "int8" if name == "output" else mode for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not {"router", "adapter"} & set(name.split("."))}


# ---------------------------------------------------------------- the numbers

def quantize_int8(w: Tensor):
    """w [N, K] -> (int8 [N, K], scales [N] in w's dtype), w ~ q * scale, symmetric (q in -127..127)."""
    scales = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-12).to(w.dtype)
    q = torch.round(w.float() / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales.float()[:, None]


def quantize_int4(w: Tensor, groupsize: int):
    """w [N, K] -> (uint8 nibbles [N, K/2], scales [N, K/g], zeros [N, K/g]), w ~ (q - 8) * scale + zero per
    group, q in 0..15. Scale and zero are rounded to w's dtype before q is chosen, so q fits the stored values."""
    N, K = w.shape
    groups = w.float().reshape(N, K // groupsize, groupsize)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12).to(w.dtype)
    zeros = (lo + 8 * scales.float()).to(w.dtype)
    q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    q = q.to(torch.uint8).reshape(N, K)
    return (q[:, 0::2] << 4) | q[:, 1::2], scales, zeros


def unpack_int4(nibbles: Tensor) -> Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] of values 0..15."""
    return torch.stack([nibbles >> 4, nibbles & 15], dim=-1).reshape(nibbles.shape[0], -1)


def dequantize_int4(nibbles: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    q = unpack_int4(nibbles).float()
    N, K = q.shape
    groups = q.reshape(N, scales.shape[1], -1)
    return ((groups - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, K)


# ---------------------------------------------------------------- the modules

class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T. TP: column-parallel shards weight rows and scales together;
    row-parallel shards weight columns and keeps scales whole."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        few_rows = Int8Linear.joined(x, (self,))
        if few_rows is not None:
            return few_rows[0]
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def joined(x: Tensor, modules: tuple) -> Optional[list]:
        """Every module's output from one kernel call (model.linears), or None where the kernel does not take them."""
        weights = [m.weight for m in modules]
        if not cpu_kernels.supports(x, weights, modules[0].in_features):
            return None
        y = cpu_kernels.linear_int8(x, weights, [m.scales for m in modules])
        return y.split([w.shape[0] for w in weights], dim=-1)

    @staticmethod
    def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, wo: "Int8Linear") -> Optional[Tensor]:
        """wo(few_token_attention(q, k, v, mask)) from one kernel call (model.Attention.attend_q), or None where the
        kernel does not take it (cpu_kernels.takes_attention)."""
        if not cpu_kernels.takes_attention(q, k, [wo.weight]):
            return None
        return torch.ops.flexfast.attention_int8(q, k, v, mask, wo.weight, wo.scales)

    @staticmethod
    def layer(block, modules: tuple, x: Tensor, rope: tuple, mask: Tensor, input_pos: Tensor) -> Optional[Tensor]:
        """A plain layer of these linears from one kernel call (model.whole_layer), or None where it does not take
        it."""
        weights, scales = [], []
        for m in modules:
            weights.append(m.weight)
            scales.append(m.scales)
        return cpu_kernels.layer(block, modules, weights, scales, x, rope, mask, input_pos)

    @staticmethod
    def swiglu(x: Tensor, gate: "Int8Linear", up: "Int8Linear", down: "Int8Linear") -> Optional[Tensor]:
        """down(silu(gate(x)) * up(x)) from one kernel call (model.swiglu), or None where the kernel does not take
        it."""
        if not (cpu_kernels.supports(x, [gate.weight, up.weight], gate.in_features)
                and cpu_kernels.supports(x, [down.weight], down.in_features)):
            return None
        return torch.ops.flexfast.swiglu_int8(x, gate.weight, gate.scales, up.weight, up.scales, down.weight,
                                              down.scales)


class Int4Linear(nn.Module):
    """Holds the file's device-neutral form (weight uint8 [N, K/2], scales, zeros [N, K/g]) until pack() turns it
    into the kernel's layout for one device (weight packed, scales_and_zeros [K/g, N, 2]). On CPU with cpu_kernels
    it also keeps a copy in their int4 layout (nibbles, kernel_scales_zeros; cpu_kernels.interleave_int4) for few-row
    calls: int4 weights are held twice, still half the bf16 bytes, and each call reads one copy. TP shards the neutral
    form, before pack(): column-parallel splits rows of all three; row-parallel splits columns (K/N_ranks must stay
    a multiple of groupsize)."""

    def __init__(self, in_features: int, out_features: int, groupsize: int, device=None):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        n_groups = in_features // groupsize
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, n_groups, device=device), requires_grad=False)
        self.zeros = nn.Parameter(torch.empty(out_features, n_groups, device=device), requires_grad=False)
        self.packed_for = None  # "cpu" or "cuda" once packed

    def pack(self):
        device, dtype = self.weight.device, self.scales.dtype
        scales_and_zeros = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous()
        if device.type == "cuda":
            if dtype != torch.bfloat16:
                raise ValueError(f"int4 on CUDA runs only in bf16 (torch._weight_int4pack_mm), not "
                                 f"{str(dtype).replace('torch.', '')}: use --precision bf16")
            if torch.cuda.get_device_capability(device) < (8, 0):
                raise ValueError("int4 on CUDA needs a GPU of compute capability 8.0 or newer")
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            packed = torch._convert_weight_to_int4pack(self.weight.contiguous(), inner_k_tiles)
        elif device.type == "cpu":
            packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight).to(torch.int32), 2)
            if cpu_kernels.load():  # few rows take cpu_kernels' int4 kernel (torch's packing also needs N % 16 == 0)
                nibbles, scales_zeros = cpu_kernels.interleave_int4(self.weight, self.scales, self.zeros)
                self.nibbles = nn.Parameter(nibbles, requires_grad=False)
                self.kernel_scales_zeros = nn.Parameter(scales_zeros, requires_grad=False)
        else:
            raise ValueError(f"int4 has no kernel on device {device.type!r}")
        del self.scales, self.zeros
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.scales_and_zeros = nn.Parameter(scales_and_zeros, requires_grad=False)
        self.packed_for = device.type

    def forward(self, x: Tensor) -> Tensor:
        few_rows = Int4Linear.joined(x, (self,))
        if few_rows is not None:
            return few_rows[0]
        x2 = x.reshape(-1, x.shape[-1])
        if self.packed_for == "cuda":
            y = torch._weight_int4pack_mm(x2, self.weight, self.groupsize, self.scales_and_zeros)
        elif self.packed_for == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.groupsize, self.scales_and_zeros)
        else:
            raise RuntimeError("Int4Linear used before pack_for_device")
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def joined(x: Tensor, modules: tuple) -> Optional[list]:
        """Every module's output from one kernel call (model.linears), or None where the kernel does not take them."""
        if not hasattr(modules[0], "nibbles"):  # packed for CUDA, or the kernels did not load
            return None
        weights = [m.nibbles for m in modules]
        if not cpu_kernels.supports(x, weights, modules[0].in_features):
            return None
        y = cpu_kernels.linear_int4(x, weights, [m.kernel_scales_zeros for m in modules])
        return y.split([w.shape[0] for w in weights], dim=-1)

    @staticmethod
    def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, wo: "Int4Linear") -> Optional[Tensor]:
        """wo(few_token_attention(q, k, v, mask)) from one kernel call (model.Attention.attend_q), or None where the
        kernel does not take it (cpu_kernels.takes_attention)."""
        if not (hasattr(wo, "nibbles") and cpu_kernels.takes_attention(q, k, [wo.nibbles])):
            return None
        return torch.ops.flexfast.attention_int4(q, k, v, mask, wo.nibbles, wo.kernel_scales_zeros)

    @staticmethod
    def layer(block, modules: tuple, x: Tensor, rope: tuple, mask: Tensor, input_pos: Tensor) -> Optional[Tensor]:
        """A plain layer of these linears from one kernel call (model.whole_layer), or None where it does not take
        it or they were packed for CUDA."""
        weights, scales = [], []
        for m in modules:
            if not hasattr(m, "nibbles"):
                return None
            weights.append(m.nibbles)
            scales.append(m.kernel_scales_zeros)
        return cpu_kernels.layer(block, modules, weights, scales, x, rope, mask, input_pos)

    @staticmethod
    def swiglu(x: Tensor, gate: "Int4Linear", up: "Int4Linear", down: "Int4Linear") -> Optional[Tensor]:
        """down(silu(gate(x)) * up(x)) from one kernel call (model.swiglu), or None where the kernel does not take
        it."""
        if not (hasattr(gate, "nibbles") and hasattr(up, "nibbles") and hasattr(down, "nibbles")):
            return None
        if not (cpu_kernels.supports(x, [gate.nibbles, up.nibbles], gate.in_features)
                and cpu_kernels.supports(x, [down.nibbles], down.in_features)):
            return None
        return torch.ops.flexfast.swiglu_int4(x, gate.nibbles, gate.kernel_scales_zeros, up.nibbles,
                                              up.kernel_scales_zeros, down.nibbles, down.kernel_scales_zeros)


def check_quantization(quantization) -> dict:
    mode = quantization.get("mode") if isinstance(quantization, dict) else None
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (known: {', '.join(MODES)})")
    if mode == "int4" and quantization.get("groupsize") not in GROUPSIZES:
        raise ValueError(f"int4 groupsize must be one of {GROUPSIZES}, got {quantization.get('groupsize')!r}")
    return quantization


def prepare_quantized_model(model: Transformer, quantization: dict) -> Transformer:
    """Swap the quantized linears for Int8Linear / Int4Linear of the same shape (on the model's device, usually
    meta) so that load_state_dict(assign=True, strict=True) takes the quantized file."""
    check_quantization(quantization)
    for name, mode in linear_modes(model, quantization["mode"]).items():
        linear = model.get_submodule(name)
        K, N, device = linear.in_features, linear.out_features, linear.weight.device
        if mode == "int8":
            new = Int8Linear(K, N, device=device)
        else:
            new = Int4Linear(K, N, quantization["groupsize"], device=device)
        model.set_submodule(name, new)
    model.quantization = dict(quantization)
    return model


def pack_for_device(model: nn.Module, device) -> None:
    """Turn int4 weights into the layout of the device they are on (int8 needs no packing); on CPU load
    cpu_kernels, which take calls of few rows."""
    if torch.device(device).type == "cpu":
        cpu_kernels.load()
    for m in model.modules():
        if isinstance(m, Int4Linear) and m.packed_for is None:
            m.pack()


# ---------------------------------------------------------------- writing a quantized file

def output_name(mode: str, groupsize) -> str:
    return "model_int8.pth" if mode == "int8" else f"model_int4.g{groupsize}.pth"


def quantize(checkpoint_path, mode: str, groupsize=None) -> Path:
    checkpoint_path = Path(checkpoint_path)
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r} (choose {' or '.join(MODES)})")
    if mode == "int8" and groupsize is not None:
        raise ValueError("--groupsize applies to int4 only (int8 scales are per output channel)")
    if mode == "int4":
        groupsize = 32 if groupsize is None else groupsize
        if groupsize not in GROUPSIZES:
            raise ValueError(f"--groupsize must be one of {', '.join(map(str, GROUPSIZES))}, got {groupsize}")
    quantization = check_quantization({"mode": mode} if mode == "int8" else {"mode": mode, "groupsize": groupsize})
    if not checkpoint_path.exists():
        raise FileNotFoundError(f"{checkpoint_path} not found")
    args = ModelArgs.from_folder(checkpoint_path.parent)
    try:
        state_dict = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {checkpoint_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not isinstance(state_dict, dict):
        raise ValueError(f"{checkpoint_path} does not hold a state dict")
    if "quantization" in state_dict:
        raise ValueError(f"{checkpoint_path} is already quantized ({state_dict['quantization'].get('mode')}); "
                         f"quantize the float model.pth")
    with torch.device("meta"):
        model = Transformer(args)
    modes = linear_modes(model, mode)

    def float_weight(name):
        key = f"{name}.weight"
        if key not in state_dict and name == "output" and args.tie_embeddings:
            key = "tok_embeddings.weight"  # tied: the head gets its own quantized copy of the embedding
        if key not in state_dict:
            raise ValueError(f"{checkpoint_path} has no {key}")
        return state_dict[key]

    # Check every shape before doing any work, so that a bad groupsize fails at once.
    for name, linear_mode in modes.items():
        N, K = float_weight(name).shape
        if linear_mode == "int4" and K % groupsize:
            raise ValueError(f"groupsize {groupsize} does not divide {name}'s {K} input features")
        if linear_mode == "int4" and N % INT4_ROW_MULTIPLE:
            raise ValueError(f"int4 needs output features divisible by {INT4_ROW_MULTIPLE}; {name} has {N}")

    out = dict(state_dict)
    for name, linear_mode in tqdm(modes.items(), desc=f"quantizing to {mode}", unit="linear"):
        w = float_weight(name)
        if linear_mode == "int8":
            out[f"{name}.weight"], out[f"{name}.scales"] = quantize_int8(w)
        else:
            out[f"{name}.weight"], out[f"{name}.scales"], out[f"{name}.zeros"] = quantize_int4(w, groupsize)
    out["quantization"] = quantization
    path = checkpoint_path.parent / output_name(mode, groupsize)
    save_atomic(out, path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Weight-only int8 / int4 quantization of a converted model.pth")
    parser.add_argument("--checkpoint_path", type=Path,
                        default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth"))
    parser.add_argument("--mode", type=str, default="int8", help="int8 or int4")
    parser.add_argument("--groupsize", type=str, default=None, help="int4 group size: 32, 64, 128 or 256")
    args = parser.parse_args(argv)

    def run():
        if args.groupsize is not None and not args.groupsize.isdigit():
            raise ValueError(f"--groupsize must be one of {', '.join(map(str, GROUPSIZES))}, got {args.groupsize!r}")
        groupsize = None if args.groupsize is None else int(args.groupsize)
        return quantize(args.checkpoint_path, args.mode, groupsize)

    path = main_guard(run, "quantization")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
