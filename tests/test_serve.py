"""`dgemma serve`: the official openai client, infill/edit, bad input, API keys, queueing, cancellation and load,
against a live uvicorn server on 127.0.0.1 with a random tiny checkpoint (3 denoising steps by default)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import uvicorn

import dgemma
from dgemma.cli import _parser, main
from dgemma.serve.app import ServeConfig, create_app

NAME = "tiny"


class LiveServer:
    """uvicorn on 127.0.0.1 and a free port, in a thread; `stop()` ends it."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        host, self.port = self.server.servers[0].sockets[0].getsockname()[:2]
        assert host == "127.0.0.1"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)


def tiny_checkpoint(path):
    """A random tiny checkpoint whose defaults are 3 denoising steps and 32 new tokens."""
    assert main(["init", str(path), "--preset", "tiny", "--seed", "3"]) == 0
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(max_denoising_steps=3, max_new_tokens=32)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return dgemma.load(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / NAME)


@pytest.fixture(scope="module")
def server(model):
    live = LiveServer(create_app(model, ServeConfig(model_name=NAME, max_tokens=2048, max_body_bytes=64_000)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def sse(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each frame of an SSE body."""
    frames = []
    for block in text.strip().split("\n\n"):
        event, data = None, []
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        frames.append((event, "\n".join(data)))
    return frames


# ---- the openai client ---------------------------------------------------------------------------------------------
def test_models_and_health(client, server, model):
    (card,) = client.models.list().data
    assert card.id == NAME and card.model_extra["canvas_length"] == 32
    assert card.model_extra["defaults"]["max_denoising_steps"] == 3
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["waiting"] == 0


def test_completion_matches_the_library_and_seed_reproduces(client, model):
    out = client.completions.create(model=NAME, prompt="def fib(n):", max_tokens=40, seed=7, n=2)
    again = client.completions.create(model=NAME, prompt="def fib(n):", max_tokens=40, seed=7, n=2)
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    ids = model.tokenizer.encode("def fib(n):", add_bos=True)
    ref = model.generate([ids, ids], max_new_tokens=40, seed=7)
    assert [c.text for c in out.choices] == [model.tokenizer.decode(t) for t in ref.token_ids]
    assert [c.finish_reason for c in out.choices] == ref.finish_reasons
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == sum(len(t) for t in ref.token_ids)
    other = client.completions.create(model=NAME, prompt="def fib(n):", max_tokens=40, seed=8)
    assert other.choices[0].text != out.choices[0].text


def test_chat_and_max_tokens_exact(client, model):
    messages = [{"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=37, seed=1)
    ref = model.chat(messages, max_new_tokens=37, seed=1)
    assert out.choices[0].message.content == ref.text[0] and out.choices[0].message.role == "assistant"
    n = len(ref.result.token_ids[0])
    assert out.usage.completion_tokens == n and (n == 37) == (out.choices[0].finish_reason == "length")


def test_next_chat_turn_encodes_only_the_new_turn(client, model, server):
    """The second turn's prompt extends the first's: its answer is what a whole encode gives, and the server's
    prefix cache counts the reuse."""
    first = [{"role": "user", "content": "name a prime"}]
    reply = client.chat.completions.create(model=NAME, messages=first, max_tokens=20, seed=2).choices[0].message
    before = httpx.get(server.url + "/health").json()
    second = first + [{"role": "assistant", "content": reply.content}, {"role": "user", "content": "another one"}]
    out = client.chat.completions.create(model=NAME, messages=second, max_tokens=20, seed=3)
    after = httpx.get(server.url + "/health").json()
    assert out.choices[0].message.content == model.chat(second, max_new_tokens=20, seed=3).text[0]
    assert after["prefix_hits"] == before["prefix_hits"] + 1
    assert after["prefix_reused_tokens"] - before["prefix_reused_tokens"] == \
        len(model.tokenizer.encode_chat(first, thinking=False))


def test_streaming_chat_and_completion(client, model):
    messages = [{"role": "user", "content": "stream please"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=70, seed=5)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=70, seed=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    pieces = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="abc", max_tokens=70, seed=2,
                                                                    stream=True)]
    assert "".join(pieces) == client.completions.create(model=NAME, prompt="abc", max_tokens=70, seed=2).choices[0].text


def test_stream_sends_text_per_canvas_and_drafts_per_step(server):
    body = {"model": NAME, "prompt": "x", "max_tokens": 70, "seed": 3, "stream": True, "draft_events": True,
            "max_denoising_steps": 2}
    frames = sse(httpx.post(server.url + "/v1/completions", json=body, timeout=60).text)
    assert frames[-1] == (None, "[DONE]")
    drafts = [json.loads(d) for e, d in frames if e == "draft"]
    canvases = [json.loads(d) for e, d in frames if e == "canvas"]
    assert [(d["canvas"], d["step"]) for d in drafts] == [(c, s) for c in range(3) for s in (1, 2)]
    assert all(len(d["choices"][0]["tokens"]) == 32 == len(d["choices"][0]["accepted"]) for d in drafts)
    assert [c["canvas"] for c in canvases] == [0, 1, 2] and canvases[0]["steps"] == [2]
    # each canvas: its step drafts, then its commit, then its text, before the next canvas's first draft
    order = [e or "text" for e, _ in frames[:-1]]
    assert order[:12] == ["draft", "draft", "canvas", "text"] * 3 and set(order[12:]) <= {"text"}


def test_stop_strings_cut_text_and_tokens(client, model):
    ref = client.completions.create(model=NAME, prompt="hello", max_tokens=60, seed=11).choices[0].text
    stop = ref[10:13]
    assert len(stop) == 3 and stop not in ref[:12]
    out = client.completions.create(model=NAME, prompt="hello", max_tokens=60, seed=11, stop=[stop, "\x00never"])
    assert out.choices[0].text == ref[:ref.index(stop)] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 60
    streamed = list(client.completions.create(model=NAME, prompt="hello", max_tokens=60, seed=11, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_infill_best_of_answers_with_the_row_the_model_scores_highest(server, model, monkeypatch):
    import dgemma.serve.app as app_module

    url, tok = server.url, model.tokenizer
    body = {"model": NAME, "prefix": "def add(a, b):\n    return ", "suffix": "\n\nprint(add(1, 2))\n",
            "fill_length": 6, "seed": 3, "best_of": 3}
    seen = []

    def favour_the_last(net, prompt, texts):  # records what is scored; ranks the last row first
        seen.append((prompt, texts))
        return torch.arange(len(texts), dtype=torch.float32)

    monkeypatch.setattr(app_module, "fit_scores", favour_the_last)
    out = httpx.post(url + "/v1/infill", json=body, timeout=60).json()
    (prompt, texts), = seen
    suffix = tok.encode(body["suffix"])
    assert prompt == tok.encode(body["prefix"], add_bos=True) and len(texts) == 3
    assert all(t[len(t) - len(suffix):] == suffix for t in texts)  # each row's fill, then the pinned suffix
    assert out["fills"] == [tok.decode(texts[2][:len(texts[2]) - len(suffix)])]
    assert out["text"] == body["prefix"] + out["fills"][0] + body["suffix"] and out["dgemma"]["best_of"] == 3

    def broken(net, prompt, texts):
        raise RuntimeError("scoring broke")

    monkeypatch.setattr(app_module, "fit_scores", broken)  # a failing score fails the request, not the server
    failed = httpx.post(url + "/v1/infill", json=body, timeout=60)
    assert failed.status_code == 500 and "scoring broke" in failed.text
    monkeypatch.undo()
    real = httpx.post(url + "/v1/infill", json=body, timeout=60).json()
    assert real["text"] == body["prefix"] + real["fills"][0] + body["suffix"]
    assert httpx.post(url + "/v1/infill", json=body, timeout=60).json()["fills"] == real["fills"]
    bad = httpx.post(url + "/v1/infill", json={**body, "best_of": 0}, timeout=60)
    assert bad.status_code in (400, 422) and "best_of" in bad.text
    text = "the quick brown fox jumps"
    edit = httpx.post(url + "/v1/edit", json={"model": NAME, "text": text, "selection": {"start": 10, "end": 15},
                                              "seed": 2, "best_of": 2}, timeout=60).json()
    assert edit["text"] == "the quick " + edit["fills"][0] + " fox jumps" and edit["dgemma"]["best_of"] == 2


def test_infill_and_edit_keep_the_pinned_text(server, model):
    url = server.url
    out = httpx.post(url + "/v1/infill", json={"model": NAME, "prefix": "def add(a, b):\n    return ",
                                               "suffix": "\n\nprint(add(1, 2))\n", "fill_length": 6, "seed": 0},
                     timeout=60).json()
    assert out["text"] == "def add(a, b):\n    return " + out["fills"][0] + "\n\nprint(add(1, 2))\n"
    holes = httpx.post(url + "/v1/infill", json={"model": NAME, "text": "a=[[H]]; b=[[H]]; c=3", "hole_marker": "[[H]]",
                                                 "fill_length": [3, 2], "seed": 1}, timeout=60).json()
    f1, f2 = holes["fills"]
    assert holes["text"] == f"a={f1}; b={f2}; c=3" and holes["usage"]["completion_tokens"] == 5
    again = httpx.post(url + "/v1/infill", json={"model": NAME, "text": "a=[[H]]; b=[[H]]; c=3", "hole_marker": "[[H]]",
                                                 "fill_length": [3, 2], "seed": 1}, timeout=60).json()
    assert again["fills"] == holes["fills"]
    text = "the quick brown fox jumps"
    edit = httpx.post(url + "/v1/edit", json={"model": NAME, "text": text, "selection": {"start": 10, "end": 15},
                                              "instruction": "make it red", "seed": 2}, timeout=60).json()
    assert edit["text"] == "the quick " + edit["fills"][0] + " fox jumps" and edit["fill_lengths"] == [5]
    frames = sse(httpx.post(url + "/v1/edit", json={"model": NAME, "text": text, "selection": {"start": 4, "end": 9},
                                                    "stream": True, "draft_events": True, "seed": 2,
                                                    "max_denoising_steps": 2}, timeout=60).text)
    drafts = [json.loads(d) for e, d in frames if e == "draft"]
    assert len(drafts) == 2 and drafts[0]["pinned"][:5] == [False] * 5 and all(drafts[0]["pinned"][5:15])
    final = json.loads(frames[-2][1])
    assert final["object"] == "edit" and final["text"].endswith(" brown fox jumps")


# ---- bad input -----------------------------------------------------------------------------------------------------
BAD = [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, "json_invalid"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe\xfd"}', 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": "9"}, 400, "int_type"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 1.5}, 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model_not_found"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": -3}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 10**12}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "a" * 4080, "max_tokens": 100}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 9999]}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "thinking": True},
     400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "t_min": 0.9, "t_max": 0.1}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "t_min": 0, "t_max": 0}, 400, None),  # no temperature 0
    ("/v1/completions", {"model": "tiny", "prompt": "a", "t_max": 1e39}, 400, None),  # infinite in float32
    ("/v1/completions", b'{"model": "tiny", "prompt": "a", "t_max": Infinity}', 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_denoising_steps": 0}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 64}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * 70_000}, 413, "request_too_large"),
    ("/v1/infill", {"model": "tiny", "text": "no markers"}, 400, None),
    ("/v1/infill", {"model": "tiny", "prefix": "a", "suffix": "b", "fill_length": 40}, 400, None),
    ("/v1/edit", {"model": "tiny", "text": "abc", "selection": {"start": 2, "end": 9}}, 400, None),
]


@pytest.mark.parametrize("path, body, status, code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_a_4xx_openai_error(server, path, body, status, code):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_text_parts_and_the_developer_role_read_as_plain_messages(client):
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    a, b = (client.chat.completions.create(model=NAME, messages=m, max_tokens=16, seed=4) for m in (plain, parts))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_a_choice_cut_by_a_stop_string_ends_the_request_once_the_others_have(client, model, monkeypatch):
    """n = 2: one choice ends with EOS within two canvases, the other meets a stop string there. Nothing is left to
    generate, so the request ends then, not when the stopped row reaches max_tokens."""
    for seed in range(40):  # a seed whose choices end one by EOS, one by length
        out = client.completions.create(model=NAME, prompt="hi", max_tokens=32, seed=seed, n=2)
        reasons = [c.finish_reason for c in out.choices]
        if sorted(reasons) == ["length", "stop"]:
            break
    else:
        pytest.skip("no seed of this random model gives the two endings")
    ended, going = (out.choices[reasons.index(r)].text for r in ("stop", "length"))
    stop = next(going[i:i + 3] for i in range(len(going)) if going[i:i + 3] not in ended)
    passes = []
    decode = model.net.decode
    monkeypatch.setattr(model.net, "decode", lambda *a, **kw: passes.append(1) or decode(*a, **kw))
    cut = client.completions.create(model=NAME, prompt="hi", max_tokens=1024, seed=seed, n=2, stop=[stop])
    assert [c.finish_reason for c in cut.choices] == ["stop", "stop"]
    assert cut.choices[reasons.index("stop")].text == ended
    assert len(passes) <= 3 * 3  # at most one canvas (3 steps) more than the two; 1024 tokens take 64 canvases


def test_model_ids_with_a_slash_are_found(model):
    from fastapi.testclient import TestClient

    with TestClient(create_app(model, ServeConfig(model_name="org/tiny"))) as http:
        assert http.get("/v1/models/org/tiny").json()["id"] == "org/tiny"
        assert http.get("/v1/models/other").status_code == 404


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x", max_tokens=-1)


def test_api_key(model):
    from fastapi.testclient import TestClient

    app = create_app(model, ServeConfig(model_name=NAME, api_key="sesame"))
    with TestClient(app) as tc:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            r = tc.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = tc.post("/v1/completions", content=b"{broken", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401  # the key is checked before the body is read
        assert tc.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert tc.get("/health").status_code == 200 and tc.get("/openapi.json").status_code == 200


def test_dgemma_serve_binds_localhost_by_default(model):
    assert _parser().parse_args(["serve"]).host == "127.0.0.1"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dgemma", "serve", "--model", str(model.path), "--port", str(port),
                             "--api-key", "k"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = None
    try:
        deadline = time.monotonic() + 180  # a loaded machine starts Python + torch slowly
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"})
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        assert r is not None and r.status_code == 200 and r.json()["data"][0]["id"] == NAME
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert f"http://127.0.0.1:{port}" in out


# ---- concurrency ---------------------------------------------------------------------------------------------------
async def _stream(http: httpx.AsyncClient, url: str, body: dict) -> list[tuple[str | None, str]]:
    async with http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        return sse((await r.aread()).decode())


def test_32_concurrent_streams_join_the_running_batch_and_are_well_formed(server, model):
    """A seeded stream holds the worker; 32 requests that arrive meanwhile join its batch at canvas boundaries (one
    engine run in all), and every stream is well-formed."""
    before = httpx.get(server.url + "/health").json()
    submitted = before["requests"] + 1 + 32
    gate = {"model": NAME, "prompt": "gate", "max_tokens": 2048, "seed": 0, "stream": True}
    bodies = [{"model": NAME, "prompt": f"request {i}", "max_tokens": 3 + i, "stream": True,
               "stream_options": {"include_usage": True}} for i in range(32)]

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=40)) as http:
            async with http.stream("POST", server.url + "/v1/completions", json=gate) as r:
                lines = r.aiter_lines()
                while not (await anext(lines)).startswith("data: "):
                    pass  # the gate request holds the worker while all 32 arrive
                tasks = [asyncio.create_task(_stream(http, server.url + "/v1/completions", b)) for b in bodies]
                for _ in range(1200):  # until all 32 were accepted and none is waiting
                    health = (await http.get(server.url + "/health")).json()
                    if health["requests"] == submitted and health["waiting"] == 0:
                        break
                    await asyncio.sleep(0.05)
            return await asyncio.gather(*tasks)  # the gate's client left: its job is cancelled

    start = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - start
    for body, frames in zip(bodies, results):
        assert frames[-1] == (None, "[DONE]")
        chunks = [json.loads(d) for _, d in frames[:-1]]
        *parts, last = chunks
        assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in parts)
        finishes = [c["choices"][0]["finish_reason"] for c in parts if c["choices"][0]["finish_reason"]]
        assert len(finishes) == 1 and parts[-1]["choices"][0]["finish_reason"] == finishes[0]
        usage = last["usage"]
        assert last["choices"] == [] and usage["prompt_tokens"] == len(model.tokenizer.encode(body["prompt"])) + 1
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        # Never more than asked; a "length" finish may return fewer when the model emitted pad ids (dropped).
        if finishes[0] == "length":
            assert usage["completion_tokens"] <= body["max_tokens"]
        else:
            assert usage["completion_tokens"] < body["max_tokens"]
    for _ in range(100):  # the run ends when its last row leaves, just after the last stream's [DONE]
        batches = httpx.get(server.url + "/health").json()["batches"] - before["batches"]
        if batches:
            break
        time.sleep(0.05)
    print(f"\n32 concurrent streams: {seconds:.2f} s, {batches} engine run(s) with the gate")
    assert batches == 1  # the gate's run took every request in


def test_disconnect_frees_the_slot(server):
    long = {"model": NAME, "prompt": "long", "max_tokens": 2048, "stream": True, "seed": 1}
    short = {"model": NAME, "prompt": "short", "max_tokens": 16, "seed": 1}

    async def run():
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", server.url + "/v1/completions", json=long) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # one canvas arrived; walk away mid-stream
            start = time.perf_counter()
            r = await http.post(server.url + "/v1/completions", json=short)
            assert r.status_code == 200
            return time.perf_counter() - start

    waited = asyncio.run(run())
    print(f"\nrequest after a disconnect answered in {waited:.2f} s")
    assert waited < 10  # the abandoned 2048-token stream (64 canvases x 3 steps) would hold the worker far longer
    health = httpx.get(server.url + "/health").json()
    assert health["running_rows"] == 0 and health["waiting"] == 0

    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is cancelled too
        # Seed 2 at 48 steps runs past 512 tokens without an EOS on this checkpoint: seconds of work even on a
        # fast machine, so the client surely gives up first.
        httpx.post(server.url + "/v1/completions",
                   json={**long, "stream": False, "seed": 2, "max_denoising_steps": 48}, timeout=0.5)
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["running_rows"] == 0


def test_full_queue_answers_503(model):
    live = LiveServer(create_app(model, ServeConfig(model_name=NAME, max_queue=1)))
    long = {"model": NAME, "prompt": "busy", "max_tokens": 2048, "seed": 1, "stream": True}

    async def run():
        async with httpx.AsyncClient(timeout=60) as http, \
                http.stream("POST", live.url + "/v1/completions", json=long) as r:
            lines = r.aiter_lines()  # kept open: leaving the iterator would close the stream
            while not (await anext(lines)).startswith("data: "):
                pass  # the first canvas arrived: it is running now
            # Other sampler settings: it cannot join the running batch, so it waits in the queue.
            other = {**long, "stream": False, "max_denoising_steps": 7}
            waiting = asyncio.create_task(http.post(live.url + "/v1/completions", json=other))
            for _ in range(200):
                if (await http.get(live.url + "/health")).json()["waiting"] == 1:
                    break
                await asyncio.sleep(0.02)
            full = await http.post(live.url + "/v1/completions", json={**long, "max_tokens": 4})
            waiting.cancel()
            return full

    try:
        full = asyncio.run(run())
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert full.headers["retry-after"] == "1"
    finally:
        live.stop()
