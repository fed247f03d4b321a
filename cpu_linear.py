"""One-token linears on CPU under torch.compile: which kernel, chosen per machine by measurement.

A one-token linear reads its whole weight to produce one row, so it should stream at the memory bandwidth. Three ways
of writing it compete, and which wins depends on the CPU (BENCHMARKS.md; issue 17 measured the opposite winner on a
Xeon with AMX than on an AMD EPYC with AVX-512):
    "gemv":   (x * weight).sum(-1), which inductor generates as its own vectorized reduction kernel, the same in
              every graph and every torch.cond branch;
    "linear": F.linear, which freezing turns into a oneDNN (or MKL) call on a prepacked weight in the main graph,
              but which inside a torch.cond branch (FlexiDepth's run/skip branches) stays an mm on the unpacked
              weight, which oneDNN reorders at every call in bf16;
    "kernel": cpu_kernels.cpp (where it builds), which also takes the verify's few rows; timed twice, its software
              prefetches into the first-level cache and into the second ("kernel-l2"), which decides where they
              go on this machine for every kernel call (cpu_kernels.set_prefetch_l2: measured on a Xeon with AMX,
              a bf16 weight from memory streamed at 21 GB/s into L1 and 28 into L2).
So the choice is made twice per dtype: for the main graph (the GEMV against the kernel, or against F.linear where
the kernels cannot build) and for the branches (timed only where "linear" wins the graph: the other two run there
as in the graph; see probe); and a third time, between "linear" and "kernel", for linears of 2 to
cpu_kernels.MAX_ROWS rows (the self-speculative verify, short compiled prefills), but only once a step of that many
rows is about to compile (choose_rows). The probe times a model's step, not the linears alone: a random model of the
default model's shape with three of its layers and its lm head (probe_model), in huge pages as load_model places a
model's, its decode step (or a step of few rows) compiled each way as compile_steps compiles the model's, timed in
alternation (the best round of each), twice after reading twice the last-level cache: once from memory and once
from what the cache kept, as a model that part fits in the cache reads. (A stack of the linears alone, probe version
8 and before, had the GEMV and the kernel level on a Xeon with AMX where the default bf16 model decoded 1.12x faster
with the kernel: it lacked the head, where the kernel streams 1.24x faster, and the ops around the linears.) Its
result is kept in ~/.cache/flexfast/one_token_linear.json under the CPU model, the torch version, the dtype, the
thread count, the compile mode and the rows, so each machine probes once (about 20 s on 2 cores for one row, the
kernels' build beside it; 10 s more for the few rows). model.Linear reads the choice at trace time.
"""
import contextlib
import functools
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import cpu_kernels
import hugepages
import model
from cli import cpu_model, write_text_atomic
from figures import weight_bytes

CACHE_PATH = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flexfast" / "one_token_linear.json"
# The default model's shape (SmolLM2-135M-Instruct) with PROBE_LAYERS of its layers and its tied lm head: the probe
# times this model's decode step, every op of it (norms, rope, attention, the grouped linears, the MLP in one call,
# the head), compiled as compile_steps compiles the model's. In bf16 it is 78 MB, over twice a 32 MiB L3, so that
# its weights stream from memory as the model's do.
PROBE_ARGS = dict(vocab_size=49152, dim=576, n_heads=9, n_kv_heads=3, head_dim=64, intermediate_size=1536,
                  rope_base=100000.0, tie_embeddings=True)
PROBE_LAYERS = 3
PROBE_POS = 16  # the position the timed steps write and attend up to
ASSUMED_CACHE_BYTES = 32 << 20  # where sysfs reports no cache: the AMD EPYC's L3
MARGIN = 0.05  # another kind replaces the default (the kernel where timed, else the GEMV) only if this much faster
KINDS = ("gemv", "linear", "kernel")
PROBE_VERSION = 9  # 9: a small model's decode step, not a stack of linears; 8: the kernel the default, F.linear
# only without it; 7: prefetch level, the MLP as the model's, from memory and cache; 6: huge pages, normed inputs
FEW_ROWS = 3  # rows of the few-row probe: the verify of k = 2 drafts
PROBE_ROUNDS = 30
ISA_CACHE_PATH = CACHE_PATH.with_name("vector_isa.json")
HEADER_CACHE_PATH = CACHE_PATH.with_name("precompiled_headers.json")


def probe_key(dtype: torch.dtype, mode=None, rows: int = 1) -> str:
    return (f"{cpu_model()} | torch {torch.__version__} | {dtype} | {torch.get_num_threads()} threads | "
            f"mode {mode or 'default'} | {rows} rows | probe {PROBE_VERSION}")


def probe_model(dtype: torch.dtype, routed: bool) -> model.Transformer:
    """A model of PROBE_ARGS' shape with PROBE_LAYERS layers of random weights (the global RNG left as it was),
    in huge pages as load_model places a model's, its cache set up; routed: every layer a FlexiDepth layer."""
    args = model.ModelArgs(n_layers=PROBE_LAYERS, **PROBE_ARGS)
    if routed:
        args.route(range(PROBE_LAYERS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probed = model.Transformer(args).eval().requires_grad_(False)
        for p in probed.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    probed = probed.to(dtype)
    hugepages.move_weights(probed)
    probed.setup_caches(1, 2 * PROBE_POS)
    return probed


def time_kinds(kinds: list, dtype: torch.dtype, mode=None, rows: int = 1, graph: Optional[str] = None) -> dict:
    """{kind: microseconds per MB of weights, the mean of a step that reads the weights from memory and one right
    after it that finds what the cache kept} for probe_model's forward of `rows` tokens with its linears of each
    kind, compiled as compile_steps compiles a step of that many rows: one row as decode (compile_one_token: the
    GEMV and the kernel unfrozen, F.linear frozen), more as the verify (compile_few_rows). graph: the kinds are timed
    in FlexiDepth's torch.cond branches (every layer routed, every token running it) while the main graph's one-row
    linears are `graph`. "kernel" comes last in `kinds` and is dropped if the kernels did not build (cpu_kernels.load
    waits for machine_setup's build, which the kinds before it overlap). The kinds are timed in alternation and the
    best round counts, so that load from other processes, which only ever slows a round, touches them alike."""
    import torch._inductor.config as inductor_config
    from steps import compile_few_rows, compile_one_token, forward_last, own_code, rows_to_kernels
    probed = probe_model(dtype, routed=graph is not None)
    nbytes = weight_bytes(probed)
    x, input_pos = torch.full((1, rows), 5), torch.arange(PROBE_POS, PROBE_POS + rows)
    frozen_args = dict(fullgraph=True, dynamic=False, **({"mode": mode} if mode else {}))
    kept = dict(model.ONE_TOKEN_LINEAR), dict(model.FEW_ROW_LINEAR)

    def set_kind(timed: str):
        kind = kind_of(timed)
        if rows > 1:
            model.FEW_ROW_LINEAR[str(dtype)] = kind
        elif graph is not None:
            model.ONE_TOKEN_LINEAR[(str(dtype), False)], model.ONE_TOKEN_LINEAR[(str(dtype), True)] = graph, kind
        else:
            model.ONE_TOKEN_LINEAR[(str(dtype), False)] = kind
        if kind == "kernel":
            cpu_kernels.set_prefetch_l2(timed == "kernel-l2")
    compiled = {}
    prefetch_l2 = cpu_kernels.PREFETCH_L2
    try:
        # the two settings compile_steps makes process-wide, for a caller that has not
        with inductor_config.patch({"freezing": True, "cpp.enable_concat_linear": True}), torch.no_grad():
            for kind in kinds:
                if kind == "kernel" and not cpu_kernels.load():
                    continue
                step = own_code(forward_last, f"probe_{kind}")  # graphs of their own, none left on the model's code
                if rows > 1:
                    step = compile_few_rows(step, frozen_args,
                                            lambda m, tokens, *_: rows_to_kernels(m, tokens.shape[1]))
                else:
                    step = compile_one_token(step, graph or kind, frozen_args)
                set_kind(kind)
                compiled[kind] = functools.partial(step, probed, x, input_pos, 0.0)  # 0: every token runs a layer
                compiled[kind]()  # compiles now, so that the kernels' build overlaps the kinds before them
            if "kernel" in compiled:  # the same code: the prefetch level is the kernels' state at each call
                compiled["kernel-l2"] = compiled["kernel"]
            from_memory = {kind: float("inf") for kind in compiled}
            from_cache = dict(from_memory)
            evict = torch.ones(evicting_bytes() // 4)
            for _ in range(PROBE_ROUNDS):
                for kind, step in compiled.items():
                    set_kind(kind)
                    evict.sum()
                    for best in (from_memory, from_cache):  # the second call finds what the cache kept of the first
                        t0 = time.perf_counter()
                        step()
                        best[kind] = min(best[kind], time.perf_counter() - t0)
    finally:
        cpu_kernels.set_prefetch_l2(prefetch_l2)
        for table, before in zip((model.ONE_TOKEN_LINEAR, model.FEW_ROW_LINEAR), kept):
            table.clear()
            table.update(before)
    return {kind: round((from_memory[kind] + from_cache[kind]) / 2 / nbytes * 1e12, 2) for kind in compiled}


def kind_of(timed: str) -> str:
    """The kind a timed name is (time_kinds times the kernel at two prefetch levels)."""
    return timed.removesuffix("-l2")


def prefers_l2(times: dict) -> bool:
    """Whether the kernel streamed faster with its prefetches into L2 (False where it was not timed)."""
    return times.get("kernel-l2", float("inf")) < times.get("kernel", float("inf"))


def evicting_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Bytes to read between two timed calls so that the probe's weights come from memory, as a model's do: twice
    the largest cache sysfs reports (a Xeon here reports 480 MiB of L3, which would hold the probe's 78 MB), at most
    2 GiB; twice ASSUMED_CACHE_BYTES where sysfs says nothing."""
    sizes = []
    for index in caches.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]])
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return min(2 * max(sizes, default=ASSUMED_CACHE_BYTES), 2 << 30)


def probe(dtype: torch.dtype, mode=None) -> dict:
    """One-row linears: {"graph": kind, "branch": kind, "prefetch_l2": bool, "us_per_mb": {context: {kind: time}}}.
    Another kind must beat the default by MARGIN to replace it (fastest). The branches are probed only if F.linear
    wins the graph: it loses freezing's prepacking there, while the GEMV and the kernel run the same code in a branch
    as in the graph and stream as fast (the kernel 50.7 / 51.0 us per MB, the GEMV 55.2 / 57.1, graph / branch, bf16
    on a 2-core Xeon), so a branch takes the graph's choice (probing it cost a first run 22 s there). prefetch_l2:
    the kernel's faster prefetch level in the graph. On a machine's first run the kernels build (one C++ compiler
    process, ~20 s, started by machine_setup) on one core while the GEMV compiles on the other. F.linear is timed
    only where the kernels cannot build: on both CPU kinds measured it took 1.4-2.3x the kernel's time per MB (AMD
    EPYC 36.0 against 25.0; Xeon with AMX 78-90 against 33-56, 115 against 51 in a branch), and compiling it cost a
    machine's first run ~5 s."""
    machine_setup()
    kinds = ["gemv", "kernel"] if cpu_kernels.will_try() else ["gemv", "linear"]
    us_per_mb = {"graph": time_kinds(kinds, dtype, mode)}
    graph = branch = fastest(us_per_mb["graph"])
    if graph == "linear":
        us_per_mb["branch"] = time_kinds(list(KINDS), dtype, mode, graph=graph)
        branch = fastest(us_per_mb["branch"])
    return dict(graph=graph, branch=branch, prefetch_l2=prefers_l2(us_per_mb["graph"]), us_per_mb=us_per_mb)


def probe_rows(dtype: torch.dtype, mode=None) -> dict:
    """Linears of FEW_ROWS rows: {"rows": the faster of F.linear and the kernel, "us_per_mb": {"rows": times}};
    F.linear where the kernels do not build."""
    if not cpu_kernels.load():
        return dict(rows="linear", us_per_mb={})
    times = time_kinds(["linear", "kernel"], dtype, mode, rows=FEW_ROWS)
    return dict(rows=kind_of(min(times, key=times.get)), us_per_mb={"rows": times})


def fastest(times) -> str:
    """The kind a context takes: the default, the kernel where it was timed (else the GEMV), unless another kind was
    MARGIN faster. Ties go to the kernel because the probe's small model still leans a few percent towards the GEMV:
    on a Xeon with AMX, fp32, it had the GEMV 2-6% faster where the default model decodes level (23.08 against 23.20
    ms a token); bf16 it had the kernel 1.05-1.11x faster, the model 1.08x. (The stack of linears before it had bf16
    level, GEMV 52.0 against kernel 53.3 us per MB, where the model decoded 1.12x faster with the kernel.)"""
    if not times:
        return "gemv"
    kernels = [times[timed] for timed in times if kind_of(timed) == "kernel"]
    default, default_time = ("kernel", min(kernels)) if kernels else ("gemv", times["gemv"])
    best = min(times, key=times.get)
    return kind_of(best) if times[best] * (1 + MARGIN) < default_time else default


def read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: probe again
    return cache if isinstance(cache, dict) else {}


def keep(path: Path, key: str, value):
    """Adds key: value to the JSON cache at path, written atomically. Read again first: another process may have
    added its own entries meanwhile. An unwritable cache only costs the measurement next time."""
    cache = read_cache(path)
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(cache, indent=1, sort_keys=True))
    except OSError:
        pass


def reuse_vector_isa_check(path: Path = ISA_CACHE_PATH) -> bool:
    """Spare every later process inductor's check of which vector instruction sets (AVX2, AVX-512, AMX...) the C++
    compiler can build for: it compiles a test library per set and loads each in a new Python process, again in
    every process that compiles (1.1 s of a 6.8 s warm compile of decode on 2 cores; BENCHMARKS.md). The first
    process runs the real check and keeps its answer under the CPU, torch and compiler; where that answer is every
    set the CPU reports, inductor is told the check passes (config.cpp.vec_isa_ok), which makes it assume exactly
    that list. Set in the first process too, so that inductor's cache keys (which include the flag) stay the same
    from the first run on. Returns whether the flag is set."""
    from torch._inductor import config as inductor_config, cpp_builder, cpu_vec_isa
    if inductor_config.cpp.vec_isa_ok is not None:
        return bool(inductor_config.cpp.vec_isa_ok)  # the user's TORCHINDUCTOR_VEC_ISA_OK decides
    compiler = cpp_builder.get_cpp_compiler()
    version = hashlib.sha256(cpp_builder.get_compiler_version_info(compiler).encode()).hexdigest()[:12]
    key = f"{cpu_model()} | torch {torch.__version__} | {compiler} {version}"
    cpu_flags = cpu_vec_isa.x86_isa_checker()
    reported = [isa for isa in cpu_vec_isa.supported_vec_isa_list
                if all(flag in cpu_flags for flag in str(isa).split())]
    checked = read_cache(path).get(key)
    if not isinstance(checked, list):
        # inductor builds with the first set the CPU reports, and every later one takes a subset of its compiler
        # flags: where the compiler builds the first, building the others (4-5 s on a new machine) tells nothing
        if reported and reported[0]:
            checked = [str(isa) for isa in reported]
        else:
            checked = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
        keep(path, key, checked)
    every_set = checked == [str(isa) for isa in reported]
    if every_set:
        inductor_config.cpp.vec_isa_ok = True
    return every_set


@functools.cache
def machine_setup() -> list:
    """Threads, started once per process, for what a CPU compile needs that no model does and a machine's first run
    pays: inductor's vector-ISA check (4-5 s there; reuse_vector_isa_check) and the kernels' build (~20 s;
    cpu_kernels.load, which the probe times and quantized linears call). generate.py and the server start them
    before loading the model, so that a first run's load (about 5 s for the default model) overlaps them; the probe
    compiles its GEMV step beside the build. compile_steps waits for both before it compiles anything, so that
    whether the kernels loaded is settled when a graph is traced. On later runs they take well under a second."""
    threads = [threading.Thread(target=reuse_vector_isa_check, daemon=True)]
    if cpu_kernels.will_try():
        threads.append(threading.Thread(target=cpu_kernels.load, daemon=True))
    for thread in threads:
        thread.start()
    return threads


def reuse_precompiled_header(path: Path = HEADER_CACHE_PATH) -> bool:
    """Spare every later process inductor's check of its precompiled C++ header: before it compiles (or loads from
    disk) a process's first kernel, inductor runs the compiler's preprocessor over the header and hashes the output
    to name the header's precompiled file (0.2 s of a 5-6 s warm compile on 2 cores; BENCHMARKS.md). The first
    process keeps that name under the header, the compile command, torch and the compiler; later ones use it while
    the header and its precompiled file are still there, and otherwise ask inductor as before. Returns whether
    inductor's function was found (torch 2.13's private codecache._precompile_header)."""
    from torch._inductor import codecache, cpp_builder
    precompile = getattr(codecache, "_precompile_header", None)
    if precompile is None:
        return False
    if getattr(precompile, "reused_from", None) is not None:
        return True
    compiler = cpp_builder.get_cpp_compiler()
    setup = [torch.__version__, torch.version.git_version, torch.__file__, compiler,
             cpp_builder.get_compiler_version_info(compiler)]

    @functools.cache
    def precompile_header(header: str, hashable_cmd_line: str, **compile_command) -> str:
        # str, not repr: the vector-ISA argument's repr holds a function's address, new in every process
        arguments = sorted((k, f"{type(v).__name__} {v}") for k, v in compile_command.items())
        installed = Path(torch.__file__).parent / "include" / header
        changed = installed.stat().st_mtime if installed.is_file() else None
        key = hashlib.sha256(json.dumps([header, hashable_cmd_line, arguments, changed] + setup).encode()).hexdigest()
        named = read_cache(path).get(key)
        if isinstance(named, str) and os.path.isfile(named) and os.path.isfile(named + ".gch"):
            return named
        named = precompile(header, hashable_cmd_line, **compile_command)
        keep(path, key, named)
        return named
    precompile_header.reused_from = precompile
    codecache._precompile_header = precompile_header
    return True


def measured(key: str, fields: tuple, what: str, run_probe: Callable[[], dict], path: Path) -> dict:
    """The cache's entry under key, or run_probe()'s, kept there, where the cache has none with a kind in every
    field. One process probes at a time (probing)."""
    def kept():
        entry = read_cache(path).get(key)
        return entry if isinstance(entry, dict) and all(entry.get(field) in KINDS for field in fields) else None

    entry = kept()
    if entry is None:
        with probing(path, what):
            entry = kept()  # probed by the process this one waited for
            if entry is None:
                print(f"timing {what} linear kernels on this CPU (once; kept in {path})", file=sys.stderr, flush=True)
                entry = run_probe()
                keep(path, key, entry)
    return entry


@contextlib.contextmanager
def probing(path: Path, what: str):
    """Held while a process probes: another one (a server and a CLI started together on a new machine) waits for its
    result instead of probing alongside, which would double the wait on 2 cores and time every kind under the other's
    load. An flock on the cache's folder, so that no file is left behind and a dead holder releases it; no lock where
    none can be taken (no folder, no fcntl)."""
    try:
        import fcntl
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process timing the {what} linear kernels on this CPU", file=sys.stderr,
                  flush=True)
            fcntl.flock(folder, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: probe unlocked
        yield
    finally:
        os.close(folder)  # releases the lock


def choose(dtype: torch.dtype, mode=None, path: Path = CACHE_PATH, run_probe=probe) -> dict:
    """This machine's one-row kinds for `dtype` compiled with `mode` (probed once, then read from `path`), installed
    for model.Linear, and the kernels' prefetch level (which quantized linears take too)."""
    entry = measured(probe_key(dtype, mode), ("graph", "branch"), f"one-token {dtype}",
                     lambda: run_probe(dtype, mode), path)
    if "kernel" in (entry["graph"], entry["branch"]):
        cpu_kernels.load()  # built when probed; model.linear falls back to the gemv if it cannot load now
    cpu_kernels.set_prefetch_l2(bool(entry.get("prefetch_l2", False)))  # process-wide: the last dtype chosen
    model.ONE_TOKEN_LINEAR[(str(dtype), False)] = entry["graph"]
    model.ONE_TOKEN_LINEAR[(str(dtype), True)] = entry["branch"]
    return entry


def choose_rows(dtype: torch.dtype, mode=None, path: Path = CACHE_PATH, run_probe=probe_rows) -> dict:
    """As choose, for linears of 2 to cpu_kernels.MAX_ROWS rows. steps.compile_steps calls it before the first call
    of a step that may have that many rows, so that a machine's first plain decode does not wait for it."""
    entry = measured(probe_key(dtype, mode, FEW_ROWS), ("rows",), f"{FEW_ROWS}-row {dtype}",
                     lambda: run_probe(dtype, mode), path)
    if entry["rows"] == "kernel":
        cpu_kernels.load()
    model.FEW_ROW_LINEAR[str(dtype)] = entry["rows"]
    return entry
