"""Decode speed on this machine, one table: FlexFast eager and compiled against Hugging Face transformers (eager, and
its static-cache compiled path) and, when llama-cpp-python is importable, llama.cpp. Every row runs in this one process
on the same weights, thread count and precision: batch 1, greedy, the same prompt, --max_new_tokens new tokens.

    python scripts/benchmark.py                          # fp32 and bf16, 128 new tokens, 2 threads
    python scripts/benchmark.py --precision bf16 --max_new_tokens 32 --skip_hf

tok/s is decode throughput (tokens after the first, over the time after the first), the best of --repeats runs.
GB/s is that rate times the weight bytes read per token. The machine's read bandwidth is measured here too (the best
of several sums over a 1 GiB tensor on the same threads), and limit = read bandwidth / weight bytes per token.
"by CPU time" divides by this process's CPU time instead of the wall clock: on a machine shared with other jobs it
counts the work a row does, not the time it waited for a core (with several threads it includes OpenMP spin-waiting).
Progress goes to stderr, the markdown table to stdout.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import generate as ff  # noqa: E402
import hugepages  # noqa: E402
import model as model_code  # noqa: E402
from cli import cpu_model, main_guard  # noqa: E402
from figures import weight_bytes  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."


def log(msg):
    tqdm.write(msg, file=sys.stderr)


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> tuple:
    """(read GB/s, copy GB/s) of this machine on the current torch threads: best of `repeats` over nbytes. Measure
    over a buffer the size of the weights too: a buffer that fits the last-level cache reads faster than DRAM. The
    buffers are in huge pages, as load_model places the weights (hugepages.py): a sum over 269 MB read 31 GB/s in
    huge pages and 24 GB/s in 4 KiB pages on a 2-core Xeon, and the limit is the faster read."""
    x = hugepages.empty(max(nbytes // 4, 1), torch.float32).fill_(1)
    y = hugepages.empty(x.numel(), torch.float32)
    nbytes = x.numel() * x.element_size()
    read = copy = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        t1 = time.perf_counter()
        y.copy_(x)
        t2 = time.perf_counter()
        read, copy = min(read, t1 - t0), min(copy, t2 - t1)
    return nbytes / read / 1e9, 2 * nbytes / copy / 1e9


class TokenClock:
    """Stamps wall and CPU time at every token; also a transformers streamer (its first put is the prompt)."""

    def __init__(self):
        self.stamps, self.cpu_stamps, self.tokens = [], [], []

    def put(self, value):
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        self.tokens.extend(value.flatten().tolist())

    def end(self):
        pass

    def rates(self, skip: int = 0):
        """(tok/s by wall clock, tok/s by this process's CPU time) after the first token."""
        stamps, cpu, n = self.stamps[skip:], self.cpu_stamps[skip:], len(self.stamps) - skip
        return (n - 1) / (stamps[-1] - stamps[0]), (n - 1) / (cpu[-1] - cpu[0])


def flexfast_runner(model, prompt, steps, few_token_attention=True, linear_kind=None):
    """linear_kind: the one-token linear kind to use instead of cpu_linear's choice ("gemv", "linear", "kernel")."""

    def run(n):
        clock = TokenClock()
        chosen = dict(model_code.ONE_TOKEN_LINEAR)
        model_code.FEW_TOKEN_ATTENTION = few_token_attention  # read when compiling and guarded on by each call
        if linear_kind is not None:
            model_code.ONE_TOKEN_LINEAR.update({key: linear_kind for key in chosen})
        try:
            tokens, stats = ff.generate(model, prompt, n, steps=steps,
                                        callback=lambda out: clock.put(torch.tensor(out[-1:])))
        finally:
            model_code.FEW_TOKEN_ATTENTION = True
            model_code.ONE_TOKEN_LINEAR.update(chosen)
        return clock.rates(), tokens.tolist()
    return run


def hf_runner(hf_model, prompt, **generate_kwargs):
    import torch._inductor.config as inductor_config
    input_ids = prompt[None]

    def run(n):
        clock = TokenClock()
        # inductor as transformers gets it: without the process-wide settings compile_steps makes for our model
        with inductor_config.patch(freezing=False, **{"cpp.enable_concat_linear": False}):
            hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, streamer=clock, **generate_kwargs)
        return clock.rates(skip=1), clock.tokens[input_ids.shape[1]:]
    return run


def llama_cpp_runner(gguf_path, prompt_ids, threads):
    from llama_cpp import Llama
    llm = Llama(str(gguf_path), n_threads=threads, n_ctx=len(prompt_ids) + 512, verbose=False)

    def run(n):
        llm.reset()
        clock = TokenClock()
        for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            clock.put(torch.tensor([token]))
            if len(clock.tokens) == n:
                break
        return clock.rates(), clock.tokens
    return run


def timed(run, n, repeats):
    """Warm up with the same length (compilation happens here; a static cache sized for another length would
    recompile), then the best of `repeats` runs. Returns ((wall tok/s, CPU-time tok/s), tokens, warm-up seconds)."""
    t0 = time.perf_counter()
    run(n)
    warmup = time.perf_counter() - t0
    best, best_cpu, tokens = 0.0, 0.0, None
    for _ in range(repeats):
        (rate, cpu_rate), tokens = run(n)
        best, best_cpu = max(best, rate), max(best_cpu, cpu_rate)
    return (best, best_cpu), tokens, warmup


def prefill_prompt(tokenizer, n_tokens: int) -> torch.Tensor:
    """n_tokens of real text (Python's own documentation) as one prompt."""
    from pydoc_data.topics import topics
    ids = tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics))[:8 * n_tokens], add_special_tokens=True)
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def measure_prefill(args, name, long_prompt, prefill_rows):
    """Prefill of long_prompt with the compiled prefill step (generate.py --compile_prefill): prompt tok/s, best of
    --repeats after a warm-up that compiles."""
    dtype = ff.PRECISIONS[name]
    model = ff.load_model(args.checkpoint_path, "cpu", dtype)
    model.setup_caches(1, long_prompt.shape[0] + 2)
    steps = ff.compile_steps("cpu", True, dtype)
    t0 = time.perf_counter()
    ff.generate(model, long_prompt, 1, steps=steps)
    warmup = time.perf_counter() - t0
    seconds = min(ff.generate(model, long_prompt, 1, steps=steps)[1].prefill_seconds
                  for _ in range(args.repeats))
    prefill_rows.append(dict(precision=name, tokens=long_prompt.shape[0], rate=long_prompt.shape[0] / seconds,
                             warmup=warmup))
    log(f"{name} prefill {long_prompt.shape[0]} tokens: {long_prompt.shape[0] / seconds:.0f} tok/s "
        f"(warm-up {warmup:.1f}s)")


def benchmark_precision(args, name, prompt, bytes_per_token_holder, rows, progress):
    dtype = ff.PRECISIONS[name]
    n = args.max_new_tokens
    model = ff.load_model(args.checkpoint_path, "cpu", dtype)
    model.setup_caches(1, prompt.shape[0] + n)
    bytes_per_token = weight_bytes(model)
    bytes_per_token_holder[name] = bytes_per_token
    reference = None

    def add(label, make_run, note=""):
        nonlocal reference
        progress.set_description(f"{name} {label}")
        try:
            (rate, cpu_rate), tokens, warmup = timed(make_run(), n, args.repeats)
        except Exception as e:  # a row that cannot run is reported, not fatal
            rows.append(dict(precision=name, what=label, note=f"failed: {type(e).__name__}: "
                                                          f"{str(e).splitlines()[0][:120] if str(e) else ''}"))
            log(f"{name} {label}: failed ({type(e).__name__})")
        else:
            if reference is None:
                reference = tokens
            same = tokens[:len(reference)] == reference[:len(tokens)]
            rows.append(dict(precision=name, what=label, rate=rate, cpu_rate=cpu_rate, bytes=bytes_per_token,
                             warmup=warmup, same=same, note=note))
            log(f"{name} {label}: {rate:.1f} tok/s, by CPU time {cpu_rate:.1f} (warm-up {warmup:.1f}s, "
                f"load {os.getloadavg()[0]:.1f})")
        progress.update()

    add("FlexFast eager", lambda: flexfast_runner(model, prompt, ff.Steps()))
    add("FlexFast compiled", lambda: flexfast_runner(model, prompt, ff.compile_steps("cpu", False, dtype)),
        "generate.compile_steps")
    if args.sdpa_row:
        add("FlexFast compiled, SDPA at one token", lambda: flexfast_runner(
            model, prompt, ff.compile_steps("cpu", False, dtype), few_token_attention=False),
            "model.FEW_TOKEN_ATTENTION = False: the decode before issue 17")
    chosen = model_code.ONE_TOKEN_LINEAR.get((str(dtype), False), "gemv")
    for kind in args.linear_rows:
        if kind != chosen:
            add(f"FlexFast compiled, one-token linear = {kind}", lambda: flexfast_runner(
                model, prompt, ff.compile_steps("cpu", False, dtype, one_token_kind=kind), linear_kind=kind),
                f"cpu_linear chose {chosen} on this machine")
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM, CompileConfig
        hf_model = AutoModelForCausalLM.from_pretrained(args.checkpoint_path.parent, dtype=dtype).eval()
        add("HF transformers eager", lambda: hf_runner(hf_model, prompt))
        compile_config = CompileConfig(mode="default")
        compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless asked
        add("HF static cache + torch.compile",
            lambda: hf_runner(hf_model, prompt, cache_implementation="static", compile_config=compile_config),
            'cache_implementation="static", CompileConfig(mode="default")')
        del hf_model
    else:
        progress.update(2)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None and args.gguf is not None:
        add("llama.cpp (llama-cpp-python)", lambda: llama_cpp_runner(args.gguf, prompt.tolist(), args.threads),
            f"{args.gguf.name}: its own weights and precision, bytes per token differ")
    else:
        why = "llama-cpp-python is not installed" if llama_cpp is None else "no --gguf given"
        rows.append(dict(precision=name, what="llama.cpp (llama-cpp-python)", note=f"not measured: {why}"))
        progress.update()
    del model


# ---------------------------------------------------------------- llama.cpp's own llama-bench (optional)

LLAMA_BENCH = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flexfast/llama.cpp/bin/llama-bench"


def find_llama_bench(path):
    """The llama-bench binary: --llama_bench, else the one scripts/build_llamacpp.sh builds, else on PATH."""
    if path is not None:
        return path if path.exists() else None
    if LLAMA_BENCH.exists():
        return LLAMA_BENCH
    on_path = shutil.which("llama-bench")
    return Path(on_path) if on_path else None


def find_gguf(args):
    """--gguf, else the one GGUF in the checkpoint folder (prepare_default.py keeps the default model's Q4_1)."""
    if args.gguf is not None:
        return args.gguf
    found = sorted(args.checkpoint_path.parent.glob("*.gguf"))
    return found[0] if found else None


def gguf_bytes_per_token(gguf_path) -> int:
    """Bytes of the GGUF's tensors read per token: all of them, except the embedding table when there is a separate
    output matrix (then only one row of the table is read)."""
    from gguf import GGUFReader
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf_path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def llama_bench(binary, gguf_path, threads: int, n_gen: int, n_prompt: int = 0, repetitions: int = 1) -> dict:
    """Runs llama-bench once; returns {"tg": tok/s of the n_gen test, "pp": tok/s of the n_prompt test} for the
    tests asked (n_gen / n_prompt 0 skips one)."""
    cmd = [str(binary), "-m", str(gguf_path), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(repetitions), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    return parse_llama_bench(out)


def parse_llama_bench(text: str) -> dict:
    result = {}
    for test in json.loads(text):
        key = "pp" if test["n_prompt"] and not test["n_gen"] else "tg"
        result[key] = float(test["avg_ts"])
    return result


def llama_cpp_skip_reason(args):
    """None when the llama-bench row can run, else why not (printed instead of the row)."""
    if find_llama_bench(args.llama_bench) is None:
        return (f"llama-bench not found ({args.llama_bench or LLAMA_BENCH} or PATH): "
                f"build it with ./scripts/build_llamacpp.sh")
    if find_gguf(args) is None:
        return f"no GGUF in {args.checkpoint_path.parent} and no --gguf given"
    return None


def llama_cpp_table(args) -> str:
    """The llama.cpp row under the main table: tg (--max_new_tokens) and pp512 on the same thread count."""
    why = llama_cpp_skip_reason(args)
    if why is not None:
        log(f"llama.cpp row skipped: {why}")
        return f"llama.cpp (llama-bench): skipped, {why}."
    gguf_path = find_gguf(args)
    n = args.max_new_tokens
    figures = llama_bench(find_llama_bench(args.llama_bench), gguf_path, args.threads, n, 512, args.repeats)
    return (f"| what | tg{n} tok/s | pp512 tok/s | MB per token |\n|---|---|---|---|\n"
            f"| llama.cpp llama-bench, {gguf_path.name}, -t {args.threads} | {figures['tg']:.1f} | "
            f"{figures['pp']:.1f} | {gguf_bytes_per_token(gguf_path) / 1e6:.0f} |")


# ---------------------------------------------------------------- quantized files against bf16, interleaved

def quantized_label(model) -> str:
    quant = getattr(model, "quantization", None)
    if quant is None:
        return "bf16"
    return quant["mode"] + (f" g{quant['groupsize']}" if "groupsize" in quant else "")


def quantized_rounds(args, prompt, progress) -> list:
    """bf16 compiled (--checkpoint_path) and every --quantized file compiled with bf16 activations, and llama.cpp's
    tg when it can run: each warmed up, then --rounds rounds that run every row once, so drift shows in every row.
    Returns [{what, bytes, rates: [tok/s per round], note}]."""
    dtype, n = torch.bfloat16, args.max_new_tokens
    rows, runners = [], []
    steps = ff.compile_steps("cpu", False, dtype)
    for path in [args.checkpoint_path] + list(args.quantized):
        model = ff.load_model(path, "cpu", dtype)
        model.setup_caches(1, prompt.shape[0] + n)
        label = quantized_label(model)
        progress.set_description(f"{label} compile")
        t0 = time.perf_counter()
        run = flexfast_runner(model, prompt, steps)
        run(n)
        rows.append(dict(what=f"FlexFast compiled, {label}", bytes=weight_bytes(model), rates=[],
                         note=f"{path.name}, warm-up {time.perf_counter() - t0:.0f} s"))
        runners.append(run)
        progress.update()
    why = llama_cpp_skip_reason(args)
    if why is None:
        gguf_path, binary = find_gguf(args), find_llama_bench(args.llama_bench)
        pp = llama_bench(binary, gguf_path, args.threads, 0, 512, 1)["pp"]
        rows.append(dict(what=f"llama.cpp llama-bench tg{n}", bytes=gguf_bytes_per_token(gguf_path), rates=[],
                         note=f"{gguf_path.name}, -t {args.threads}; pp512 {pp:.0f} tok/s"))
        runners.append(lambda _: ((llama_bench(binary, gguf_path, args.threads, n)["tg"], None), None))
    else:
        log(f"llama.cpp row skipped: {why}")
    for _ in range(args.rounds):
        for row, run in zip(rows, runners):
            progress.set_description(row["what"])
            (rate, _), _ = run(n)
            row["rates"].append(rate)
            log(f"{row['what']}: {rate:.1f} tok/s (load {os.getloadavg()[0]:.1f})")
        progress.update()
    if why is not None:
        rows.append(dict(what="llama.cpp llama-bench", note=f"skipped: {why}"))
    return rows


def quantized_markdown(rows, read_bw) -> str:
    lines = ["| what | MB per token | tok/s per round | best tok/s | × bf16 (best) | limit tok/s | % of limit | note |",
             "|---|---|---|---|---|---|---|---|"]
    bf16 = max(rows[0]["rates"])
    for r in rows:
        if not r.get("rates"):
            lines.append(f"| {r['what']} | | | | | | | {r['note']} |")
            continue
        best, limit = max(r["rates"]), read_bw * 1e9 / r["bytes"]
        lines.append(f"| {r['what']} | {r['bytes'] / 1e6:.0f} | {' / '.join(f'{x:.1f}' for x in r['rates'])} | "
                     f"{best:.1f} | {best / bf16:.2f} | {limit:.0f} | {100 * best / limit:.0f}% | {r['note']} |")
    return "\n".join(lines)


def markdown_table(rows, read_bw: dict, read_gib: float, copy_bw: float, bytes_per_token: dict) -> str:
    """read_bw: per precision, the read bandwidth over a buffer the size of its weights (the limit's bandwidth)."""
    lines = ["| precision | what | tok/s | GB/s | % of read bandwidth | × HF eager | tok/s by CPU time | "
             "× HF eager by CPU time | warm-up s | tokens = first row | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, nbytes in bytes_per_token.items():
        bw = read_bw[name]
        lines.append(f"| {name} | **limit** (read bandwidth / {nbytes / 1e6:.0f} MB per token) | "
                     f"{bw * 1e9 / nbytes:.1f} | {bw:.1f} | 100% | | | | | | |")
        hf = next((r for r in rows if r["precision"] == name and r["what"] == "HF transformers eager"
                   and "rate" in r), None)
        for r in rows:
            if r["precision"] != name:
                continue
            if "rate" not in r:
                lines.append(f"| {name} | {r['what']} | – | – | – | – | – | – | – | – | {r['note']} |")
                continue
            gbs = r["rate"] * r["bytes"] / 1e9
            ratio = f"{r['rate'] / hf['rate']:.2f}" if hf else "–"
            cpu_ratio = f"{r['cpu_rate'] / hf['cpu_rate']:.2f}" if hf else "–"
            lines.append(f"| {name} | {r['what']} | {r['rate']:.1f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | "
                         f"{ratio} | {r['cpu_rate']:.1f} | {cpu_ratio} | {r['warmup']:.1f} | "
                         f"{'yes' if r['same'] else 'no'} | {r['note']} |")
    lines.append("")
    sizes = ", ".join(f"{read_bw[name]:.1f} GB/s over {nbytes / 1e6:.0f} MB ({name})"
                      for name, nbytes in bytes_per_token.items())
    lines.append(f"Read bandwidth {sizes}, {read_gib:.1f} GB/s over 1 GiB; copy bandwidth {copy_bw:.1f} GB/s "
                 f"(measured here, {torch.get_num_threads()} threads).")
    return "\n".join(lines)


def prefill_table(prefill_rows) -> str:
    lines = ["| precision | prompt tokens | prefill tok/s (compiled, `--compile_prefill`) | warm-up s |",
             "|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['tokens']} | {r['rate']:.0f} | {r['warmup']:.1f} |" for r in prefill_rows]
    return "\n".join(lines)


NOT_KERNELS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::view",
               "aten::reshape", "aten::transpose", "aten::expand", "aten::detach_", "aten::lift_fresh"}


def kernel_times(events, steps: int) -> list:
    """[(name, calls per token, us per call, us per token)] of the kernels a compiled graph launched: the profiler
    events directly under inductor's call of its generated code (its C++ kernels, when cpp.enable_kernel_profile is
    on, and the extern ops it calls), allocations and views left out."""
    totals = {}
    for e in events:
        parent = e.cpu_parent
        if parent is None or not parent.name.startswith("## Call CompiledFxGraph") or e.name in NOT_KERNELS:
            continue
        calls, us = totals.get(e.name, (0, 0.0))
        totals[e.name] = (calls + 1, us + e.cpu_time_total)
    rows = [(name, calls / steps, us / calls, us / steps) for name, (calls, us) in totals.items()]
    return sorted(rows, key=lambda r: -r[3])


def profile_decode(args, name, prompt, top: int = 12) -> str:
    """Per-token cost model of the compiled one-token decode (what generate.py --compile runs): the bytes time at
    the read bandwidth measured here against the measured step time, the kernels by time, and the time outside
    them (wrappers, guards, allocations, the decode loop)."""
    import torch._inductor.config as inductor_config
    dtype = ff.PRECISIONS[name]
    n = args.max_new_tokens
    model = ff.load_model(args.checkpoint_path, "cpu", dtype)
    model.setup_caches(1, prompt.shape[0] + n)
    nbytes = weight_bytes(model)
    steps = ff.compile_steps("cpu", False, dtype)
    ff.generate(model, prompt, n, steps=steps)  # compiles
    rates = [ff.generate(model, prompt, n, steps=steps)[1].tokens_per_second for _ in range(args.repeats)]
    step_ms = 1e3 / max(rates)
    # a second compile whose kernels record themselves for the profiler: timed apart, as the flag costs the C++
    # wrapper of quantized steps ~1 ms a token even when not profiling (int4, 2-core Xeon)
    torch._dynamo.reset()  # or dynamo may hand the second compile the first one's graphs
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        steps = ff.compile_steps("cpu", False, dtype)
        ff.generate(model, prompt, n, steps=steps)  # compiles
        profiled = min(n - 1, 32)  # tokens after the first, which the prefill gives
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ff.generate(model, prompt, profiled + 1, steps=steps)
    kernels = kernel_times(prof.events(), profiled)  # the prefill is eager here: no compiled-graph events
    kernel_ms = sum(r[3] for r in kernels) / 1e3
    read_here, _ = measure_bandwidth(nbytes)
    read_gib, _ = measure_bandwidth(1 << 30)
    bytes_ms = nbytes / read_here / 1e6
    lines = [f"### {name}: per-token cost model, compiled one-token decode ({cpu_model()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})", "",
             "| | figure |", "|---|---|",
             f"| weights read per token | {nbytes / 1e6:.1f} MB |",
             f"| read bandwidth over a buffer of that size / over 1 GiB | {read_here:.1f} / {read_gib:.1f} GB/s |",
             f"| bytes time per token (at the weight-size bandwidth) | {bytes_ms:.2f} ms |",
             f"| measured step time (best of {args.repeats} x {n} tokens) | {step_ms:.2f} ms = "
             f"{1e3 / step_ms:.1f} tok/s, {100 * bytes_ms / step_ms:.0f}% of the bytes limit |",
             f"| kernels per token | {sum(r[1] for r in kernels):.0f} ({len(kernels)} distinct) |",
             f"| time in kernels per token (profiled, {profiled} tokens) | {kernel_ms:.2f} ms |",
             f"| time outside kernels per token (step - kernels) | {step_ms - kernel_ms:.2f} ms |", "",
             "| kernel | calls / token | us / call | ms / token | % of step |", "|---|---|---|---|---|"]
    for kernel, calls, us_call, us_token in kernels[:top]:
        short = kernel if len(kernel) <= 70 else kernel[:67] + "..."
        lines.append(f"| `{short}` | {calls:.0f} | {us_call:.1f} | {us_token / 1e3:.3f} | "
                     f"{100 * us_token / 1e3 / step_ms:.0f}% |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark decode speed against HF transformers (and llama.cpp).")
    p.add_argument("--checkpoint_path", type=Path, default=ff.DEFAULT_CHECKPOINT)
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row after the warm-up; the best counts")
    p.add_argument("--prompt", type=str, default=DEFAULT_PROMPT)
    p.add_argument("--skip_hf", action="store_true", help="only the FlexFast rows")
    p.add_argument("--gguf", type=Path, default=None,
                   help="GGUF file of the same model, for the llama.cpp rows (default: the one in the checkpoint folder)")
    p.add_argument("--llama_bench", type=Path, default=None,
                   help=f"llama-bench binary (default: {LLAMA_BENCH}, as scripts/build_llamacpp.sh builds it, or PATH)")
    p.add_argument("--quantized", type=Path, nargs="+", default=[],
                   help="instead of the precision table: bf16 against these quantized files and llama.cpp, compiled, "
                        "interleaved over --rounds")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the --quantized table")
    p.add_argument("--prefill_tokens", type=int, default=512, help="also time the compiled prefill of a prompt this "
                   "long (real text); 0: no prefill row")
    p.add_argument("--linear_rows", nargs="*", default=[], choices=("gemv", "linear", "kernel"),
                   help="also the compiled decode with these one-token linear kinds in place of cpu_linear's choice")
    p.add_argument("--sdpa_row", action="store_true", help="also the compiled decode with F.scaled_dot_product_attention"
                   " at one token (the path before model.few_token_attention), interleaved with the default one")
    p.add_argument("--profile", action="store_true",
                   help="instead of the table: the per-token cost model of the compiled decode (kernels by time)")
    return p.parse_args(argv)


def run(args):
    if args.max_new_tokens < 2:
        raise ValueError("--max_new_tokens must be at least 2 (decode speed is measured after the first token)")
    if args.threads < 1 or args.repeats < 1 or args.rounds < 1 or args.prefill_tokens < 0:
        raise ValueError("--threads, --repeats and --rounds must be at least 1, --prefill_tokens at least 0")
    if not args.checkpoint_path.exists():
        raise FileNotFoundError(f"{args.checkpoint_path} not found (run ./scripts/prepare.sh first)")
    if args.gguf is not None and not args.gguf.exists():
        raise FileNotFoundError(f"{args.gguf} not found")
    torch.set_num_threads(args.threads)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    prompt = torch.tensor(tokenizer.encode(args.prompt, add_special_tokens=True), dtype=torch.long)
    log(f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    if args.profile:
        for name in precisions:
            print(profile_decode(args, name, prompt))
        return
    read_gib, copy_bw = measure_bandwidth()
    log(f"read bandwidth {read_gib:.1f} GB/s, copy {copy_bw:.1f} GB/s over 1 GiB")
    if args.quantized:
        return run_quantized(args, prompt, read_gib)
    rows, bytes_per_token, prefill_rows = [], {}, []
    long_prompt = prefill_prompt(tokenizer, args.prefill_tokens) if args.prefill_tokens else None
    per_precision = 5 + bool(args.sdpa_row) + len(args.linear_rows)
    with tqdm(total=per_precision * len(precisions), file=sys.stderr, unit="row") as progress:
        for name in precisions:
            benchmark_precision(args, name, prompt, bytes_per_token, rows, progress)
            if long_prompt is not None:
                measure_prefill(args, name, long_prompt, prefill_rows)
    # measure again at the end and keep the best: the machine may be shared
    read_again, copy_again = measure_bandwidth()
    read_gib, copy_bw = max(read_gib, read_again), max(copy_bw, copy_again)
    read_bw = {name: max(measure_bandwidth(nbytes)[0] for _ in range(2)) for name, nbytes in bytes_per_token.items()}
    print(f"{args.checkpoint_path.parent.name}, batch 1, greedy, {args.max_new_tokens} new tokens, prompt "
          f"{prompt.shape[0]} tokens, {args.threads} threads, {cpu_model()}, torch {torch.__version__}, load average "
          f"at the end {os.getloadavg()[0]:.1f}\n")
    print(markdown_table(rows, read_bw, read_gib, copy_bw, bytes_per_token))
    if prefill_rows:
        print("\n" + prefill_table(prefill_rows))
    print("\n" + llama_cpp_table(args))


def run_quantized(args, prompt, read_bw):
    for path in args.quantized:
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (write it with quantize.py)")
    with tqdm(total=1 + len(args.quantized) + args.rounds, file=sys.stderr, unit="step") as progress:
        rows = quantized_rounds(args, prompt, progress)
    read_again, _ = measure_bandwidth()
    read_bw = max(read_bw, read_again)
    print(f"{cpu_model()}, {args.checkpoint_path.parent.name}, batch 1, "
          f"greedy, {args.max_new_tokens} new tokens, {args.threads} threads, torch {torch.__version__}, load average "
          f"at the end {os.getloadavg()[0]:.1f}\n")
    print(quantized_markdown(rows, read_bw))
    print(f"\nRead bandwidth {read_bw:.1f} GB/s (best of the start and the end, 1 GiB); limit = that / MB per token.")


def main(argv=None):
    args = parse_args(argv)
    main_guard(lambda: run(args), "benchmark")


if __name__ == "__main__":
    main()
