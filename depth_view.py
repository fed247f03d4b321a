"""FlexiDepth's depth made visible: each generated token coloured by how many layers it ran, in the terminal (ANSI)
and as a self-contained HTML page (the text, and a tokens x layers grid). The server's page uses the same colours."""
import html
import time

import torch

from cli import write_text_atomic
from tokenizer import StreamDecoder


def depth_rgb(used: int, n_layers: int, fewest: int) -> tuple:
    """Green for the fewest layers a token can use, through yellow, to red for all of them."""
    t = (used - fewest) / max(n_layers - fewest, 1)
    return round(255 * min(1.0, 2 * t)), round(200 * min(1.0, 2 - 2 * t)), 60


def ansi_depth(text: str, used: int, n_layers: int, fewest: int) -> str:
    r, g, b = depth_rgb(used, n_layers, fewest)
    return f"\x1b[30;48;2;{r};{g};{b}m{text}\x1b[0m\x1b[2m{used}\x1b[0m"


def token_texts(tokenizer, tokens: list) -> list:
    """The text each token adds to the decoded string (a character split across tokens lands on its last token)."""
    stream = StreamDecoder(tokenizer)
    texts = [stream.push(tokens[:j + 1]) for j in range(len(tokens))]
    texts[-1:] = [texts[-1] + stream.flush()] if texts else []
    return texts


def write_depth_html(path, texts: list, layers_used: list, n_layers: int, fewest: int, title: str):
    """A self-contained page: the text coloured by depth, and a tokens x layers grid (a filled cell: the layer ran).
    Hovering a token or a column shows the token and its count of layers. Written to a temporary name, then renamed."""
    cells, spans = [], []
    for j, (text, used) in enumerate(zip(texts, layers_used)):
        r, g, b = depth_rgb(len(used), n_layers, fewest)
        tip = html.escape(f"token {j}: {text!r}, {len(used)}/{n_layers} layers", quote=True)
        spans.append(f'<span style="background:rgb({r},{g},{b})" title="{tip}">{html.escape(text)}</span>')
        ran = set(used)
        column = "".join(f'<i class="{"on" if layer in ran else "off"}"></i>' for layer in reversed(range(n_layers)))
        cells.append(f'<div class="col" title="{tip}" style="--c:rgb({r},{g},{b})">{column}'
                     f'<b>{len(used)}</b></div>')
    mean = sum(len(u) for u in layers_used) / max(len(layers_used), 1)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)} depth map</title>
<style>
body {{ font-family: sans-serif; margin: 16px; background: #fafafa; }}
.text {{ white-space: pre-wrap; line-height: 1.7; font-family: monospace; font-size: 15px; max-width: 70em; }}
.text span {{ padding: 1px 0; }}
.grid {{ display: flex; align-items: flex-end; overflow-x: auto; padding: 8px 0; gap: 1px; }}
.col {{ display: flex; flex-direction: column; gap: 1px; }}
.col i {{ display: block; width: 9px; height: 9px; }}
.col i.on {{ background: var(--c); }}
.col i.off {{ background: #ddd; }}
.col b {{ font-size: 7px; font-weight: normal; text-align: center; }}
.col:hover i.on {{ background: #000; }}
</style></head><body>
<h3>{html.escape(title)}: layers used per generated token</h3>
<p>{len(layers_used)} tokens, mean {mean:.2f} of {n_layers} layers (green {fewest}, red {n_layers}).
Columns are tokens, rows are layers (layer 0 at the bottom); a coloured cell is a layer the token ran.</p>
<div class="grid">{"".join(cells)}</div>
<div class="text">{"".join(spans)}</div>
</body></html>
"""
    write_text_atomic(path, page)


def stream_printer(tokenizer, model, prompt_end: int, show_depth: bool, stats_clock: list):
    """The generate callback that prints new text as it completes. With show_depth each piece is coloured by the
    layers its last token used (plain decoding: one new token per call, out of the forward at prompt_end-1+j).
    stats_clock[0] accumulates the seconds spent here, which the decode figure leaves out."""
    stream = StreamDecoder(tokenizer, skip_ids=tokenizer.eos_ids)
    L, fewest = model.args.n_layers, model.args.n_layers - len(model.args.routing_layers)

    def callback(tokens):
        t0 = time.perf_counter()
        piece = stream.push(tokens)
        if show_depth and piece:
            position = torch.tensor([prompt_end - 2 + len(tokens)], device=model.norm.weight.device)
            piece = ansi_depth(piece, int(model.layers_ran(position).sum()), L, fewest)
        print(piece, end="", flush=True)
        stats_clock[0] += time.perf_counter() - t0

    callback.flush = lambda: print(stream.flush(), end="", flush=True)
    return callback
