"""What the HTTP layer costs: decode tok/s streamed through server.py (the openai client, one client) against
generate() called in this process, on the same checkpoint, chat prompt, precision, context length and compile
flags. The two alternate run by run (the server waits idle while this process decodes, and the other way round),
so that a load change on a shared machine hits both alike.

    flock /tmp/bench.lock python scripts/bench_server.py --compile

tok/s is decode throughput: tokens after the first, over the time from the first token to the last, stamped where
the tokens arrive (generate()'s callback here; the client's streamed chunks through the server). The median of
--runs runs is shown; "end to end" is the whole request as the client sees it (prefill and HTTP included). The
server does all its torch work on one thread (server.TorchThread), as this process does on its main thread, so the
HTTP layer's cost is the server row over the in-process row. The second-thread row is what the server did before:
generate() on a thread other than the one that loaded and compiled, which gives OpenMP a second team of threads.
"""
import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import cpu_model  # noqa: E402
from figures import weight_bytes  # noqa: E402
from generate import (DEFAULT_CHECKPOINT, PRECISIONS, Steps, compile_steps, default_precision,  # noqa: E402
                      generate, load_model)
from server import spawn  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."




def decode_rate(stamps: list) -> float:
    """stamps: (time, tokens that arrived then); tokens after the first arrival over the time after it."""
    return sum(n for _, n in stamps[1:]) / (stamps[-1][0] - stamps[0][0])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", type=Path, default=ROOT / DEFAULT_CHECKPOINT)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", choices=list(PRECISIONS), default=None)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    if args.runs < 1 or args.max_new_tokens < 2:
        sys.exit("error: --runs must be at least 1 and --max_new_tokens at least 2")
    import openai

    precision = PRECISIONS[args.precision] if args.precision else default_precision("cpu")
    model = load_model(args.checkpoint_path, "cpu", precision)
    model.setup_caches(1, args.max_seq_length)
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]),
                                  add_special_tokens=False)
    t0 = time.perf_counter()
    steps = compile_steps("cpu", False, precision) if args.compile else Steps()

    def direct():
        stamps = []
        tokens, stats = generate(model, torch.tensor(prompt_ids), args.max_new_tokens, steps=steps,
                                     eos_ids=tokenizer.eos_ids,
                                     callback=lambda out: stamps.append((time.perf_counter(), 1)) and False)
        return decode_rate(stamps), None, tokens.tolist()

    def in_thread():  # a second OpenMP team: more OpenMP threads than cores, and libgomp stops spinning
        result = []
        worker = threading.Thread(target=lambda: result.append(direct()))
        worker.start()
        worker.join()
        return result[0]

    direct()  # warm-up (compiles)
    compile_direct = time.perf_counter() - t0
    flags = ["--checkpoint_path", args.checkpoint_path, "--max_seq_length", args.max_seq_length,
             "--precision", str(precision).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
             .replace("float16", "fp16")] + (["--compile"] if args.compile else [])
    t0 = time.perf_counter()
    proc, url, output = spawn(flags, timeout=900)
    start_server = time.perf_counter() - t0
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0)

        def served():
            stamps, tokens, t_start = [], [], time.perf_counter()
            for chunk in client.chat.completions.create(
                    model="any", messages=[{"role": "user", "content": PROMPT}], temperature=0,
                    max_tokens=args.max_new_tokens, stream=True):
                new = chunk.model_extra["flexfast"]["tokens"]
                if new:
                    stamps.append((time.perf_counter(), len(new)))
                    tokens += [t["id"] for t in new]
            return decode_rate(stamps), time.perf_counter() - t_start, tokens

        served()  # warm-up (the first request's HTTP connection, allocator)
        rows = {"generate() in process": [], "generate() in a second thread": [],
                "server.py, streamed (openai client)": []}
        for _ in range(args.runs):
            load = os.getloadavg()[0]
            for name, run in zip(rows, (direct, in_thread, served)):
                rows[name].append(run() + (load,))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    n_direct = len(rows["generate() in process"][0][2])
    same = {name: all(r[2] == rows["generate() in process"][0][2] for r in rs) for name, rs in rows.items()}
    # the HTTP layer's cost: the server against generate() on the thread that loaded and compiled, as its own is
    base = statistics.median(r[0] for r in rows["generate() in process"])
    gb = weight_bytes(model) / 1e9
    loads = [r[3] for rs in rows.values() for r in rs]
    print(f"\nCPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{str(precision).replace('torch.', '')}, {'compiled' if args.compile else 'eager'}, context "
          f"{args.max_seq_length}, prompt {len(prompt_ids)} tokens, {n_direct} new tokens, median of {args.runs} "
          f"alternating runs, load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"compile/warm-up: in process {compile_direct:.1f}s; server start (load + compile) {start_server:.1f}s\n")
    print("| path | decode tok/s | × generate() in process | GB/s (weights read) | end to end s | same tokens |")
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        rate = statistics.median(r[0] for r in rs)
        wall = statistics.median(r[1] for r in rs) if rs[0][1] is not None else None
        print(f"| {name} | {rate:.2f} | {rate / base:.3f} | {rate * gb:.1f} | {f'{wall:.2f}' if wall else ''} | "
              f"{'yes' if same[name] else 'no'} |")


if __name__ == "__main__":
    main()
