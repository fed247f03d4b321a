"""FlexiDepth real skipping: decode tok/s against the fraction of routed layers skipped, beside the ideal that
bytes read per token predict.

Builds a FlexiDepth checkpoint from the real SmolLM2-135M weights with random routers and adapters on
--routing_layers (HF tensor names, model_type "ddllama"; converted with our converter), then forces the skipped
fraction through the threshold: 0% (threshold 0) and 100% (threshold 1) exactly, 25/50/75% by quantiles of the
router gates seen on the prompt. The ideal for a fraction is tok/s at 0% x bytes(0%) / bytes(fraction):
what decode would reach if time went only into reading weights.

    python scripts/bench_flexidepth.py --compile
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert_hf_checkpoint import convert  # noqa: E402
from generate import Steps, compile_steps, load_model  # noqa: E402
from model import FlexiDepthBlock  # noqa: E402

DEFAULT_SOURCE = ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"


def random_router_weights(config: dict, routing_layers: list, seed: int) -> dict:
    """A random router and adapter per routed layer, HF tensor names. The router head is scaled so that the gate's
    logit spreads around 0: about half the tokens skip each routed layer."""
    dim, ffn = config["hidden_size"], config["intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) / shape[-1] ** 0.5
    weights = {}
    for i in routing_layers:
        p = f"model.layers.{i}."
        weights[p + "router.router_enc.weight"] = rand(dim // 16, dim)
        weights[p + "router.router_norm.weight"] = 1 + 0.1 * torch.randn(dim // 16, generator=g)
        weights[p + "router.router_dec.weight"] = rand(dim, dim // 16)
        weights[p + "router.router_head.weight"] = 4 * rand(1, dim)
        weights[p + "router_proj.gate_proj.weight"] = rand(ffn // 16, dim)
        weights[p + "router_proj.down_proj.weight"] = rand(ffn // 16, dim)
        weights[p + "router_proj.up_proj.weight"] = rand(dim, ffn // 16)
    return weights


def write_flexidepth_folder(source: Path, out: Path, routing_layers: list, seed: int = 0) -> Path:
    """An HF folder: the source weights unchanged plus a random router and adapter on each routed layer."""
    from safetensors.torch import load_file, save_file
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "ddllama"
    config["routing_layers"] = routing_layers
    weights = load_file(str(source / "model.safetensors"))
    weights.update(random_router_weights(config, routing_layers, seed))
    out.mkdir(parents=True, exist_ok=True)
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tmp = out / ".model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    tmp.rename(out / "model.safetensors")
    return convert(out)


def tensor_bytes(module: torch.nn.Module, skip=()) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if not n.startswith(skip))


def bytes_per_token(model, skipped_fraction: float) -> float:
    """Weights read for one decoded token when that fraction of routed-layer decisions skips. A skipped layer reads
    its router, norms, k/v projections and adapter; a layer that runs reads everything but the adapter."""
    total = 0.0
    seen = set()
    for name, p in model.named_parameters():
        if name.startswith("layers.") or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()  # final norm + the (tied) LM head
    for layer in model.layers:
        if not isinstance(layer, FlexiDepthBlock):
            total += tensor_bytes(layer)
            continue
        ran = tensor_bytes(layer, skip=("adapter",))
        skipped = (tensor_bytes(layer.router) + tensor_bytes(layer.adapter) + tensor_bytes(layer.attention_norm)
                   + tensor_bytes(layer.ffn_norm) + tensor_bytes(layer.attention.wk) + tensor_bytes(layer.attention.wv))
        total += (1 - skipped_fraction) * ran + skipped_fraction * skipped
    return total


@torch.no_grad()
def router_gates(model, prompt: torch.Tensor) -> torch.Tensor:
    """The gate values of every routed layer on the prompt (eager masking forward)."""
    gates = []
    hooks = [layer.router.register_forward_hook(lambda m, i, o: gates.append(torch.sigmoid(o).flatten()))
             for layer in model.layers if isinstance(layer, FlexiDepthBlock)]
    model(prompt[None], torch.arange(len(prompt)))
    for h in hooks:
        h.remove()
    return torch.cat(gates)


@torch.no_grad()
def decode_rate(model, steps, prompt, n_tokens, skip_threshold=0.5):
    """Greedy decode after a prefill; tokens per second of wall time and of this process's CPU time (the second
    is the steadier figure on a shared machine when running on one thread)."""
    T = len(prompt)
    token = steps.prefill(model, prompt[None], torch.arange(T, device=prompt.device), skip_threshold).argmax(-1)
    wall, cpu = time.perf_counter(), time.process_time()
    for pos in range(T, T + n_tokens):
        token = steps.decode(model, token.view(1, 1), torch.tensor([pos], device=prompt.device),
                             skip_threshold).argmax(-1)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return n_tokens / (time.perf_counter() - wall), n_tokens / (time.process_time() - cpu)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="HF folder with model.safetensors")
    p.add_argument("--out", type=Path, default=ROOT / "checkpoints/bench/SmolLM2-135M-FlexiDepth-random")
    p.add_argument("--routing_layers", type=str, default="15-29", help="first-last (inclusive)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="sweeps; each figure is the best of them")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--masking_row", action="store_true", help="also time the masking form at 50%% (another compile)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        first, last = (int(v) for v in args.routing_layers.split("-"))
    except ValueError:
        sys.exit(f"error: --routing_layers must look like 15-29, got {args.routing_layers!r}")
    routing_layers = list(range(first, last + 1))
    try:
        if not (args.out / "model.pth").exists() or \
                json.loads((args.out / "config.json").read_text()).get("routing_layers") != routing_layers:
            print(f"writing {args.out} (random routers on layers {first}..{last})")
            write_flexidepth_folder(args.source, args.out, routing_layers)
        precision = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
        model = load_model(args.out / "model.pth", args.device, precision)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args.out)
    text = "Write a short story about a lighthouse keeper who finds a message in a bottle. " * 2
    prompt = torch.tensor(tokenizer.encode(text), device=args.device)
    model.setup_caches(1, len(prompt) + args.max_new_tokens + 1)
    gates = router_gates(model, prompt).float()
    # gate > threshold runs the layer; threshold 0 runs all, 1 skips all, quantiles split the rest
    targets = [0.0, 0.25, 0.5, 0.75, 1.0]
    thresholds = [0.0] + [float(torch.quantile(gates, f)) for f in targets[1:-1]] + [1.0]
    steps = compile_steps(args.device, False) if args.compile else Steps()
    print(f"{args.out.name}: {model.args.n_layers} layers, routed {first}..{last}, {args.precision}, {args.device}, "
          f"{'compiled' if args.compile else 'eager'}, {args.max_new_tokens} tokens")
    print(f"{'target':>7} {'skipped':>8} {'layers':>7} {'MB/token':>9} | {'wall tok/s':>10} {'ideal':>7} {'ratio':>6} "
          f"| {'cpu tok/s':>10} {'ideal':>7} {'ratio':>6}")
    n = args.max_new_tokens
    best = {}  # fraction -> (wall tok/s, cpu tok/s, skipped fraction, mean layers); best of --rounds, for a shared box
    for _ in tqdm(range(args.rounds), desc="rounds", leave=False):
        for target, threshold in zip(targets, thresholds):
            decode_rate(model, steps, prompt, 4, threshold)  # warm-up (compiles on the first pass and change)
            wall, cpu = decode_rate(model, steps, prompt, n, threshold)
            ran = model.layers_ran(torch.arange(len(prompt), len(prompt) + n))
            skipped = 1 - ran[:, routing_layers].float().mean().item()
            old = best.get(target, (0.0, 0.0))
            best[target] = (max(old[0], wall), max(old[1], cpu), skipped, ran.sum(1).float().mean().item())
        if args.masking_row:
            # the 50% decisions in the masking form (both branches for every token): what skipping on paper costs
            masked = lambda m, x, pos, threshold: m(x, pos, threshold, masking=True)[:, -1]
            masking_steps = Steps(prefill=masked, decode=torch.compile(masked, fullgraph=True) if args.compile else masked)
            decode_rate(model, masking_steps, prompt, 4, thresholds[2])
            wall, cpu = decode_rate(model, masking_steps, prompt, n, thresholds[2])
            old = best.get("masking", (0.0, 0.0))
            best["masking"] = (max(old[0], wall), max(old[1], cpu))
    base_wall, base_cpu, _, _ = best[0.0]
    base_mb = bytes_per_token(model, 0.0) / 1e6
    for target in targets:
        wall, cpu, skipped, layers = best[target]
        mb = bytes_per_token(model, skipped) / 1e6
        ideal_wall, ideal_cpu = base_wall * base_mb / mb, base_cpu * base_mb / mb
        print(f"{target:>7.0%} {skipped:>8.1%} {layers:>7.2f} {mb:>9.1f} | "
              f"{wall:>10.2f} {ideal_wall:>7.2f} {wall / ideal_wall:>6.2f} | "
              f"{cpu:>10.2f} {ideal_cpu:>7.2f} {cpu / ideal_cpu:>6.2f}")
    if args.masking_row:
        wall, cpu = best["masking"]
        print(f"masking form at the 50% threshold (both branches, no real skip): {wall:.2f} wall tok/s, "
              f"{cpu:.2f} cpu tok/s")

if __name__ == "__main__":
    main()
