"""Train FlexiDepth routers and adapters for any converted Llama, with its own weights frozen.

    python scripts/train_router.py --checkpoint_path checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth \
        --routing_layers 15-29 --penalty 1e-2 --steps 200 --distill

Writes an HF-style FlexiDepth folder (config.json with model_type "ddllama" and routing_layers, model.safetensors
with the HF tensor names, tokenizer files) and converts it, so model.pth is there too; generate.py loads it.

How the router learns through a hard threshold. Training uses the layer's masking form: each token takes the
branch its gate picks (w > 0.5), and w scales that branch, w * mlp(...) when it runs and (1 - w) * adapter(...)
when it skips. That scaling alone gives w a gradient, but only "scale the branch you are on": a token that runs is
pushed to run harder and one that skips to skip harder, so the skip penalty (P times the sum of w over the routed
layers, averaged over tokens, FlexiDepth's) tips whole layers over at once and decisions are never revisited (a
cliff: see BENCHMARKS.md). So w also gets a straight-through gradient towards the other branch,
dLoss/dout . (run_out - skip_out) (FlexiDepthBlock.masked's straight_through; --no-compare turns it off), which pushes a token back to running
when running serves the loss better. With it the layers used fall smoothly as the penalty grows.
Initial state: the router is an odd function of its input (no biases, tanh), so no data-free initialisation makes
every token run. We aim its encoder at the mean direction of that layer's normed inputs on the first batch (hidden
states share a dominant direction), so training starts with almost every token running at w ~ 0.95 (near the
full model), and the adapter's output projection starts at zero (a skipped token passes through unchanged).
Loss: cross-entropy on the next token, or with --distill the KL divergence from the frozen full-depth model's
next-token distribution (the same weights with every layer run, w = 1).
A checkpoint that is already FlexiDepth continues training from its routers and adapters (FlexiDepth's second
stage does the same); --routing_layers must then be omitted or equal to its routing_layers.
Text: Python's pydoc_data.topics and the HumanEval prompts, cut into windows; a fixed random part is held out.
A folder without tokenizer files (tiny test models) is fed UTF-8 bytes as token ids.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cli import main_guard, parse_layers, save_atomic, write_text_atomic  # noqa: E402
from convert_hf_checkpoint import convert, hf_state_dict, read_config, write_hf_folder  # noqa: E402
from generate import load_model, read_state_dict  # noqa: E402
from model import (FlexiDepthBlock, KVCache, ModelArgs, Transformer, TransformerBlock, causal_mask,  # noqa: E402
                   rope_rows)
from prompts import humaneval_prompts, pydoc_text  # noqa: E402

STATE_FILE = "train_state.pth"
THRESHOLD = 0.5  # the checkpoint's own rule: a token runs a routed layer iff its gate exceeds it


# ---- data

def text_tokens(folder: Path, vocab_size: int) -> torch.Tensor:
    texts = [pydoc_text()] + humaneval_prompts()
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        if vocab_size < 256:
            raise ValueError(f"{folder} has no tokenizer and a vocabulary under 256: no text to train on")
        print(f"note: no tokenizer in {folder}; training on UTF-8 bytes as token ids", file=sys.stderr)
        return torch.tensor(list("\n\n".join(texts).encode()), dtype=torch.long)
    from tokenizer import load_tokenizer
    tok = load_tokenizer(folder)
    ids = []
    for text in texts:
        ids += tok.encode(text, add_special_tokens=False) + sorted(tok.eos_ids)[:1]  # documents end with EOS
    return torch.tensor(ids, dtype=torch.long)


def split_windows(tokens: torch.Tensor, seq_len: int, eval_windows: int):
    """Windows of seq_len + 1 tokens (inputs + next-token targets), shuffled once with a fixed seed; the first
    eval_windows are held out."""
    n = len(tokens) // (seq_len + 1)
    if n < eval_windows + 1:
        raise ValueError(f"only {n} windows of {seq_len + 1} tokens: lower --seq_len or --eval_windows")
    windows = tokens[: n * (seq_len + 1)].view(n, seq_len + 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return windows[order[eval_windows:]], windows[order[:eval_windows]]


def batch_at(train: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    """The batch of a given step, the same after a resume."""
    g = torch.Generator().manual_seed(1000 + step)
    return train[torch.randint(len(train), (batch_size,), generator=g)]


# ---- forwards (the model's own layer modules; only the KV caches are fresh per call so autograd sees no history)

def fresh_caches(model: Transformer, batch: int, seq_len: int):
    a = model.args
    dtype = model.norm.weight.dtype
    for layer in model.layers:
        layer.attention.kv_cache = KVCache(batch, seq_len, layer.attention.n_kv_heads, a.head_dim, dtype)


def forward_hidden(model: Transformer, x, start: int, end: int, full_depth: bool, runs: list = None,
                   compare: bool = False):
    """Layers [start, end) on x at positions 0..T-1. Routed layers take their masking form (the checkpoint's rule;
    compare adds the straight-through gradient) unless full_depth, which runs every layer as a plain block (the
    teacher). Appends each routed layer's gate weights and decisions ([B, T] each) to `runs`."""
    T = x.shape[1]
    pos = torch.arange(T)
    rope, mask = rope_rows(model.rope, pos), causal_mask(pos, pos)
    for layer in model.layers[start:end]:
        if isinstance(layer, FlexiDepthBlock) and not full_depth:
            x, w, run = layer.masked(x, rope, mask, pos, THRESHOLD, straight_through=compare)
            runs.append((w[..., 0], run[..., 0]))
        else:
            x = TransformerBlock.forward(layer, x, rope, mask, pos)
    return x


def student_and_teacher(model: Transformer, idx, need_teacher: bool, compare: bool = False):
    """Shared frozen prefix (layers below the first routed one), then the full-depth teacher (no grad) if asked,
    then the routed student. Returns student logits, gate weights and decisions (each [n_routed, B, T]), teacher
    logits or None."""
    B, T = idx.shape
    first = model.args.routing_layers[0]
    L = model.args.n_layers
    fresh_caches(model, B, T)
    with torch.no_grad():
        prefix = forward_hidden(model, model.embed(idx), 0, first, True)
        teacher = model.head(forward_hidden(model, prefix, first, L, True)) if need_teacher else None
    fresh_caches(model, B, T)
    runs = []
    logits = model.head(forward_hidden(model, prefix, first, L, False, runs, compare))
    return logits, torch.stack([w for w, _ in runs]), torch.stack([r for _, r in runs]), teacher


def mean_layers(model: Transformer, ran: torch.Tensor) -> float:
    routed = len(model.args.routing_layers)
    return model.args.n_layers - routed + ran.float().sum(0).mean().item()


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch_size: int):
    """Held-out next-token perplexity of the routed model (hard routing, as at inference) and of the full-depth
    model, and the routed model's mean layers used per token."""
    nll_routed = nll_full = 0.0
    used, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        logits, _, ran, teacher = student_and_teacher(model, w[:, :-1], True)
        target = w[:, 1:].reshape(-1)
        nll_routed += F.cross_entropy(logits.flatten(0, 1), target, reduction="sum").item()
        nll_full += F.cross_entropy(teacher.flatten(0, 1), target, reduction="sum").item()
        used += mean_layers(model, ran) * target.numel()
        n += target.numel()
    return math.exp(nll_routed / n), math.exp(nll_full / n), used / n


# ---- model set-up

@torch.no_grad()
def init_routers(model: Transformer, calibration: torch.Tensor, seed: int = 0):
    """Start near the full model: every routed layer's router aimed at the mean direction of its normed inputs
    (almost every token then runs with w ~ 0.95), adapters that add nothing."""
    g = torch.Generator().manual_seed(seed)
    normed = {}
    hooks = [layer.attention_norm.register_forward_hook(lambda m, i, o, k=k: normed.__setitem__(k, o.flatten(0, 1)))
             for k, layer in enumerate(model.layers) if isinstance(layer, FlexiDepthBlock)]
    B, T = calibration.shape
    fresh_caches(model, B, T)
    forward_hidden(model, model.embed(calibration), 0, model.args.n_layers, True)
    for h in hooks:
        h.remove()
    for k, x in normed.items():
        layer = model.layers[k]
        r_dim, dim = layer.router.enc.weight.shape
        direction = x.mean(0) / x.mean(0).norm()
        noise = torch.randn(r_dim, dim, generator=g) / dim ** 0.5
        layer.router.enc.weight.copy_(direction + 0.3 * noise)
        layer.router.norm.weight.fill_(1.0)
        dec = torch.randn(dim, r_dim, generator=g) / r_dim ** 0.5
        layer.router.dec.weight.copy_(dec)
        along = dec.sum(1)  # dec applied to the all-ones code
        # tanh(1) * sum of the code: r ~ +4 * 0.76 ~ 3 for tokens on the mean's side, so w ~ 0.95
        layer.router.head.weight.copy_((4.0 * along / along.pow(2).sum())[None])
        a = layer.adapter
        a.gate_proj.weight.copy_(torch.randn(a.gate_proj.weight.shape, generator=g) / dim ** 0.5)
        a.down_proj.weight.copy_(torch.randn(a.down_proj.weight.shape, generator=g) / dim ** 0.5)
        a.up_proj.weight.zero_()


def build_model(checkpoint_path: Path, routing_spec):
    """The frozen base model with routers and adapters on the routed layers; returns (model, config, trained_before).
    Read by generate's loader, so with its checks and messages."""
    base = load_model(checkpoint_path, "cpu", torch.float32)
    if getattr(base, "quantization", None):
        raise ValueError(f"{checkpoint_path} is quantized; train the routers on the floating-point model.pth")
    config = read_config(checkpoint_path.parent)
    already = bool(base.args.routing_layers)
    if already:
        if routing_spec is not None and parse_layers(routing_spec, base.args.n_layers) != base.args.routing_layers:
            raise ValueError(f"{checkpoint_path} is already FlexiDepth with routing_layers {base.args.routing_layers}; "
                             f"omit --routing_layers to continue training it, or start from the plain model")
        model = base
    else:
        if routing_spec is None:
            raise ValueError("--routing_layers is needed for a plain checkpoint (e.g. the second half: "
                             f"{base.args.n_layers // 2}-{base.args.n_layers - 1})")
        config = dict(config, model_type="ddllama", routing_layers=parse_layers(routing_spec, base.args.n_layers))
        model = Transformer(ModelArgs.from_hf_config(config))
        model.load_state_dict(base.state_dict(), strict=False)  # everything but the new routers and adapters
        if model.args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if ".router." in name or ".adapter." in name:
            p.requires_grad_(True)
    return model, config, already


def trainable_state(model: Transformer) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


# ---- training

def train(a) -> dict:
    torch.manual_seed(0)
    if a.penalty < 0:
        raise ValueError(f"--penalty must be >= 0, got {a.penalty}")
    if a.steps < 0 or a.batch_size < 1 or a.seq_len < 2 or a.lr <= 0 or a.save_every < 1 or a.eval_windows < 1:
        raise ValueError("--steps must be >= 0, --batch_size >= 1, --seq_len >= 2, --lr > 0, --save_every >= 1 and "
                         "--eval_windows >= 1")
    checkpoint_path = Path(a.checkpoint_path)
    source = checkpoint_path.parent
    out_dir = Path(a.out_dir) if a.out_dir else source.with_name(source.name + "-FlexiDepth")
    if out_dir.resolve() == source.resolve():
        raise ValueError("--out_dir must differ from the checkpoint's folder")
    model, config, already = build_model(checkpoint_path, a.routing_layers)
    if a.seq_len > model.args.max_position_embeddings:
        raise ValueError(f"--seq_len {a.seq_len} exceeds the model's {model.args.max_position_embeddings} positions")
    model.setup_caches(a.batch_size, a.seq_len)
    train_windows, eval_windows = split_windows(text_tokens(source, model.args.vocab_size), a.seq_len, a.eval_windows)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    run_settings = dict(checkpoint=str(checkpoint_path), routing_layers=model.args.routing_layers, penalty=a.penalty,
                        distill=a.distill, compare=a.compare, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr)
    step = 0
    state_path = out_dir / STATE_FILE
    if a.resume:
        if not state_path.exists():
            raise FileNotFoundError(f"--resume: no {state_path} to resume from")
        state = read_state_dict(state_path)
        if state.get("settings") != run_settings:
            raise ValueError(f"--resume: {state_path} was written with other settings {state.get('settings')}")
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    elif not already:
        init_routers(model, batch_at(train_windows, -1, a.batch_size)[:, :-1])

    def save_state():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_atomic(dict(step=step, settings=run_settings, trainable=trainable_state(model),
                         optimizer=optimizer.state_dict()), state_path)

    t0 = time.perf_counter()
    losses = []  # task loss of each step run in this process
    bar = tqdm(total=a.steps, initial=min(step, a.steps), desc="training routers", unit="step")
    while step < a.steps:
        # linear warm-up over the first 10 steps, then constant (independent of --steps, so a resume matches)
        for group in optimizer.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / 10)
        batch = batch_at(train_windows, step, a.batch_size)
        idx, target = batch[:, :-1], batch[:, 1:]
        logits, gates, ran, teacher = student_and_teacher(model, idx, a.distill, a.compare)
        if a.distill:
            task = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(teacher, -1).flatten(0, 1),
                            log_target=True, reduction="batchmean")
        else:
            task = F.cross_entropy(logits.flatten(0, 1), target.reshape(-1))
        skip_loss = gates.sum(0).mean()  # sum of gate weights over routed layers, mean over tokens
        loss = task + a.penalty * skip_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(round(task.item(), 5))
        bar.update(1)
        bar.set_postfix(loss=f"{task.item():.3f}", layers=f"{mean_layers(model, ran):.2f}")
        if step % a.save_every == 0 or step == a.steps:
            save_state()
    bar.close()
    train_seconds = time.perf_counter() - t0
    model.eval()
    ppl, ppl_full, layers = evaluate(model, eval_windows, a.batch_size)
    report = dict(run_settings, steps=a.steps, train_seconds=round(train_seconds, 1), heldout_ppl=ppl,
                  heldout_ppl_full=ppl_full, mean_layers_used=layers, n_layers=model.args.n_layers,
                  heldout_tokens=eval_windows.numel() - len(eval_windows), train_losses=losses)
    weights = hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, model.args.tie_embeddings)
    model_path = convert(write_hf_folder(out_dir, config, weights, source))
    write_text_atomic(out_dir / "train_report.json", json.dumps(report, indent=2) + "\n")
    print(f"held-out perplexity {ppl:.3f} (full model {ppl_full:.3f}), mean layers used {layers:.2f} of "
          f"{model.args.n_layers}; wrote {model_path}")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train FlexiDepth routers and adapters on a frozen Llama")
    p.add_argument("--checkpoint_path", type=Path, required=True, help="model.pth of a converted folder")
    p.add_argument("--routing_layers", default=None, help="layers that get a router, e.g. 15-29 or 3,5,7-9")
    p.add_argument("--penalty", type=float, default=1e-2, help="weight of the skip loss (sum of gate weights)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--distill", action="store_true", help="KL to the frozen full-depth model instead of the LM loss")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="straight-through gradient between the two branches (see FlexiDepthBlock.masked)")
    p.add_argument("--out_dir", type=Path, default=None, help="default: <checkpoint folder>-FlexiDepth beside it")
    p.add_argument("--resume", action="store_true", help=f"continue from <out_dir>/{STATE_FILE}")
    p.add_argument("--eval_windows", type=int, default=32, help="held-out windows of seq_len tokens")
    p.add_argument("--save_every", type=int, default=50)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    main_guard(lambda: train(args), "training")


if __name__ == "__main__":
    main()
