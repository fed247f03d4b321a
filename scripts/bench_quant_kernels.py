"""One-token (batch 1) weight-only int8 / int4 kernels per SmolLM2 linear shape, against the bf16 GEMV.

    python scripts/bench_quant_kernels.py                       # 1 thread, all kernels
    python scripts/bench_quant_kernels.py --threads 2 --kernels bf16 int8_torch int4_torch

Each shape is stacked --mb MB deep (in bf16; more than the last-level cache, so weights stream from memory) and
computed by one compiled kernel over all copies (the torch kernels: one call per copy), so the figure is the
kernel's streaming rate without per-call overhead. Times are this process's CPU time (the median-ish quarter of
--repeats), which holds up on a shared machine; GB/s counts the bytes each kernel must read (weights, scales,
zeros). The sum row is torch's read rate over a buffer of the same size, the memory limit.

Kernels: bf16 = model.Linear's one-token multiply-and-sum; int8_torch / int4_torch = torch._weight_int8pack_mm /
torch._weight_int4pack_mm_for_cpu (quantize.py's path for many rows); *_ours = cpu_kernels.cpp (quantize.py's path
for few rows; one call per copy, like the torch kernels); the others are inductor-generated dequantize-and-reduce:
int8 converted to bf16 or to fp32 along the contiguous rows (_rows), or with the weight transposed so the
reduction runs down columns (_cols); int4 with the group's scale applied after the group's reduction (_groups) or
to every element (_elements), nibbles paired as (j, j + 16) within a group of 32 (contiguous activations) or as
the file's (2j, 2j + 1) (_file: strided activations).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cpu_kernels  # noqa: E402
from quantize import quantize_int4, quantize_int8, unpack_int4  # noqa: E402

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M: (out, in)
GS = 32
bf16, f32 = torch.bfloat16, torch.float32


def bf16_gemv(x, w):
    return (x[:, None, :] * w).sum(-1, dtype=f32).to(bf16)


def int8_rows_bf16(x, q, s):
    return ((x[:, None, :] * q.to(bf16)).sum(-1, dtype=f32) * s).to(bf16)


def int8_rows_fp32(x, q, s):
    return ((x.float()[:, None, :] * q.float()).sum(-1) * s.float()).to(bf16)


def int8_cols(x, q_t, s):
    return ((x[:, :, None] * q_t.to(bf16)).sum(1, dtype=f32) * s).to(bf16)


def int8_torch(x, q, s):
    return torch.stack([torch._weight_int8pack_mm(x[i:i + 1], q[i], s[i])[0] for i in range(len(q))])


def int4_torch(x, packed, scales_and_zeros):
    return torch.stack([torch._weight_int4pack_mm_for_cpu(x[i:i + 1], packed[i], GS, scales_and_zeros[i])[0]
                        for i in range(len(packed))])


def int4_groups(x, b, s, z8):
    """b [L, N, G, 16]: low nibble column j, high nibble column j + 16 of the group; w = q * s + z8."""
    L, N, G, H = b.shape
    xg = x.float().view(L, 1, G, 2, H)
    dot = (xg[:, :, :, 0] * (b & 15).float() + xg[:, :, :, 1] * (b >> 4).float()).sum(-1)
    return ((dot * s.float()).sum(-1) + (z8.float() * xg.sum((-1, -2))).sum(-1)).to(bf16)


def int4_elements(x, b, s, z8):
    L, N, G, H = b.shape
    xg = x.float().view(L, 1, G, 2, H)
    sf, zf = s.float()[..., None], z8.float()[..., None]
    return (xg[:, :, :, 0] * ((b & 15).float() * sf + zf) + xg[:, :, :, 1] * ((b >> 4).float() * sf + zf)
            ).sum((-1, -2)).to(bf16)


def int4_groups_file(x, b, s, z8):
    """b [L, N, G, 16] in the file's layout: column 2j in the high nibble, 2j + 1 in the low one."""
    L, N, G, H = b.shape
    xg = x.float().view(L, 1, G, H, 2)
    dot = (xg[..., 0] * (b >> 4).float() + xg[..., 1] * (b & 15).float()).sum(-1)
    return ((dot * s.float()).sum(-1) + (z8.float() * xg.sum((-1, -2))).sum(-1)).to(bf16)


def bf16_ours(x, ws):
    return torch.stack([cpu_kernels.linear(x[i:i + 1], [w])[0] for i, w in enumerate(ws)])


def int8_ours(x, q, s):
    return torch.stack([cpu_kernels.linear_int8(x[i:i + 1], [q[i]], [s[i]])[0] for i in range(len(q))])


def int4_ours(x, nibbles, scales_zeros):
    return torch.stack([cpu_kernels.linear_int4(x[i:i + 1], [n], [sz])[0]
                        for i, (n, sz) in enumerate(zip(nibbles, scales_zeros))])


KERNELS = {"bf16": bf16_gemv, "bf16_ours": bf16_ours, "int8_ours": int8_ours, "int4_ours": int4_ours, "int8_torch": int8_torch, "int8_rows_bf16": int8_rows_bf16,
           "int8_rows_fp32": int8_rows_fp32, "int8_cols": int8_cols, "int4_torch": int4_torch,
           "int4_groups": int4_groups, "int4_elements": int4_elements, "int4_groups_file": int4_groups_file}


def operands(kernel: str, ws: list) -> tuple:
    """(the kernel's weight operands for the stacked copies, bytes it reads per copy)."""
    N, K = ws[0].shape
    if kernel == "bf16":
        return (torch.stack(ws).to(bf16),), N * K * 2
    if kernel == "bf16_ours":
        return ([w.to(bf16) for w in ws],), N * K * 2
    if kernel.startswith("int8"):
        qs = [quantize_int8(w) for w in ws]
        q = torch.stack([q.t().contiguous() if kernel == "int8_cols" else q for q, _ in qs])
        return (q, torch.stack([s for _, s in qs]).to(bf16)), N * K + N * 2
    qs = [quantize_int4(w, GS) for w in ws]
    nbytes = N * K // 2 + N * (K // GS) * 4
    if kernel == "int4_ours":
        interleaved = [cpu_kernels.interleave_int4(n, s.to(bf16), z.to(bf16)) for n, s, z in qs]
        return ([w for w, _ in interleaved], [sz for _, sz in interleaved]), nbytes
    if kernel == "int4_torch":
        packed = [torch._convert_weight_to_int4pack_for_cpu(unpack_int4(n).to(torch.int32), 2) for n, _, _ in qs]
        sz = [torch.stack([s.to(bf16), z.to(bf16)], -1).transpose(0, 1).contiguous() for _, s, z in qs]
        return (packed, sz), nbytes
    s = torch.stack([s for _, s, _ in qs]).to(bf16)
    z8 = torch.stack([z.float() - 8 * s_.float() for _, s_, z in qs]).to(bf16)  # (q - 8) * s + z = q * s + z8
    if kernel == "int4_groups_file":
        b = torch.stack([n.view(N, K // GS, GS // 2) for n, _, _ in qs])
    else:
        q = torch.stack([unpack_int4(n).view(N, K // GS, 2, GS // 2) for n, _, _ in qs])
        b = (q[..., 0, :] | (q[..., 1, :] << 4)).contiguous()
    return (b, s, z8), nbytes


def cpu_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return sorted(times)[len(times) // 4]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mb", type=float, default=48.0, help="bf16 MB per shape stack (above the last-level cache)")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--quality", type=Path, default=None, metavar="MODEL_PTH",
                   help="instead: the perplexity of one-token decode on real text with this model.pth, bf16 against "
                        "its int8/int4 files (model_int8.pth, model_int4.g32.pth beside it) with cpu_kernels and "
                        "with torch's kernels")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quality:
        return decode_quality(args.quality)
    if any(name.endswith("ours") for name in args.kernels) and not cpu_kernels.load():
        raise SystemExit("error: cpu_kernels could not be built here; leave out the *_ours kernels")
    torch._dynamo.config.recompile_limit = torch._dynamo.config.cache_size_limit = 64
    print(f"µs per linear and GB/s, {args.threads} thread(s), CPU time, torch {torch.__version__}\n")
    print("| shape (out x in) | copies | sum GB/s | " + " | ".join(args.kernels) + " |")
    print("|---" * (3 + len(args.kernels)) + "|")
    for N, K in SHAPES:
        copies = max(1, int(args.mb * 1e6 // (N * K * 2)))
        torch.manual_seed(0)
        ws = [torch.randn(N, K) * 0.02 for _ in range(copies)]
        x = torch.randn(copies, K, dtype=bf16)
        reference = (x.float()[:, None, :] * torch.stack(ws)).sum(-1)
        buffer = torch.ones(copies * N * K // 2)
        cells = [f"{N}x{K}", str(copies), f"{buffer.numel() * 4 / cpu_seconds(buffer.sum, 5) / 1e9:.1f}"]
        for name in args.kernels:
            weights, nbytes = operands(name, ws)
            fn = KERNELS[name]
            run = fn if name.endswith(("torch", "ours")) else torch.compile(fn, fullgraph=True)
            with torch.no_grad():
                y = run(x, *weights).float()
                error = float((y - reference).norm() / reference.norm())
                if error > 0.15:  # int4's rounding alone is ~0.1 on these weights; a wrong layout gives ~1.4
                    raise RuntimeError(f"{name} on {N}x{K} is wrong: relative error {error:.2f}")
                seconds = cpu_seconds(lambda: run(x, *weights), args.repeats)
            cells.append(f"{seconds / copies * 1e6:.1f} µs, {nbytes * copies / seconds / 1e9:.1f}")
        print("| " + " | ".join(cells) + " |", flush=True)


def decode_perplexity(model, tokens) -> float:
    """exp(mean NLL) of tokens[1:], each predicted by a one-token decode step (eager: the path of few rows)."""
    model.setup_caches(1, len(tokens))
    nll = 0.0
    with torch.no_grad():
        for pos in range(len(tokens) - 1):
            logits = model(tokens[pos].view(1, 1), torch.tensor([pos]))[0, -1].float()
            nll -= torch.log_softmax(logits, -1)[tokens[pos + 1]].item()
    return float(torch.tensor(nll / (len(tokens) - 1)).exp())


def decode_quality(model_path: Path, n_tokens: int = 384):
    """bf16 against its quantized files, int4's activations rounded to int8 by cpu_kernels or not (torch's)."""
    import generate
    from pydoc_data.topics import topics
    from tokenizer import load_tokenizer
    text = " ".join(topics[key] for key in sorted(topics))[:20000]
    tokens = torch.tensor(load_tokenizer(model_path.parent).encode(text, add_special_tokens=False)[:n_tokens])
    print(f"one-token decode perplexity, {len(tokens)} tokens of pydoc_data.topics, bf16 activations\n")
    print("| weights | kernels | perplexity |\n|---|---|---|")
    print(f"| bf16 | F.linear | {decode_perplexity(generate.load_model(model_path, 'cpu', bf16), tokens):.3f} |")
    for name in ("model_int8.pth", "model_int4.g32.pth"):
        path = model_path.parent / name
        if not path.exists():
            print(f"| {name} | – | not found (quantize.py writes it) |")
            continue
        for kernels in ("cpu_kernels", "torch"):
            cpu_kernels.LOADED = kernels == "cpu_kernels" and cpu_kernels.load()
            model = generate.load_model(path, "cpu", bf16)
            print(f"| {name} | {kernels} | {decode_perplexity(model, tokens):.3f} |", flush=True)
    cpu_kernels.LOADED = cpu_kernels.load()


if __name__ == "__main__":
    main()
