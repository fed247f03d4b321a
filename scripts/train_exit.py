"""Self-distilled exit heads and a trimmed draft vocabulary for self-speculation on any converted Llama (frozen).

    python scripts/train_exit.py --checkpoint_path checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth \
        --early_exits 4,6,8,10,12

A model never trained for early exit drafts poorly from a shallow layer: the plain final norm + LM head on the
layer-E state rarely agrees with the last layer. Here the model stays frozen and learns, per exit E, an affine head
h + A h + b (model.AffineExitHead, zero at start: the plain exit), trained by self-distillation:
1. The model writes its own text: greedy continuations of HumanEval prompts and sampled (T=0.7) answers to chat
   prompts, batched. The first --heldout HumanEval prompts are never trained on (scripts/sweep.py and
   scripts/benchmark.py take their prompts from the start of HumanEval); they are the held-out set here too.
   Windows of pydoc_data.topics are added as teacher-forced text.
2. Every forward (each decode step of that generation, each pydoc window) keeps the hidden states at all exits and
   the full model's top --teacher_top next-token log-probabilities: one forward serves every exit.
3. Draft vocabulary: the --draft_vocab tokens the full model most often ranks first on the training text. The draft's
   LM head is those rows of the model's head, so a draft reads N x dim head bytes instead of vocab x dim.
4. Each head is trained to minimise the cross-entropy from the teacher's top-k distribution (restricted to the draft
   vocabulary and renormalised: that is what the draft can express) to the draft's distribution.
Output: an HF-layout folder (config.json with exit_heads {E: "affine"} and draft_vocab_size; model.safetensors with
the model's own weights plus model.exit_heads.{E}.proj.weight, model.exit_heads.{E}.bias, model.draft_vocab), converted
so model.pth is there; train_report.json holds the held-out agreement of every exit with and without its head.
--resume continues from <out_dir>/train_state.pth (the collected data and the heads' optimiser state).
A folder without tokenizer files (tiny test models) is fed UTF-8 bytes as token ids.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import generate as g  # noqa: E402
from cli import main_guard, save_atomic, write_atomic, write_text_atomic  # noqa: E402
from convert_hf_checkpoint import TOKENIZER_FILES, convert, hf_state_dict, read_config  # noqa: E402
from model import AffineExitHead, linear  # noqa: E402
from prompts import humaneval_prompts  # noqa: E402

STATE_FILE = "train_state.pth"


def parse_exits(spec: str, n_layers: int) -> list:
    try:
        exits = sorted({int(e) for e in spec.split(",")})
    except ValueError:
        raise ValueError(f"--early_exits {spec!r}: expected a comma list of layer counts such as 4,8,12")
    bad = [e for e in exits if not 1 <= e < n_layers]
    if bad:
        raise ValueError(f"--early_exits: {bad[0]} is outside 1..{n_layers - 1} for this {n_layers}-layer model")
    return exits


# ---- text

class ByteTokenizer:
    """UTF-8 bytes as token ids, for folders without a tokenizer (tiny test models)."""
    eos_ids = set()

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())

    def apply_chat_template(self, messages):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def chat_prompts() -> list:
    from pydoc_data.topics import topics
    return [f"Explain Python's {name.lower().replace('-', ' ')} with a short example." for name in sorted(topics)]


def prompt_sets(tokenizer, heldout: int, n_train: int) -> tuple:
    """(held-out prompts, training prompts), each a list of (token ids, temperature)."""
    code = humaneval_prompts()
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in chat_prompts()]
    heldout_set = [(tokenizer.encode(p, add_special_tokens=False), 0.0) for p in code[:heldout]]
    train = [(tokenizer.encode(p, add_special_tokens=False), 0.0) for p in code[heldout:]]
    train += [(tokenizer.encode(c, add_special_tokens=False), 0.7) for c in chats]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    return heldout_set, [train[i] for i in order[:n_train]]


def pydoc_windows(tokenizer, n_tokens: int, window: int) -> torch.Tensor:
    from prompts import pydoc_text
    # from the end of the text: scripts/eval.py's exit_ppl scores its start
    ids = tokenizer.encode(pydoc_text()[-n_tokens * 8:], add_special_tokens=False)
    n = min(n_tokens, len(ids)) // window
    return torch.tensor(ids[: n * window]).view(n, window)


# ---- the frozen model's forwards, keeping the exit states and the teacher's top-k

def forward_exits(model, idx, input_pos, exits, top: int):
    """One forward; returns (hidden states [len(exits), B, T, dim] at each exit, teacher top-k log-probs and ids
    [B, T, top], the full model's logits [B, T, V])."""
    h, states, start = model.embed(idx), [], 0
    for e in exits:
        h = model.run_layers(h, input_pos, start, e)
        states.append(h)
        start = e
    logits = model.head(model.run_layers(h, input_pos, start, model.args.n_layers)).float()
    values, ids = torch.log_softmax(logits, -1).topk(top, dim=-1)
    return torch.stack(states), values, ids.int(), logits


@torch.no_grad()
def collect(model, prompts, gen_tokens, exits, top, batch_size, eos_ids, desc, generator, max_prompt=128):
    """Generate gen_tokens after every prompt, batched (a batch's prompts are cut from the left to its shortest, and
    to max_prompt tokens at most),
    keeping exit states and teacher targets of every generated position before the first EOS."""
    rows = {"states": [], "values": [], "ids": []}
    prompts = sorted(prompts, key=lambda p: (p[1], len(p[0])))
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    bar = tqdm(total=len(batches) * gen_tokens, desc=desc, unit="step", file=sys.stderr)
    for batch in batches:
        T = min(min(len(p) for p, _ in batch), max_prompt)
        temperature = batch[0][1]
        idx = torch.tensor([p[-T:] for p, _ in batch])
        B = len(batch)
        model.max_batch_size = -1  # exactly B rows: the K/V writes need the batch size to match
        model.setup_caches(B, T + gen_tokens)
        pos = torch.arange(T)
        alive = torch.ones(B, dtype=torch.bool)
        for step in range(gen_tokens):
            bar.update(1)
            states, values, ids, logits = forward_exits(model, idx, pos, exits, top)
            last = logits[:, -1]
            if step > 0:  # the prompt's own positions are not the model's text
                keep = alive.clone()
                rows["states"].append(states[:, keep, -1].to(torch.bfloat16))
                rows["values"].append(values[keep, -1].half())
                rows["ids"].append(ids[keep, -1])
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator)[:, 0]
            else:
                nxt = last.argmax(-1)
            alive &= ~torch.tensor([int(t) in eos_ids for t in nxt])
            if not alive.any():
                break
            idx, pos = nxt[:, None], pos[-1:] + 1
        bar.update(gen_tokens - 1 - step)  # a batch that ended early
    bar.close()
    return {k: torch.cat(v, dim=-2 if k == "states" else 0) for k, v in rows.items()}


@torch.no_grad()
def collect_text(model, windows, exits, top, batch_size):
    rows = {"states": [], "values": [], "ids": []}
    for i in tqdm(range(0, len(windows), batch_size), desc="pydoc windows", unit="batch", file=sys.stderr):
        idx = windows[i:i + batch_size]
        model.max_batch_size = -1
        model.setup_caches(len(idx), idx.shape[1])
        states, values, ids, _ = forward_exits(model, idx, torch.arange(idx.shape[1]), exits, top)
        rows["states"].append(states.flatten(1, 2).to(torch.bfloat16))
        rows["values"].append(values.flatten(0, 1).half())
        rows["ids"].append(ids.flatten(0, 1))
    return {k: torch.cat(v, dim=-2 if k == "states" else 0) for k, v in rows.items()}


def join(*parts):
    return {k: torch.cat([p[k] for p in parts], dim=-2 if k == "states" else 0) for k in parts[0]}


def draft_vocabulary(teacher_ids: torch.Tensor, vocab_size: int, n: int) -> torch.Tensor:
    """The n tokens the teacher ranks first most often (ties by id), sorted by id."""
    counts = torch.bincount(teacher_ids[:, 0].long(), minlength=vocab_size)
    return counts.topk(n).indices.sort().values


# ---- the heads

def draft_log_probs(model, head, draft_weight, h):
    return torch.log_softmax(linear(model.norm(head(h.float())), draft_weight).float(), -1)


def restricted_targets(values, ids, slot):
    """Teacher top-k restricted to the draft vocabulary: (slots [N, top] clamped, probs [N, top] renormalised)."""
    s = slot[ids.long()]
    p = values.float().exp() * (s >= 0)
    return s.clamp_min(0), p / p.sum(-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def agreement(model, heads, draft_weight, vocab, data, exits, batch=4096) -> dict:
    """Held-out top-1 agreement with the full model's argmax, per exit: the plain exit (final norm + head) over the
    full and the draft vocabulary, then the trained head over the full and the draft vocabulary."""
    out = {}
    full_weight = model.output.weight
    teacher = data["ids"][:, 0].long()
    for j, e in enumerate(exits):
        hits = torch.zeros(4)
        for i in range(0, len(teacher), batch):
            h, t = data["states"][j, i:i + batch].float(), teacher[i:i + batch]
            plain, headed = model.norm(h), model.norm(heads[str(e)](h))
            hits += torch.stack([(linear(x, full_weight).argmax(-1) == t).sum() for x in (plain, headed)]
                                + [(vocab[linear(x, draft_weight).argmax(-1)] == t).sum() for x in (plain, headed)])
        plain, head_full, plain_draft, head_draft = (hits / len(teacher)).tolist()
        out[e] = dict(plain=round(plain, 4), plain_draft_vocab=round(plain_draft, 4),
                      head_full_vocab=round(head_full, 4), head_draft_vocab=round(head_draft, 4))
    return out


# ---- the run

def load_frozen(checkpoint_path: Path):
    model = g.load_model(checkpoint_path, "cpu", torch.float32)
    if model.args.exit_heads or model.args.draft_vocab_size:
        raise ValueError(f"{checkpoint_path} already has exit heads; train from the plain model")
    if getattr(model, "quantization", None) is not None or not model.output.weight.is_floating_point():
        raise ValueError(f"{checkpoint_path} is quantized; train on the floating-point model")
    return model


def write_folder(model, heads, vocab, config, source: Path, out_dir: Path) -> Path:
    """HF-layout folder (every file written atomically), then converted to model.pth."""
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            write_atomic(out_dir / name, lambda tmp, name=name: tmp.write_bytes((source / name).read_bytes()))
    ours = {k: v for k, v in model.state_dict().items()}
    ours.update({f"exit_heads.{e}.{k}": v for e, head in heads.items() for k, v in head.state_dict().items()})
    ours["draft_vocab"] = vocab.long()
    weights = hf_state_dict(ours, model.args.tie_embeddings)
    write_atomic(out_dir / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    write_text_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return convert(out_dir)


def train(a) -> dict:
    checkpoint_path = Path(a.checkpoint_path)
    source = checkpoint_path.parent
    out_dir = Path(a.out_dir) if a.out_dir else source.with_name(source.name + "-SelfSpec")
    if out_dir.resolve() == source.resolve():
        raise ValueError("--out_dir must differ from the checkpoint's folder")
    if a.steps < 0 or a.batch_tokens < 1 or a.lr <= 0 or a.gen_tokens < 2 or a.teacher_top < 1 or a.heldout < 1:
        raise ValueError("--steps >= 0, --batch_tokens >= 1, --lr > 0, --gen_tokens >= 2, --teacher_top >= 1 and "
                         "--heldout >= 1 are required")
    model = load_frozen(checkpoint_path)
    config = read_config(source)
    V = model.args.vocab_size
    exits = parse_exits(a.early_exits, model.args.n_layers)
    n_vocab = a.draft_vocab or V
    if not 1 <= n_vocab <= V:
        raise ValueError(f"--draft_vocab must be in 0..{V} (0: the full vocabulary), got {a.draft_vocab}")
    has_tokenizer = any((source / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
    if has_tokenizer:
        from tokenizer import load_tokenizer
        tokenizer = load_tokenizer(source)
    elif V >= 256:
        print(f"note: no tokenizer in {source}; UTF-8 bytes are the token ids", file=sys.stderr)
        tokenizer = ByteTokenizer()
    else:
        raise ValueError(f"{source} has no tokenizer and a vocabulary under 256: no text to train on")
    settings = dict(checkpoint=str(checkpoint_path), early_exits=exits, draft_vocab=n_vocab, gen_prompts=a.gen_prompts,
                    gen_tokens=a.gen_tokens, pydoc_tokens=a.pydoc_tokens, heldout=a.heldout,
                    teacher_top=a.teacher_top, lr=a.lr, batch_tokens=a.batch_tokens)
    state_path = out_dir / STATE_FILE
    heads = torch.nn.ModuleDict({str(e): AffineExitHead(model.args) for e in exits})
    optimizer = torch.optim.Adam(heads.parameters(), lr=a.lr)
    step, data = 0, None
    if a.resume:
        if not state_path.exists():
            raise FileNotFoundError(f"--resume: no {state_path} to resume from")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["settings"] != settings:
            raise ValueError(f"--resume: {state_path} was written with other settings {state['settings']}")
        data, step = state["data"], state["step"]
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])

    def save_state():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_atomic(dict(settings=settings, data=data, step=step, heads=heads.state_dict(),
                         optimizer=optimizer.state_dict()), state_path)

    t0 = time.perf_counter()
    if data is None:
        heldout, prompts = prompt_sets(tokenizer, a.heldout, a.gen_prompts)
        if not prompts:
            raise ValueError("no training prompts left after the held-out ones")
        eos = set(tokenizer.eos_ids)
        sampler = torch.Generator().manual_seed(0)
        top = min(a.teacher_top, V)
        generated = collect(model, prompts, a.gen_tokens, exits, top, a.gen_batch, eos, "generating", sampler)
        text = collect_text(model, pydoc_windows(tokenizer, a.pydoc_tokens, 128), exits, top, a.gen_batch) \
            if a.pydoc_tokens >= 128 else None
        data = dict(train=join(generated, text) if text else generated,
                    heldout=collect(model, heldout, a.gen_tokens, exits, top, a.gen_batch, eos, "held-out", sampler))
        data["vocab"] = draft_vocabulary(data["train"]["ids"], V, n_vocab)
        save_state()
    collect_seconds = time.perf_counter() - t0
    vocab = data["vocab"]
    slot = torch.full((V,), -1, dtype=torch.long)
    slot[vocab] = torch.arange(len(vocab))
    draft_weight = model.output.weight.index_select(0, vocab)
    train_data = data["train"]
    n = len(train_data["ids"])
    coverage = (slot[data["heldout"]["ids"][:, 0].long()] >= 0).float().mean().item()

    t0 = time.perf_counter()
    bar = tqdm(total=a.steps, initial=min(step, a.steps), desc="training exit heads", unit="step", file=sys.stderr)
    while step < a.steps:
        pick = torch.randint(n, (min(a.batch_tokens, n),), generator=torch.Generator().manual_seed(step))
        slots, target = restricted_targets(train_data["values"][pick], train_data["ids"][pick], slot)
        losses = []
        for j, e in enumerate(exits):
            logq = draft_log_probs(model, heads[str(e)], draft_weight, train_data["states"][j, pick])
            losses.append(-(target * logq.gather(-1, slots)).sum(-1).mean())
        loss = torch.stack(losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item() / len(exits):.3f}")
        if step % a.save_every == 0 or step == a.steps:
            save_state()
    bar.close()
    train_seconds = time.perf_counter() - t0

    heads.requires_grad_(False)
    agree = agreement(model, heads, draft_weight, vocab, data["heldout"], exits)
    config = dict(config, exit_heads={str(e): "affine" for e in exits}, draft_vocab_size=len(vocab))
    config.pop("self_speculative", None)  # the sweep writes the best (E, k) for these heads
    model_path = write_folder(model, heads, vocab, config, source, out_dir)
    report = dict(settings, steps=a.steps, train_tokens=n, heldout_tokens=len(data["heldout"]["ids"]),
                  collect_seconds=round(collect_seconds, 1), train_seconds=round(train_seconds, 1),
                  draft_vocab_heldout_coverage=round(coverage, 4), heldout_top1_agreement=agree)
    write_text_atomic(out_dir / "train_report.json", json.dumps(report, indent=2) + "\n")
    print(f"{n} training tokens, {report['heldout_tokens']} held-out; draft vocabulary of {len(vocab)} covers "
          f"{coverage:.1%} of held-out argmaxes")
    print("held-out top-1 agreement with the full model (plain exit: full / draft vocab; head: full / draft vocab):")
    for e, r in agree.items():
        print(f"  E={e}: {r['plain']:.3f} / {r['plain_draft_vocab']:.3f}; "
              f"{r['head_full_vocab']:.3f} / {r['head_draft_vocab']:.3f}")
    print(f"wrote {model_path}")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train self-distilled exit heads and a draft vocabulary (model frozen)")
    p.add_argument("--checkpoint_path", type=Path, required=True, help="model.pth of a converted folder")
    p.add_argument("--early_exits", default="4,6,8,10,12", help="exits that get a head, e.g. 4,8,12")
    p.add_argument("--draft_vocab", type=int, default=2048, help="tokens in the draft's LM head (0: all)")
    p.add_argument("--out_dir", type=Path, default=None, help="default: <checkpoint folder>-SelfSpec beside it")
    p.add_argument("--gen_prompts", type=int, default=160, help="training prompts the model writes text for")
    p.add_argument("--gen_tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--gen_batch", type=int, default=32, help="prompts generated together (and pydoc windows)")
    p.add_argument("--pydoc_tokens", type=int, default=16384, help="teacher-forced pydoc_data.topics tokens")
    p.add_argument("--heldout", type=int, default=16, help="first HumanEval prompts, never trained on")
    p.add_argument("--teacher_top", type=int, default=64, help="teacher log-probs kept per position")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_tokens", type=int, default=512)
    p.add_argument("--resume", action="store_true", help=f"continue from <out_dir>/{STATE_FILE}")
    p.add_argument("--save_every", type=int, default=250)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); 1 is far faster on a machine other jobs already fill")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    main_guard(lambda: train(args), "training")


if __name__ == "__main__":
    main()
