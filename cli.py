"""What every entry point shares: files that are never half-written, bad input or an interrupt reported as one
`error:` line with a non-zero exit, and the layer-list flag. Imports nothing heavy, so any module can use it.
"""
import os
import platform
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable


def write_atomic(path, write: Callable[[Path], None]) -> Path:
    """write(tmp) fills a temporary file beside path; only a complete file replaces path. On any error or interrupt
    the temporary file is removed and the previous path is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_atomic(obj, path) -> Path:
    import torch
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def copy_atomic(src, dst) -> Path:
    return write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def catch_interrupts():
    """SIGINT and SIGTERM both raise KeyboardInterrupt, whatever the parent left them as: a background job of a
    non-interactive shell starts with SIGINT ignored, and Python then installs no handler of its own."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def main_guard(run: Callable, what: str = "run"):
    """Call run() as a command-line entry point: bad input (ValueError, FileNotFoundError, OSError) and interrupts
    end in one `error:` line and exit status 1, never a traceback. Returns run()'s result. The signal handlers it
    sets are put back afterwards, so a caller in the same process (a test) keeps its own."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works only there
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    if in_main_thread:
        catch_interrupts()
    try:
        return run()
    except KeyboardInterrupt:
        sys.exit(f"error: {what} interrupted")
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def parse_layers(spec: str, n_layers: int, flag: str = "--routing_layers") -> list:
    """"15-29" or "3,5,7-9" -> sorted layer indices, each checked against the model's depth."""
    layers = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"{flag} {spec!r}: expected A-B or a comma list such as 3,5,7-9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise ValueError(f"{flag} {spec!r}: {lo}-{hi} is an empty range")
        layers.update(range(lo, hi + 1))
    bad = [i for i in sorted(layers) if i >= n_layers]
    if bad:
        raise ValueError(f"{flag} {spec!r}: layer {bad[0]} is outside the model's {n_layers} layers "
                         f"(0-{n_layers - 1})")
    return sorted(layers)


def cpu_model() -> str:
    """The CPU's marketing name (every benchmark table prints it), or the architecture where Linux does not say."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
