"""One-token linears on CPU under torch.compile: which kernel, chosen per machine by measurement.

A one-token linear reads its whole weight to produce one row, so it should stream at the memory bandwidth. Three ways
of writing it compete, and which wins depends on the CPU (BENCHMARKS.md; issue 17 measured the opposite winner on a
Xeon with AMX than on an AMD EPYC with AVX-512):
    "gemv":   (x * weight).sum(-1), which inductor generates as its own vectorized reduction kernel, the same in
              every graph and every torch.cond branch;
    "linear": F.linear, which freezing turns into a oneDNN (or MKL) call on a prepacked weight in the main graph,
              but which inside a torch.cond branch (FlexiDepth's run/skip branches) stays an mm on the unpacked
              weight, which oneDNN reorders at every call in bf16;
    "kernel": cpu_kernels.cpp (where it builds), which also takes the verify's few rows.
So the choice is made twice per dtype: for the main graph and for the branches; and a third time, between "linear"
and "kernel", for linears of 2 to cpu_kernels.MAX_ROWS rows (the self-speculative verify). The probe compiles a stack of
different weights (more bytes than a last-level cache holds) both ways, the way compile_steps compiles the model,
and times them in alternation (the best round of each); its result is kept in ~/.cache/flexfast/
one_token_linear.json under the CPU model, the torch version, the dtype, the thread count and the compile mode, so
each machine probes once (about a minute). model.Linear reads the choice at trace time.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cpu_kernels
import model
from cli import cpu_model, write_text_atomic

CACHE_PATH = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flexfast" / "one_token_linear.json"
# One SmolLM2 layer's linears (the default model), grouped as the model calls them: wq/wk/wv, wo, w1/w3, w2. The
# kernel takes a group in one call (model.linears); the other kinds take one weight at a time.
PROBE_LAYER = (((576, 576), (192, 576), (192, 576)), ((576, 576),), ((1536, 576), (1536, 576)), ((576, 1536),))
PROBE_BYTES = 64 << 20  # twice a 32 MiB L3, so that the weights stream from memory as the model's do
MARGIN = 0.05  # another kind replaces the GEMV (the path before this probe existed) only if it is this much faster
KINDS = ("gemv", "linear", "kernel")
PROBE_VERSION = 4  # 4: the kernel reads a layer's grouped linears in one call each; older entries are not used
FEW_ROWS = 3  # rows of the few-row probe: the verify of k = 2 drafts




def probe_key(dtype: torch.dtype, mode=None) -> str:
    return (f"{cpu_model()} | torch {torch.__version__} | {dtype} | {torch.get_num_threads()} threads | "
            f"mode {mode or 'default'} | probe {PROBE_VERSION}")


class LinearStack(torch.nn.Module):
    """Layers of linears applied to one token, each as a one-token linear of `kind` (the input is cut to each
    weight's width; the kernel takes each group of weights in one call, as the plain model's layers do); in_branch
    puts them all inside a torch.cond branch, as FlexiDepth's real skip does (whose branch groups only w1/w3: wk/wv
    run outside it and wq alone, so the branch probe flatters the kernel a little)."""
    def __init__(self, groups, kind: str, in_branch: bool):
        super().__init__()
        self.groups = torch.nn.ModuleList(
            torch.nn.ParameterList(torch.nn.Parameter(w, requires_grad=False) for w in group) for group in groups)
        self.kind, self.in_branch = kind, in_branch

    def apply_all(self, x):
        outs = []
        for group in self.groups:
            xw = x[..., :group[0].shape[1]]
            if self.kind == "kernel":
                outs.append(torch.ops.flexfast.linear(xw, list(group)))
            elif self.kind == "gemv":
                outs += [(xw.unsqueeze(-2) * w).sum(-1, dtype=torch.float32).to(x.dtype) for w in group]
            else:
                outs += [F.linear(xw, w) for w in group]
        return torch.cat(outs, dim=-1)

    def forward(self, x, run):
        if not self.in_branch:
            return self.apply_all(x)
        width = sum(w.shape[0] for group in self.groups for w in group)
        return torch.cond(run, self.apply_all, lambda x: x.new_zeros(*x.shape[:-1], width), (x,))


def time_kinds(kinds: list, dtype: torch.dtype, in_branch: bool, mode=None, rounds: int = 30, rows: int = 1) -> dict:
    """{kind: microseconds per MB of weights} for one-token linears of each kind, compiled as compile_steps compiles
    decode (mode, freezing). The kinds are timed in alternation and the best round counts, so that load from other
    processes, which only ever slows a round, touches them alike."""
    import torch._inductor.config as inductor_config
    gen = torch.Generator().manual_seed(0)
    layer_bytes = sum(n * k for group in PROBE_LAYER for n, k in group) * dtype.itemsize
    groups = [[torch.randn(shape, generator=gen).to(dtype) for shape in group]
              for _ in range(max(2, PROBE_BYTES // layer_bytes)) for group in PROBE_LAYER]
    nbytes = sum(w.numel() * w.element_size() for group in groups for w in group)
    width = max(w.shape[1] for group in groups for w in group)
    x, run = torch.randn(1, rows, width, generator=gen).to(dtype), torch.tensor(True)
    # no concat_linear: it would fuse the whole stack (all one input) into one wide linear
    with inductor_config.patch({"freezing": True, "cpp.enable_concat_linear": False}), torch.no_grad():
        compiled = {kind: torch.compile(LinearStack(groups, kind, in_branch).eval(), fullgraph=True, mode=mode)
                    for kind in kinds}
        best = {kind: float("inf") for kind in kinds}
        for _ in range(rounds):
            for kind, fn in compiled.items():
                t0 = time.perf_counter()
                fn(x, run)
                best[kind] = min(best[kind], time.perf_counter() - t0)
    return {kind: round(t / nbytes * 1e12, 2) for kind, t in best.items()}


def probe(dtype: torch.dtype, mode=None) -> dict:
    """{"graph": kind, "branch": kind, "rows": kind, "us_per_mb": {context: {kind: time}}}. Another kind must beat
    the gemv by MARGIN to replace it. The branches are probed only if the gemv loses the graph (the same kernels run
    there, but F.linear loses freezing's prepacking). "rows": the faster of F.linear and the kernel at FEW_ROWS rows."""
    kinds = [kind for kind in KINDS if kind != "kernel" or cpu_kernels.load()]
    us_per_mb = {"graph": time_kinds(kinds, dtype, False, mode)}
    if fastest(us_per_mb["graph"]) != "gemv":
        us_per_mb["branch"] = time_kinds(kinds, dtype, True, mode)
    rows = "linear"
    if "kernel" in kinds:
        us_per_mb["rows"] = time_kinds(["linear", "kernel"], dtype, False, mode, rows=FEW_ROWS)
        rows = min(us_per_mb["rows"], key=us_per_mb["rows"].get)
    return dict(graph=fastest(us_per_mb["graph"]), branch=fastest(us_per_mb.get("branch")), rows=rows,
                us_per_mb=us_per_mb)


def fastest(times) -> str:
    if not times:
        return "gemv"
    best = min(times, key=times.get)
    return best if times[best] * (1 + MARGIN) < times["gemv"] else "gemv"


def read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: probe again
    return cache if isinstance(cache, dict) else {}


def choose(dtype: torch.dtype, mode=None, path: Path = CACHE_PATH, run_probe=probe) -> dict:
    """This machine's kinds for `dtype` compiled with `mode` (probed once, then read from `path`), installed for
    model.Linear."""
    key = probe_key(dtype, mode)
    cache = read_cache(path)
    entry = cache.get(key)
    if not (isinstance(entry, dict) and all(entry.get(c) in KINDS for c in ("graph", "branch", "rows"))):
        print(f"timing one-token linear kernels on this CPU for {dtype} (once; kept in {path})", file=sys.stderr,
              flush=True)
        entry = run_probe(dtype, mode)
        cache = read_cache(path)  # another process may have added its own entries meanwhile
        cache[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(cache, indent=1, sort_keys=True))
        except OSError:
            pass  # an unwritable cache only costs a probe next time
    if "kernel" in (entry["graph"], entry["branch"], entry["rows"]):
        cpu_kernels.load()  # built when probed; model.linear falls back to the gemv if it cannot load now
    model.ONE_TOKEN_LINEAR[(str(dtype), False)] = entry["graph"]
    model.ONE_TOKEN_LINEAR[(str(dtype), True)] = entry["branch"]
    model.FEW_ROW_LINEAR[str(dtype)] = entry["rows"]
    return entry
