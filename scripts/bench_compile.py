"""How long `generate.py --compile` takes to compile on this machine: cold and warm, the whole graph and
--compile_regional, each run a fresh process as a user starts it.

    cold    an empty inductor cache (TORCHINDUCTOR_CACHE_DIR); with --fresh_machine also an empty XDG_CACHE_HOME and
            TMPDIR, so the run also pays what a machine's first run pays once: cpu_linear's probe, the kernels'
            build, inductor's vector-ISA check and its precompiled headers (kept under the temporary directory)
    warm    the same command again on the caches the cold run left
Every round runs each mode cold then warm, modes in turn, so that the host's drift touches them alike. A row gives
generate.py's own `compiled in N s` line (the compile of the steps the run uses) and the wall time of the whole
process (loading, probe, compile, decoding --max_new_tokens tokens).

    python scripts/bench_compile.py --rounds 2
    python scripts/bench_compile.py --fresh_machine --modes regional
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import cpu_model, main_guard  # noqa: E402
from generate import DEFAULT_CHECKPOINT  # noqa: E402

MODES = {"default": [], "regional": ["--compile_regional"]}


def timed_run(args, mode: str, env: dict) -> tuple:
    """(seconds generate.py says it compiled, wall seconds of the process)."""
    command = [sys.executable, str(ROOT / "generate.py"), "--compile", *MODES[mode], "--checkpoint_path",
               str(args.checkpoint_path), "--precision", args.precision, "--max_new_tokens", str(args.max_new_tokens),
               "--prompt", "Hello", "--temperature", "0"]
    t0 = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    compiled = re.search(r"compiled in ([0-9.]+) s", result.stdout)
    if result.returncode != 0 or not compiled:
        last = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"generate.py {' '.join(MODES[mode]) or '--compile'} failed: {last}")
    return float(compiled.group(1)), wall


def run(args):
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}: one of {', '.join(MODES)}")
    if not args.checkpoint_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {args.checkpoint_path}")
    times = {(mode, state): [] for mode in args.modes for state in ("cold", "warm")}
    for _ in range(args.rounds):
        for mode in args.modes:
            with tempfile.TemporaryDirectory(prefix="flexfast_compile_") as tmp:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"))
                if args.fresh_machine:
                    env["XDG_CACHE_HOME"] = str(Path(tmp) / "xdg")
                    env["TMPDIR"] = str(Path(tmp) / "tmp")
                    (Path(tmp) / "tmp").mkdir()
                for state in ("cold", "warm"):
                    times[mode, state].append(timed_run(args, mode, env))
                    print(f"{mode} {state}: compiled in {times[mode, state][-1][0]:.1f} s, "
                          f"process {times[mode, state][-1][1]:.1f} s", file=sys.stderr, flush=True)
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, {args.precision}, {args.checkpoint_path.parent.name}, "
          f"{'fresh machine (empty XDG cache and TMPDIR) and ' if args.fresh_machine else ''}"
          f"empty inductor cache for cold, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| mode | run | compiled in (s, per round) | whole process (s, per round) |")
    print("|---|---|---|---|")
    for (mode, state), runs in times.items():
        print(f"| {mode} | {state} | {' / '.join(f'{c:.1f}' for c, _ in runs)} | "
              f"{' / '.join(f'{w:.1f}' for _, w in runs)} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", type=Path, default=ROOT / DEFAULT_CHECKPOINT)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--fresh_machine", action="store_true",
                   help="cold runs also start without FlexFast's per-machine cache (probe, kernels, ISA check)")
    p.add_argument("--max_new_tokens", type=int, default=8)
    return p.parse_args(argv)


if __name__ == "__main__":
    main_guard(lambda: run(parse_args()), "bench_compile")
