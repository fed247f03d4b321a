"""server.py through real HTTP on 127.0.0.1 (a random free port), with the official openai client: answers equal
generate()'s greedy output for the same chat template, stop strings, one request at a time, a client that goes away
mid-stream, malformed requests, the API key; and the page in headless Chromium on a FlexiDepth checkpoint."""
import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from conftest import add_routers, assert_one_line_error, make_hf_llama, run_cli
from convert_hf_checkpoint import TOKENIZER_FILES, convert
from depth_view import depth_rgb
from generate import generate, load_model
from server import spawn
from tokenizer import load_tokenizer

CONTEXT = 384
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea."]
MAX_TOKENS = 16


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except Exception:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(default_checkpoint):
    proc, url, _ = spawn(["--checkpoint_path", default_checkpoint, "--precision", "fp32",
                          "--max_seq_length", CONTEXT], timeout=240)
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def reference(default_checkpoint):
    """generate()'s greedy answer to each question, rendered with the checkpoint's chat template, same context."""
    model = load_model(default_checkpoint, "cpu", torch.float32)
    model.setup_caches(1, CONTEXT)
    tokenizer = load_tokenizer(default_checkpoint.parent)
    answers = {}
    for question in QUESTIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        tokens, _ = generate(model, torch.tensor(prompt_ids), MAX_TOKENS, eos_ids=tokenizer.eos_ids)
        tokens = tokens.tolist()
        answers[question] = dict(text=tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids]),
                                 prompt_tokens=len(prompt_ids), completion_tokens=len(tokens))
    return answers


def http(method, url, body=None, timeout=60):
    """A raw request (no client-side checks): returns (status, parsed JSON body)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(server):
    return http("GET", server + "/health")[1]


def ask(question):
    return dict(model="any", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=MAX_TOKENS)


def test_chat_equals_generate(client, reference):
    question = QUESTIONS[0]
    response = client.chat.completions.create(**ask(question))
    assert response.choices[0].message.content == reference[question]["text"]
    assert response.usage.prompt_tokens == reference[question]["prompt_tokens"]
    assert response.usage.completion_tokens == reference[question]["completion_tokens"]
    assert response.usage.model_extra["tokens_per_second"] > 0


def test_streaming_chat_equals_generate(client, reference):
    question = QUESTIONS[1]
    deltas, pieces = [], []
    for chunk in client.chat.completions.create(**ask(question), stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
        pieces += [t["text"] for t in chunk.model_extra["flexfast"]["tokens"]]
    assert "".join(deltas) == reference[question]["text"]
    assert "".join(pieces) == reference[question]["text"]  # the per-token fields cover the text exactly
    assert len(deltas) > 3  # streamed, not sent at once


def test_stop_string(client, reference):
    text = reference[QUESTIONS[2]]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]  # most likely inside a token: the text must end mid-token
    expected = text[:text.find(stop)]
    response = client.chat.completions.create(**ask(QUESTIONS[2]), stop=[stop, "never appears"])
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == (expected, "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**ask(QUESTIONS[2]), stop=stop, stream=True) if c.choices)
    assert streamed == expected


def test_completions_endpoint(client):
    response = client.completions.create(model="any", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert response.choices[0].text and response.usage.completion_tokens == 4
    assert response.choices[0].finish_reason == "length"


def test_two_clients_served_one_after_the_other(client, reference):
    results = {}

    def run(question):
        times, text = [], ""
        for chunk in client.chat.completions.create(**ask(question), stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.monotonic())
                text += chunk.choices[0].delta.content
        results[question] = (text, times[0], times[-1])

    threads = [threading.Thread(target=run, args=(q,)) for q in QUESTIONS[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert {q: r[0] for q, r in results.items()} == {q: reference[q]["text"] for q in QUESTIONS[:2]}
    (_, first_start, first_end), (_, second_start, second_end) = sorted(results.values(), key=lambda r: r[1])
    assert first_end < second_start  # one request at a time: the second's tokens all come after the first's


def test_disconnect_mid_stream_frees_the_engine(server, client, reference):
    before = health(server)
    stream = client.chat.completions.create(**dict(ask(QUESTIONS[0]), max_tokens=300), stream=True)
    for i, _ in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 60
    while True:
        now = health(server)
        if not now["busy"] and now["cancelled"] == before["cancelled"] + 1:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    response = client.chat.completions.create(**ask(QUESTIONS[0]))
    assert response.choices[0].message.content == reference[QUESTIONS[0]]["text"]


MALFORMED = [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/chat/completions", {"messages": "hello"}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10 * CONTEXT}),
    ("/v1/completions", {"prompt": [10 ** 9]}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}),
]


def test_malformed_requests_get_4xx(server, client):
    for path, body in MALFORMED:
        status, answer = http("POST", server + path, body)
        assert 400 <= status < 500 and answer["error"]["message"], (body, status, answer)
    assert http("POST", server + MALFORMED[8][0], MALFORMED[8][1])[1]["error"]["code"] == "context_length_exceeded"
    assert health(server)["status"] == "ok"
    assert client.chat.completions.create(**dict(ask("Hi"), max_tokens=2)).usage.completion_tokens == 2


def test_api_key_and_self_speculation(default_checkpoint, reference):
    proc, url, _ = spawn(["--checkpoint_path", default_checkpoint, "--precision", "fp32", "--max_seq_length", CONTEXT,
                          "--api_key", "s3cret", "--self_speculative", "--early_exit", 20, "--speculate_k", 2])
    try:
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", timeout=60, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert http("POST", url + "/v1/completions", {"prompt": "hi"})[0] == 401  # no header at all
        right = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", timeout=60, max_retries=0)
        # greedy self-speculation gives the plain answer; the tokens of accepted drafts are marked as such
        chunks = list(right.chat.completions.create(**ask(QUESTIONS[0]), stream=True,
                                                    stream_options={"include_usage": True}))
        tokens = [t for c in chunks for t in c.model_extra.get("flexfast", {}).get("tokens", [])]
        assert "".join(t["text"] for t in tokens) == reference[QUESTIONS[0]]["text"]
        assert chunks[-1].usage.model_extra["mean_accepted"] > 0
        flags = "".join("d" if t["draft"] else "v" for t in tokens)  # v: prefill's or a verifier's own token
        assert "d" in flags and flags[0] == "v" and "ddd" not in flags, flags  # k=2: at most 2 drafts in a row
    finally:
        stop_server(proc)


def test_loading_and_every_generation_run_on_one_thread(default_checkpoint, monkeypatch):
    """server.py does all its torch work on one thread (TorchThread): a thread other than the one that loaded the
    model would start a second OpenMP team, and on 2 cores decode ran at half speed (BENCHMARKS.md). In process:
    build_engine and two requests' generate() run on the same thread, not the caller's; an error comes back raised."""
    import asyncio
    import server
    threads = {"load": set(), "generate": set()}

    def on_thread(name, fn):
        def call(*args, **kwargs):
            threads[name].add(threading.get_ident())
            return fn(*args, **kwargs)
        return call
    monkeypatch.setattr(server, "load_model", on_thread("load", server.load_model))
    monkeypatch.setattr(server, "generate", on_thread("generate", server.generate))
    torch_thread = server.TorchThread()
    args = server.parse_args(["--checkpoint_path", str(default_checkpoint), "--max_seq_length", "64"])
    engine = torch_thread.call(server.build_engine, args, torch_thread)

    async def answers():  # one event loop, as the server's: the torch thread gives the engine back through it
        results = []
        for question in QUESTIONS[:2]:
            tokenizer = engine.tokenizer
            ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]),
                                   add_special_tokens=False)
            job = engine.job(ids, server.Body(temperature=0.0), 4)
            results.append([item async for item in engine.events(job)][-1])
        return results

    for kind, result in asyncio.run(asyncio.wait_for(answers(), timeout=120)):
        assert kind == "done" and result["usage"]["completion_tokens"] == 4, result
    assert threads["load"] == threads["generate"] and len(threads["load"]) == 1
    assert threading.get_ident() not in threads["load"]
    with pytest.raises(FileNotFoundError, match="not found"):
        torch_thread.call(server.load_model, "/nonexistent/model.pth")


def test_bad_command_line_is_one_error_line():
    assert_one_line_error(run_cli("server.py", "--port", "99999"), "cannot listen on 127.0.0.1:99999")
    assert_one_line_error(run_cli("server.py", "--checkpoint_path", "/nonexistent/model.pth"), "not found")
    assert_one_line_error(run_cli("server.py", "--compile_regional", "--port", "0"),
                          "--compile_regional does nothing without --compile")


@pytest.fixture(scope="module")
def flexidepth_checkpoint(tmp_path_factory, default_checkpoint):
    """A tiny random FlexiDepth model that speaks through the default model's tokenizer and chat template."""
    folder = make_hf_llama(tmp_path_factory.mktemp("flexidepth_chat"), vocab_size=49152, num_key_value_heads=2,
                           tie_word_embeddings=True)
    for name in TOKENIZER_FILES:
        if (default_checkpoint.parent / name).exists():
            shutil.copy(default_checkpoint.parent / name, folder / name)
    return convert(add_routers(folder, [1, 2, 3]))


def test_page_shows_depth_colours(flexidepth_checkpoint):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium here (apt-get install -y chromium)")
    proc, url, _ = spawn(["--checkpoint_path", flexidepth_checkpoint, "--max_seq_length", 64, "--precision", "fp32"])
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('FlexiDepth')",
                                   timeout=30000)
            page.fill("#prompt", "Hello there")
            page.click("#send")
            page.wait_for_selector(".assistant .figures", timeout=60000)
            tokens = page.eval_on_selector_all(".assistant span.tok", "s => s.map(x => [x.style.background, x.title])")
            browser.close()
    finally:
        stop_server(proc)
    assert tokens, "no tokens streamed into the page"
    colours = {"rgb({}, {}, {})".format(*depth_rgb(n, 4, 1)) for n in range(1, 5)}
    for background, title in tokens:
        assert background in colours and "/4 layers" in title, (background, title)
    assert not errors, errors
