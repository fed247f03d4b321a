"""An OpenAI-compatible HTTP server over one FlexFast model, with a chat page at /.

    python server.py --compile                     # page: http://127.0.0.1:8000/  OpenAI base_url: http://127.0.0.1:8000/v1
    python server.py --compile --self_speculative --early_exit 4 --speculate_k 2
    FLEXFAST_API_KEY=secret python server.py --host 0.0.0.0 --port 8000

POST /v1/chat/completions and /v1/completions (OpenAI request bodies; "stream": true gives server-sent events),
GET /v1/models, GET /health, GET / (static/index.html). One model serves one request at a time, in arrival order.
Requests always start from an empty cache, so an answer is the same whatever came before it.

Our own response fields, which clients that do not know them ignore:
- usage: tokens_per_second (decode), prefill_seconds, mean_accepted (self-speculation: drafts accepted per step),
  mean_layers_used (FlexiDepth: layers run per generated token, of n_layers).
- "flexfast": {"tokens": [{"id", "text", "draft", "layers", "rgb"}]} on every streamed chunk (the tokens that chunk
  adds) and on the choice of a non-streamed response: each token's text, whether it came from an accepted draft
  (self-speculation), and for FlexiDepth checkpoints the layers it ran and its colour (depth_view.depth_rgb).
- GET /v1/models: each model has "flexfast": {n_layers, routing_layers, fewest_layers, speculate_k, early_exit,
  max_seq_length}.
"""
import argparse
import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import List, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

import cli
import cpu_linear
from depth_view import depth_rgb
from generate import (DEFAULT_CHECKPOINT, PRECISIONS, Steps, compile_steps, default_precision, generate, load_model,
                      warm_up)
from sampling import Sampling
from tokenizer import StreamDecoder, load_tokenizer

PAGE = Path(__file__).resolve().parent / "static" / "index.html"


# ---------------------------------------------------------------- request bodies (OpenAI's shapes)

class Body(BaseModel):
    # fields we do not know are ignored, as OpenAI-compatible servers do; known fields are type-checked strictly
    # ("5" is not a number, true is not a count)
    model_config = ConfigDict(extra="ignore", strict=True)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=1)  # not OpenAI's, but llama.cpp and vLLM take it
    stop: Union[None, str, List[str]] = None
    seed: Optional[int] = Field(None, ge=-2 ** 63, lt=2 ** 64)  # what a torch.Generator takes
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[dict] = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[TextPart]]


class ChatBody(Body):
    messages: List[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionBody(Body):
    prompt: Union[str, List[str], List[int]]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------- generated text, token by token

class TokenPieces:
    """The generated tokens as one text piece each (a piece is "" while a UTF-8 character is still incomplete),
    released only once no stop string can begin in them. The text ends before the first stop string, which is
    not returned (OpenAI's rule); an end-of-sequence token adds no text."""

    def __init__(self, tokenizer, stop: list, eos_ids):
        self.decoder = StreamDecoder(tokenizer)
        self.stop, self.eos_ids = [s for s in stop if s], set(eos_ids)
        self.ids, self.texts, self.info = [], [], []
        self.released = 0  # pieces handed out so far
        self.stopped = False

    def push(self, ids: list, info: list) -> list:
        """Add tokens (ids, and per token a dict of figures); return the pieces now final, as dicts."""
        for token, extra in zip(ids, info):
            if self.stopped or token in self.eos_ids:
                break
            self.ids.append(token)
            self.texts.append(self.decoder.push(self.ids))
            self.info.append(extra)
        return self._release(final=False)

    def finish(self) -> list:
        if not self.stopped:
            self.texts[-1:] = [self.texts[-1] + self.decoder.flush()] if self.texts else []
        return self._release(final=True)

    def _release(self, final: bool) -> list:
        text = "".join(self.texts)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits and not self.stopped:
            self.stopped, end = True, min(hits)
            ends = [0]
            for piece in self.texts:
                ends.append(ends[-1] + len(piece))
            keep = next(j for j in range(len(self.texts)) if ends[j + 1] >= end) + 1 if end > 0 else 0
            self.texts = self.texts[:keep]
            if keep:
                self.texts[-1] = self.texts[-1][:end - ends[keep - 1]]
            self.ids, self.info = self.ids[:keep], self.info[:keep]
            final = True
        release_to = len(self.texts)
        if not final:
            held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            while release_to > self.released and held > 0:  # hold back whole tokens covering the held text
                held -= len(self.texts[release_to - 1])
                release_to -= 1
        out = [dict(id=self.ids[j], text=self.texts[j], **self.info[j]) for j in range(self.released, release_to)]
        self.released = max(self.released, release_to)
        return out


# ---------------------------------------------------------------- the engine: one model, one request at a time

@dataclass
class Job:
    prompt_ids: list
    max_tokens: int
    sampling: Sampling
    stop: list = field(default_factory=list)


class TorchThread:
    """The one thread that runs the server's torch work: loading, compiling, warming up and every generation.
    Each thread that starts an OpenMP parallel region gets a team of threads of its own. With two teams (the main
    thread's from loading, a request thread's from decoding), torch on every core makes more OpenMP threads than
    cores, and libgomp then stops spinning between parallel regions: each of a decode step's ~270 regions waits for
    a sleeping thread to wake. On 2 cores a request thread decoded at 56 tok/s where the loading thread decodes at
    119 (BENCHMARKS.md). A daemon thread, as request threads were: exiting the server waits for no generation."""
    def __init__(self):
        self.calls = SimpleQueue()
        threading.Thread(target=self.serve, name="flexfast-torch", daemon=True).start()

    def serve(self):
        while True:
            self.calls.get()()

    def submit(self, fn):
        """Run fn() on the thread, after every call submitted before it."""
        self.calls.put(fn)

    def call(self, fn, *args):
        """fn(*args) on the thread: waits, and returns its result or raises its exception."""
        future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                future.set_exception(e)
        self.submit(run)
        return future.result()


class Engine:
    def __init__(self, model, tokenizer, steps: Steps, name: str, torch_thread: TorchThread, speculate_k: int = 0,
                 early_exit=None):
        self.model, self.tokenizer, self.steps, self.name = model, tokenizer, steps, name
        self.torch_thread = torch_thread
        self.speculate_k, self.early_exit = speculate_k, early_exit
        self.max_seq_length = model.max_seq_length
        self.room = speculate_k + 1 if speculate_k else 0  # speculation writes up to k+1 slots past the end
        L, routed = model.args.n_layers, model.args.routing_layers
        self.info = dict(n_layers=L, routing_layers=list(routed), fewest_layers=L - len(routed),
                         speculate_k=speculate_k, early_exit=early_exit, max_seq_length=self.max_seq_length)
        self.lock = asyncio.Lock()  # FIFO: waiters are woken in arrival order
        self.counts = dict(served=0, cancelled=0)  # GET /health shows them

    def job(self, prompt_ids: list, body: Body, max_tokens: Optional[int]) -> Job:
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", "prompt")
        free = self.max_seq_length - self.room - len(prompt_ids)
        if free < (max_tokens or 1):
            raise APIError(400, f"this request needs {len(prompt_ids)} prompt tokens + {max_tokens or 1} new tokens"
                           + (f" + {self.room} slots of speculation room" if self.room else "")
                           + f", but the context holds {self.max_seq_length} tokens", "messages",
                           "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop takes at most 4 strings", "stop")
        sampling = Sampling(temperature=body.temperature, top_k=body.top_k,
                            top_p=body.top_p if body.top_p < 1 else None, seed=body.seed,
                            device=str(self.model.norm.weight.device))
        return Job(prompt_ids, max_tokens or free, sampling, stop)

    def run(self, job: Job, emit, cancelled: threading.Event) -> dict:
        """On the torch thread: generate, emit(pieces) as text becomes final; returns finish_reason and usage.
        cancelled (the client went away) stops generation after the current step."""
        model, T, eos_ids = self.model, len(job.prompt_ids), self.tokenizer.eos_ids
        pieces = TokenPieces(self.tokenizer, job.stop, eos_ids)
        routed = bool(model.args.routing_layers)
        seen = [0]

        def push(tokens: list, drafts: list, layers: list):
            info = [dict(draft=d) for d in drafts]
            for extra, used in zip(info, layers):
                extra.update(layers=used, rgb=depth_rgb(used, self.info["n_layers"], self.info["fewest_layers"]))
            seen[0] += len(tokens)
            released = pieces.push(tokens, info)
            if released:
                emit(released)

        def callback(tokens: list) -> bool:
            if len(tokens) >= job.max_tokens or tokens[-1] in eos_ids:
                return False  # the last step may be cut short: its figures come from the stats below
            new = tokens[seen[0]:]
            # a step gives its accepted drafts, then the verifier's own token
            drafts = [bool(self.speculate_k) and i < len(new) - 1 for i in range(len(new))]
            layers = []
            if routed:  # generated token j came out of the forward at position T-1+j
                positions = torch.arange(T - 1 + seen[0], T - 1 + len(tokens), device=model.norm.weight.device)
                layers = model.layers_ran(positions).sum(1).tolist()
            push(new, drafts, layers)
            return pieces.stopped or cancelled.is_set()

        prompt = torch.tensor(job.prompt_ids, dtype=torch.long, device=model.norm.weight.device)
        tokens, stats = generate(model, prompt, job.max_tokens, job.sampling, steps=self.steps,
                                 early_exit=self.early_exit, speculate_k=self.speculate_k, eos_ids=eos_ids,
                                 callback=callback)
        tokens, done = tokens.tolist(), seen[0]
        push(tokens[done:], stats.from_draft[done:], [len(u) for u in stats.layers_used[done:]])
        self.counts["served"] += 1
        self.counts["cancelled"] += cancelled.is_set()
        rest = pieces.finish()
        if rest:
            emit(rest)
        finish = "stop" if pieces.stopped or (tokens and tokens[-1] in eos_ids) else "length"
        usage = dict(prompt_tokens=T, completion_tokens=len(tokens), total_tokens=T + len(tokens),
                     tokens_per_second=round(stats.tokens_per_second, 2) if len(tokens) > 1 else None,
                     prefill_seconds=round(stats.prefill_seconds, 4))
        if stats.accepted:
            usage["mean_accepted"] = round(stats.mean_accepted, 3)
        if routed and stats.layers_used:
            usage["mean_layers_used"] = round(sum(map(len, stats.layers_used)) / len(stats.layers_used), 2)
        return dict(finish_reason=finish, usage=usage, cancelled=cancelled.is_set())

    async def events(self, job: Job):
        """Yields ("tokens", pieces)... then ("done", result) or ("error", exception). Holds the model from the
        moment its turn comes until the torch thread has finished, also when the consumer goes away early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(item):
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work():
            try:
                put(("done", self.run(job, lambda pieces: put(("tokens", pieces)), cancelled)))
            except Exception as e:  # noqa: BLE001 - reported to the client, the server keeps serving
                put(("error", e))
            finally:  # the torch thread, not the consumer, gives the model back: only it knows when generation ended
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.lock.release)

        await self.lock.acquire()
        try:
            self.torch_thread.submit(work)
        except BaseException:
            self.lock.release()
            raise
        try:
            while True:
                item = await queue.get()
                yield item
                if item[0] != "tokens":
                    return
        finally:
            cancelled.set()


# ---------------------------------------------------------------- HTTP

def make_app(engine: Engine, api_key: Optional[str] = None) -> FastAPI:
    app = FastAPI(title="FlexFast", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, param=e.param, code=e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body(f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}",
                                       param=where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer ...)",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "busy": engine.lock.locked(), **engine.counts}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "flexfast", "flexfast": engine.info}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        try:
            text = engine.tokenizer.apply_chat_template(messages)
        except Exception as e:  # noqa: BLE001 - a template may refuse a conversation (roles out of order ...)
            raise APIError(400, f"cannot render the conversation with the chat template: {e}", "messages")
        prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
        return await respond(engine, engine.job(prompt_ids, body, body.max_completion_tokens or body.max_tokens),
                             body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            vocab = engine.model.args.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"token ids must be in 0..{vocab - 1}", "prompt")
            prompt_ids = list(prompt)
        return await respond(engine, engine.job(prompt_ids, body, body.max_tokens), body, chat=False)

    return app


async def respond(engine: Engine, job: Job, body: Body, chat: bool):
    head = dict(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                object="chat.completion" if chat else "text_completion", created=int(time.time()), model=engine.name)
    if not body.stream:
        tokens, result = [], None
        async for kind, value in engine.events(job):
            if kind == "error":
                raise value
            if kind == "tokens":
                tokens += value
            else:
                result = value
        text = "".join(t["text"] for t in tokens)
        choice = dict(index=0, finish_reason=result["finish_reason"], logprobs=None, flexfast={"tokens": tokens})
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return dict(head, choices=[choice], usage=result["usage"])

    head["object"] += ".chunk" if chat else ""
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(text=None, finish=None, tokens=None, usage=None, first=False):
        if usage is not None:
            return dict(head, choices=[], usage=usage)
        choice = dict(index=0, finish_reason=finish, logprobs=None)
        if chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
        else:
            choice["text"] = text or ""
        return dict(head, choices=[choice], flexfast={"tokens": tokens or []})

    async def stream():
        def sse(obj):
            return f"data: {json.dumps(obj)}\n\n"

        if chat:
            yield sse(chunk(first=True))
        async with contextlib.aclosing(engine.events(job)) as events:
            async for kind, value in events:
                if kind == "tokens":
                    yield sse(chunk(text="".join(t["text"] for t in value), tokens=value))
                elif kind == "error":
                    yield sse(error_body(f"generation failed: {value}", kind="server_error"))
                else:
                    yield sse(chunk(finish=value["finish_reason"]))
                    if include_usage:
                        yield sse(chunk(usage=value["usage"]))
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a converted checkpoint over an OpenAI-compatible HTTP API.")
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--api_key", default=os.environ.get("FLEXFAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $FLEXFAST_API_KEY)")
    p.add_argument("--compile", action="store_true", help="compile the decode steps (compiled before serving)")
    p.add_argument("--compile_prefill", action="store_true")
    p.add_argument("--compile_regional", action="store_true",
                   help="with --compile on CPU: compile the repeated layer once (faster start, decode about 10%% "
                        "slower)")
    p.add_argument("--self_speculative", action="store_true")
    p.add_argument("--early_exit", type=int, default=None)
    p.add_argument("--speculate_k", type=int, default=3)
    p.add_argument("--max_seq_length", type=int, default=2048, help="tokens of context (prompt + answer) per request")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=list(PRECISIONS), default=None)
    return p.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def open_socket(host: str, port: int) -> socket.socket:
    """Bind before the model loads, so a taken port fails at once with one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections made before uvicorn starts wait in the backlog instead of being refused
    except (OSError, OverflowError) as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e}")
    return sock


def build_engine(args, torch_thread: TorchThread) -> Engine:
    """Load, compile and warm up; to be called on torch_thread, which then runs the engine's generations."""
    if not 1 <= args.max_seq_length:
        raise ValueError(f"--max_seq_length must be positive, got {args.max_seq_length}")
    if args.compile_regional and not args.compile:
        raise ValueError("--compile_regional does nothing without --compile")
    precision = PRECISIONS[args.precision] if args.precision else default_precision(args.device)
    if args.compile and not args.device.startswith("cuda"):
        cpu_linear.machine_setup()  # a machine's first run: its compile's setup overlaps the load
    model = load_model(args.checkpoint_path, args.device, precision)
    L = model.args.n_layers
    speculate_k = args.speculate_k if args.self_speculative else 0
    if args.self_speculative:
        if not (args.early_exit is not None and 1 <= args.early_exit < L):
            raise ValueError(f"--early_exit must be in 1..{L - 1} for this {L}-layer model, got {args.early_exit}")
        if args.speculate_k < 1:
            raise ValueError(f"--speculate_k must be at least 1, got {args.speculate_k}")
        if model.args.routing_layers:
            raise ValueError("self-speculation with a FlexiDepth checkpoint is not supported")
    model.setup_caches(1, min(args.max_seq_length, model.args.max_position_embeddings))
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    # the cache is the whole context: the steps read only the slots up to their position
    steps = compile_steps(args.device, args.compile_prefill, precision, regional=args.compile_regional,
                          bounded=True) if args.compile else Steps()
    name = args.checkpoint_path.parent.name
    engine = Engine(model, tokenizer, steps, name, torch_thread, speculate_k,
                    args.early_exit if speculate_k else None)
    print(f"{name}: {L} layers, {str(precision).replace('torch.', '')}, {args.device}, context "
          f"{engine.max_seq_length}" + (f", self-speculative E={args.early_exit} k={speculate_k}" if speculate_k else "")
          + (f", FlexiDepth routers on {len(model.args.routing_layers)} layers" if model.args.routing_layers else ""),
          flush=True)
    if args.compile:  # compile now, so that the first request does not wait for it
        seconds = warm_up(model, steps, 16, speculate_k=speculate_k, early_exit=engine.early_exit)
        print(f"compiled in {seconds:.1f}s", flush=True)
    return engine


def spawn(args: list, timeout: float = 300.0):
    """Start `python server.py ARGS --port 0` as a subprocess (tests, scripts/bench_server.py) and wait until it
    serves. Returns (process, base_url, output lines so far and to come); the caller must stop the process."""
    import subprocess
    import queue
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *map(str, args), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines, seen = [], queue.Queue()

    def drain():  # keeps reading, so that the server never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line)
            seen.put(line)
        seen.put(None)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                line = seen.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError(f"server.py did not serve within {timeout:.0f}s:\n" + "".join(lines)) from None
            if line is None:
                raise RuntimeError("server.py exited before serving:\n" + "".join(lines))
            if line.startswith("serving on "):
                return proc, line.split()[2].rstrip("/"), lines
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def main(argv=None):
    import uvicorn
    args = parse_args(argv)

    def serve():
        sock = open_socket(args.host, args.port)
        if not is_loopback(args.host):
            print(f"warning: listening on {args.host}, not on loopback: anyone who can reach this machine can use "
                  f"the model{'' if args.api_key else ' (no --api_key set)'}", file=sys.stderr, flush=True)
        torch_thread = TorchThread()
        engine = torch_thread.call(build_engine, args, torch_thread)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving on http://{shown}:{port}/ (OpenAI base_url http://{shown}:{port}/v1)", flush=True)
        config = uvicorn.Config(make_app(engine, args.api_key), log_level="warning", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])

    cli.main_guard(serve, "server")


if __name__ == "__main__":
    main()
