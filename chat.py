"""Interactive multi-turn chat in the terminal (`python generate.py --chat` with no --prompt, or --interactive).

Every turn renders the whole conversation with the checkpoint's chat template, then compares the new token ids
with those whose K/V the cache already holds and prefills only from the first difference: earlier turns are not
computed again. Stale cache slots past that point need no clearing, because attention masks by position.
"""
import math

import torch

from depth_view import stream_printer
from generate import generate


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def turn_figures(stats, cached: int, used: int, context: int, n_layers: int) -> str:
    """One line of figures after each answer."""
    tps = stats.tokens_per_second
    parts = [f"{stats.new_tokens} tokens", f"{tps:.1f} tok/s" if math.isfinite(tps) else "- tok/s",
             f"prefilled {stats.prompt_tokens} new tokens ({cached} cached)"]
    if stats.accepted:
        parts.append(f"mean accepted {stats.mean_accepted:.2f} of k={max(stats.speculate_k)}")
    if stats.layers_used:
        parts.append(f"layers {sum(map(len, stats.layers_used)) / len(stats.layers_used):.1f}/{n_layers} per token")
    parts.append(f"context {used}/{context}")
    return "[" + ", ".join(parts) + "]"


def chat_loop(model, tokenizer, sampling, spec: dict, max_new_tokens: int, show_depth: bool = False):
    """Read user turns from stdin until /exit, Ctrl-D or Ctrl-C; stream each answer. spec: generate()'s keyword
    arguments for the steps, speculation and FlexiDepth threshold. The model's cache must be set up already; its
    length is the conversation's context."""
    device = model.norm.weight.device
    context = model.max_seq_length
    room = spec["speculate_k"] + 1 if spec["speculate_k"] else 0  # speculation writes past the last token
    messages, cached = [], []  # cached: the token ids whose K/V the cache holds at positions 0..len-1
    print(f"chat ({context} tokens of context): /reset starts over, /exit or Ctrl-D leaves", flush=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages, cached = [], []
            print("(conversation cleared)")
            continue
        if not text:
            continue
        if text.startswith("/"):
            print("commands: /reset, /exit")
            continue
        turn = messages + [{"role": "user", "content": text}]
        ids = tokenizer.encode(tokenizer.apply_chat_template(turn), add_special_tokens=False)
        free = context - room - len(ids)
        if free < 1:
            print(f"this turn does not fit: the conversation would be {len(ids)} tokens and the context holds "
                  f"{context}{f' (less {room} for speculation)' if room else ''}. Type /reset to start a new "
                  f"conversation, or send something shorter.")
            continue
        # prefill from the first token the cache does not hold (at least one: its logits give the first answer token)
        start = min(common_prefix(cached, ids), len(ids) - 1)
        printing = [0.0]
        callback = stream_printer(tokenizer, model, len(ids), show_depth, printing)
        try:
            tokens, stats = generate(model, torch.tensor(ids[start:], device=device), min(max_new_tokens, free),
                                     sampling, start_pos=start, eos_ids=tokenizer.eos_ids, callback=callback, **spec)
        except KeyboardInterrupt:
            cached = ids[:start]  # positions from start on now hold part of this turn: trust only what came before
            print("\n(interrupted; the turn is dropped)")
            continue
        callback.flush()
        stats.decode_seconds -= printing[0]
        answer = tokens.tolist()
        messages = turn + [{"role": "assistant",
                            "content": tokenizer.decode([t for t in answer if t not in tokenizer.eos_ids])}]
        cached = ids + answer[:-1]  # the last token was sampled but never fed to the model
        cut = answer[-1] not in tokenizer.eos_ids and len(answer) == free
        print("\n" + turn_figures(stats, start, len(ids) + len(answer), context, model.args.n_layers)
              + (" (the context is full: /reset to go on)" if cut else ""), flush=True)
