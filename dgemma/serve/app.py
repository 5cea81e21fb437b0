"""The OpenAI-compatible HTTP server: `create_app(model)` returns a FastAPI app; `serve(...)` runs it with uvicorn.

Owns: the routes (GET /health, GET /v1/models, POST /v1/completions, /v1/chat/completions, /v1/infill, /v1/edit,
the playground at /), request schemas and their limits, OpenAI-shaped errors (`{"error": {message, type, param,
code}}`) for every 4xx/5xx, the API key check, the body size limit, SSE formatting (answer deltas per committed
canvas; per-step `event: draft` frames and per-canvas `event: canvas` frames for clients that set `draft_events`),
and cancelling the job of a client that disconnects.
Must not: run the network on the event loop (the scheduler's worker thread does) or change generation itself.

Request extensions (all optional; absent = the checkpoint's generation_config.json): `max_denoising_steps`,
`entropy_bound`, `t_min`, `t_max`, and `draft_events` (stream per-step drafts). Chat also takes `thinking`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import Model
from ..engine.ar import fit_scores
from .scheduler import Commit, Diffusion, Draft, End, Failed, Job, QueueFull, Scheduler
from .text import Choice, channel_ids

STATIC = Path(__file__).parent / "static"
INT64 = {"ge": -(2**63), "le": 2**63 - 1}


@dataclass
class ServeConfig:
    """Server limits. `max_tokens`: the largest max_tokens a request may ask; `max_steps`: the largest
    max_denoising_steps; `max_batch`: rows (prompts x n) per engine call and per request."""

    model_name: str = "dgemma"
    api_key: str | None = None
    max_queue: int = 64
    max_batch: int = 32
    max_tokens: int = 4096
    max_steps: int = 256
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def _error_body(message: str, kind: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return JSONResponse(_error_body(message, kind, param, code), status_code=status, headers=headers)


# ---- request schemas ---------------------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(description="the model id from GET /v1/models")
    seed: int | None = Field(None, **INT64, description="same seed and request -> same output")
    max_denoising_steps: int | None = Field(None, ge=1, description="extension: decoder passes per canvas at most")
    entropy_bound: float | None = Field(None, gt=0, description="extension: entropy accepted per step")
    t_min: float | None = Field(None, ge=0, description="extension: temperature at the last step")
    t_max: float | None = Field(None, ge=0, description="extension: temperature at the first step")
    draft_events: bool = Field(False, description="extension: with stream, also send `event: draft` frames per "
                                                  "denoising step and `event: canvas` frames per committed canvas")
    stream: bool = False


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Generate(_Request):
    max_tokens: int | None = Field(None, description="new tokens per choice at most (exact cut)")
    n: int = Field(1, ge=1, le=64, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end a choice (not returned)")
    stream_options: _StreamOptions | None = None
    temperature: float | None = Field(None, description="accepted for compatibility and ignored: the diffusion "
                                                        "sampler's temperature runs from t_max to t_min")
    top_p: float | None = Field(None, description="accepted for compatibility and ignored")


class CompletionRequest(_Generate):
    prompt: str | list[str] | list[int] = Field(description="text, a list of texts, or token ids")


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]


class ChatRequest(_Generate):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, description="alias of max_tokens")
    thinking: bool = Field(False, description="extension: render the chat template with thinking on; the "
                                              "reasoning comes back as `reasoning_content`")


class _FillRequest(_Request):
    best_of: int = Field(1, ge=1, le=16, description="fill this many times in one batch and answer with the fills "
                                                     "the model scores most likely with the text after them")


class InfillRequest(_FillRequest):
    prefix: str | None = Field(None, description="text before the hole (with suffix)")
    suffix: str | None = Field(None, description="text after the hole (with prefix)")
    text: str | None = Field(None, description="text with one or more hole markers (instead of prefix/suffix)")
    hole_marker: str = Field("<|hole|>", min_length=1)
    fill_length: int | list[int] | None = Field(None, description="tokens per hole (one number or one per hole); "
                                                                  "default: half the canvas room shared by the holes")


class Selection(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    start: int = Field(ge=0, description="first selected character (code points)")
    end: int = Field(ge=0, description="one past the last selected character")


class EditRequest(_FillRequest):
    text: str
    selection: Selection
    instruction: str | None = Field(None, description="what to do with the span (uses the chat template)")
    fill_length: int | None = Field(None, description="tokens for the new span (default: the old span's)")


# ---- the app -----------------------------------------------------------------------------------------------------
class _Guard:
    """ASGI middleware: the API key on /v1/ routes, then the body size limit (the body is read here, bounded,
    and replayed to the app)."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.config.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            want = f"Bearer {self.config.api_key}"
            if not hmac.compare_digest(given.encode(), want.encode()):
                message = "missing API key" if not given else "invalid API key"
                return await _error(401, f"{message}: send 'Authorization: Bearer KEY'", code="invalid_api_key")(
                    scope, receive, send)
        limit = self.config.max_body_bytes
        too_big = _error(413, f"request body larger than {limit} bytes", code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_big(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(model: Model, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving `model`. Its scheduler thread starts with the first request and stops at shutdown."""
    config = config or ServeConfig()
    if model.tokenizer is None:
        raise ValueError("serving needs a tokenizer: a checkpoint with tokenizer.json, or --tokenizer DIR_OR_ID")
    tok = model.tokenizer
    cfg = model.config
    pieces: dict[int, str] = {}
    workers: list[Scheduler] = []  # the live scheduler, started on first use and closed at shutdown

    def scheduler() -> Scheduler:
        if not workers:
            workers.append(Scheduler(model, max_queue=config.max_queue, max_batch=config.max_batch))
        return workers[0]

    async def lifespan(app):
        yield
        if workers:
            await asyncio.to_thread(workers.pop().close)

    app = FastAPI(title="dgemma", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for a DiffusionGemma block-diffusion model, plus infill/edit "
                              "on pinned positions. Diffusion settings are request extensions.")
    app.add_middleware(_Guard, config=config)

    # ---- errors ------------------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return _error(err.status, err.message, err.kind, err.param, err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", message)
            return _error(400, f"malformed JSON body: {reason}", code="json_invalid")
        where = ".".join(loc)
        return _error(400, f"{where}: {message}" if where else message, param=where or None, code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        detail = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 400 and detail == "There was an error parsing the body":
            detail = "the body is not valid JSON in UTF-8"
        return _error(err.status_code, detail, kind, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, err: Exception):
        return _error(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    # ---- helpers -----------------------------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != config.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                           "model", "model_not_found")

    def diffusion(req: _Request) -> Diffusion:
        if req.max_denoising_steps is not None and req.max_denoising_steps > config.max_steps:
            raise ApiError(400, f"max_denoising_steps must be at most {config.max_steps}", "max_denoising_steps")
        d = Diffusion(req.max_denoising_steps, req.entropy_bound, req.t_min, req.t_max)
        try:
            model.settings.replace(max_denoising_steps=d.max_denoising_steps, entropy_bound=d.entropy_bound,
                                   t_min=d.t_min, t_max=d.t_max)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        return d

    def check_context(prompt_len: int, n: int) -> None:
        context, c = cfg.max_position_embeddings, cfg.canvas_length
        needed = prompt_len + math.ceil(n / c) * c
        if n < 1 or needed > context:
            raise ApiError(400, f"this model's maximum context length is {context} positions; the prompt has "
                                f"{prompt_len} tokens and {n} new tokens need {needed} (canvases of {c})",
                           "max_tokens", "context_length_exceeded")

    def max_tokens(asked: int | None, prompt_len: int) -> int:
        """The request's max_tokens within the server limit and the context (the default shrinks to fit)."""
        n = min(model.settings.max_new_tokens, config.max_tokens) if asked is None else asked
        if n < 1 or n > config.max_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {config.max_tokens}, got {n}", "max_tokens")
        if asked is None:
            c = cfg.canvas_length
            n = min(n, (cfg.max_position_embeddings - prompt_len) // c * c)
        check_context(prompt_len, n)
        return n

    def submit(job: Job) -> None:
        try:
            scheduler().submit(job)
        except QueueFull as err:
            raise ApiError(503, f"server overloaded: {err}; retry later", code="queue_full", kind="server_error",
                           headers={"Retry-After": "1"}) from None
        except ValueError as err:
            raise ApiError(400, str(err), "n") from None

    def piece(token: int) -> str:
        if token not in pieces:
            pieces[token] = tok.decode([token], skip_special_tokens=False)
        return pieces[token]

    def draft_frame(event: Draft, pinned: list[bool] | None = None) -> str:
        rows = [{"index": i, "tokens": [piece(t) for t in ids], "accepted": acc, "done": done}
                for i, (ids, acc, done) in enumerate(zip(event.tokens, event.accepted, event.done))]
        data = {"object": "draft", "canvas": event.canvas, "step": event.step, "choices": rows}
        if pinned is not None:
            data["pinned"] = pinned
        return f"event: draft\ndata: {json.dumps(data)}\n\n"

    async def watch_disconnect(request: Request, job: Job) -> None:
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                job.cancel()
                return

    async def events(job: Job):
        """The job's events up to End; raises ApiError on Failed. Cancels the job when abandoned."""
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, Failed):
                    raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
                yield event
                if isinstance(event, End):
                    return
        finally:
            if not job.ended:
                job.cancel()

    async def collect(request: Request, job: Job, on_event) -> None:
        """Non-streaming: feed every event to on_event; a disconnect cancels the job."""
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            async for event in events(job):
                on_event(event)
        finally:
            watcher.cancel()

    # ---- completions and chat ----------------------------------------------------------------------------------
    def encode_prompts(req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})", "prompt")
            return [list(prompt)]
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not texts or any(not t for t in texts):
            raise ApiError(400, "empty prompt", "prompt")
        return [tok.encode(t, add_bos=cfg.bos_token_id is not None) for t in texts]

    def stops(req: _Generate) -> tuple[str, ...]:
        values = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(values) > 4 or any(not s for s in values):
            raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
        return tuple(values)

    async def generate(request: Request, req: _Generate, prompts: list[list[int]], chat: bool,
                       channel: tuple[int, int] | None, asked: int | None):
        check_model(req.model)
        d, stop = diffusion(req), stops(req)
        limit = max_tokens(asked, max(len(p) for p in prompts))
        rows = [p for p in prompts for _ in range(req.n)]
        choices = [Choice(tok, stop, channel) for _ in rows]
        job = Job(rows, limit, d, seed=req.seed, drafts=req.stream and req.draft_events)
        submit(job)
        prompt_tokens = sum(len(p) for p in prompts)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created, start = int(time.time()), time.perf_counter()

        ended = [False] * len(choices)  # rows the engine has finished (their finish reason comes with End)

        def on_commit(event: Commit) -> list[tuple[int, str, str]]:
            out = []
            for i, (ids, steps) in enumerate(zip(event.tokens, event.steps)):
                ch = choices[i]
                if ch.finish_reason is not None or ended[i]:
                    continue
                ended[i] = bool(event.finished and event.finished[i])
                ch.steps.append(steps)
                thought, answer = ch.feed(ids, False)
                if ch.stopped:
                    ch.finish_reason = "stop"
                out.append((i, thought, answer))
            if not all(ended) and all(ch.finish_reason or done for ch, done in zip(choices, ended)):
                job.cancel()  # every choice is through, some by a stop string: no row generates on for nothing
            return out

        def on_end(event: End) -> list[tuple[int, str, str]]:
            out = []
            for i, ch in enumerate(choices):
                if ch.finish_reason is None:
                    thought, answer = ch.feed([], True)
                    ch.finish_reason = event.finish_reasons[i] if event.finish_reasons else "length"
                    out.append((i, thought, answer))
            return out

        def usage() -> dict:
            completion = sum(ch.tokens for ch in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        def stats() -> dict:
            seconds = time.perf_counter() - start
            return {"seconds": round(seconds, 4), "steps_per_canvas": [ch.steps for ch in choices],
                    "tokens_per_second": round(sum(ch.tokens for ch in choices) / max(seconds, 1e-9), 2)}

        def on_event(event) -> None:
            if isinstance(event, Commit):
                on_commit(event)
            elif isinstance(event, End):
                on_end(event)

        if not req.stream:
            await collect(request, job, on_event)
            if chat:
                out = [{"index": i, "message": {"role": "assistant", "content": ch.content.text,
                                                **({"reasoning_content": ch.reasoning.text} if ch.reasoning else {})},
                        "logprobs": None, "finish_reason": ch.finish_reason} for i, ch in enumerate(choices)]
            else:
                out = [{"index": i, "text": ch.content.text, "logprobs": None, "finish_reason": ch.finish_reason}
                       for i, ch in enumerate(choices)]
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": config.model_name, "choices": out, "usage": usage(), "dgemma": stats()}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(parts: list[dict]) -> str:
            body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                    "model": config.model_name, "choices": parts}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        def part(i: int, thought: str, answer: str, finish: str | None = None, role: bool = False) -> dict:
            if not chat:
                return {"index": i, "text": answer, "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant"} if role else {}
            if thought:
                delta["reasoning_content"] = thought
            if answer or role:
                delta["content"] = answer
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

        async def stream():
            if chat:
                yield chunk([part(i, "", "", role=True) for i in range(len(choices))])
            async for event in events(job):
                if isinstance(event, Draft):
                    yield draft_frame(event)
                    continue
                deltas = on_commit(event) if isinstance(event, Commit) else on_end(event)
                if isinstance(event, Commit) and job.drafts:
                    data = {"object": "canvas", "canvas": event.canvas, "steps": event.steps,
                            "tokens": [len(ids) for ids in event.tokens]}
                    yield f"event: canvas\ndata: {json.dumps(data)}\n\n"
                parts = []
                for i, thought, answer in deltas:
                    finish = choices[i].finish_reason if isinstance(event, End) or choices[i].stopped else None
                    if thought or answer or finish:
                        parts.append(part(i, thought, answer, finish))
                if parts:
                    yield chunk(parts)
            if include_usage:
                body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created, "model": config.model_name, "choices": [], "usage": usage(),
                        "dgemma": stats()}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return _event_stream(stream())

    @app.post("/v1/completions", summary="Text completion (OpenAI format)")
    async def completions(request: Request, req: CompletionRequest):
        return await generate(request, req, encode_prompts(req), False, None, req.max_tokens)

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI format)")
    async def chat_completions(request: Request, req: ChatRequest):
        if not req.messages:
            raise ApiError(400, "messages must hold at least one message", "messages")
        if tok.chat_template is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
        if req.thinking and not supports_thinking():
            raise ApiError(400, "this model's chat template has no thinking mode", "thinking")
        messages = [m.model_dump() for m in req.messages]  # text parts and roles: see Tokenizer.apply_chat_template
        try:
            prompt = tok.encode_chat(messages, thinking=req.thinking)
        except Exception as err:  # noqa: BLE001 - template errors come in several types, all the caller's input
            raise ApiError(400, f"the chat template rejected the messages: {err}", "messages") from None
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await generate(request, req, [prompt], True, channel_ids(tok), asked)

    thinking_support: list[bool] = []

    def supports_thinking() -> bool:
        if not thinking_support:
            probe = [{"role": "user", "content": "hi"}]
            thinking_support.append(tok.apply_chat_template(probe, thinking=True)
                                    != tok.apply_chat_template(probe, thinking=False))
        return thinking_support[0]

    # ---- infill and edit ---------------------------------------------------------------------------------------
    def prompt_ids(text: str) -> list[int]:
        ids = tok.encode(text, add_bos=cfg.bos_token_id is not None) if cfg.bos_token_id is not None or text \
            else []
        if not ids:
            raise ApiError(400, "the text before the first hole is empty and this model has no BOS token", "text")
        return ids

    def layout(segments: list[list[int]], holes: list[int]) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
        """Canvas ids, pinned mask and hole spans for [hole_1, seg_1, ..., hole_k, seg_k]; seg_k is cut to fit."""
        c = cfg.canvas_length
        canvas, pinned, spans = [], [], []
        for i, (hole, seg) in enumerate(zip(holes, segments)):
            if hole < 1:
                raise ApiError(400, "fill_length must be at least 1", "fill_length")
            spans.append((len(canvas), len(canvas) + hole))
            canvas += [-1] * hole
            pinned += [False] * hole
            if i == len(holes) - 1:
                seg = seg[: max(0, c - len(canvas))]
            canvas += seg
            pinned += [True] * len(seg)
            if len(canvas) > c:
                raise ApiError(400, f"the holes and the text between them take {len(canvas)} tokens; they must fit "
                                    f"in one canvas of {c}", "fill_length")
        canvas += [-1] * (c - len(canvas))
        pinned += [False] * (c - len(pinned))
        return canvas, pinned, spans

    async def fill(request: Request, req: _FillRequest, prompt: list[int], head: str, texts: list[str],
                   holes: list[int] | None, kind: str):
        """Fill the holes before each of `texts` (their ids pinned) after `prompt`; answer or stream the result.
        With `req.best_of` > 1 the job has that many rows, and the answer is the row whose fills and pinned text
        `fit_scores` ranks first."""
        check_model(req.model)
        d = diffusion(req)
        c = cfg.canvas_length
        check_context(len(prompt), c)
        segments = [tok.encode(t) for t in texts]
        if holes is None:
            room = c - sum(len(s) for s in segments[:-1])
            holes = [max(1, min(64, room // (2 * len(texts))))] * len(texts)
        canvas, pinned, spans = layout(segments, holes)
        end = max([spans[-1][1]] + [i + 1 for i, p in enumerate(pinned) if p])  # the laid-out canvas
        drop = {cfg.pad_token_id, *cfg.eos_token_ids}

        def score(drafts: list[list[int]]) -> list[float]:
            """Each row's fills (pad and EOS dropped) with the pinned text after each, scored after the prompt."""
            texts = []
            for draft in drafts:
                ids = []
                for (a, b), next_a in zip(spans, [a for a, _ in spans[1:]] + [end]):
                    ids += [t for t in draft[a:b] if t not in drop] + draft[b:next_a]
                texts.append(ids)
            return fit_scores(model.net, prompt, texts).tolist()

        best_of = req.best_of
        job = Job([prompt] * best_of, c, d, seed=req.seed, canvas=canvas, pinned=pinned,
                  drafts=req.stream and req.draft_events, score=score if best_of > 1 else None)
        submit(job)
        rid, created, start = f"{kind}-{uuid.uuid4().hex}", int(time.time()), time.perf_counter()
        result: dict = {}

        def on_event(event) -> None:
            if isinstance(event, Commit):
                best = 0 if event.scores is None else max(range(best_of), key=event.scores.__getitem__)
                draft = event.tokens[best]
                fills = [tok.decode(draft[a:b]) for a, b in spans]
                text = head + "".join(f + t for f, t in zip(fills, texts))
                seconds = time.perf_counter() - start
                result.update({"id": rid, "object": kind, "created": created, "model": config.model_name,
                               "text": text, "fills": fills, "fill_lengths": holes,
                               "usage": {"prompt_tokens": len(prompt), "completion_tokens": sum(holes),
                                         "total_tokens": len(prompt) + sum(holes)},
                               "dgemma": {"seconds": round(seconds, 4), "steps_per_canvas": [[event.steps[best]]],
                                          "best_of": best_of,
                                          "tokens_per_second": round(sum(holes) / max(seconds, 1e-9), 2)}})

        if not req.stream:
            await collect(request, job, on_event)
            if not result:
                raise ApiError(500, "generation ended without a result", kind="server_error")
            return result

        async def stream():
            async for event in events(job):
                if isinstance(event, Draft):
                    yield draft_frame(event, pinned)
                on_event(event)
            yield f"data: {json.dumps(result)}\n\n"
            yield "data: [DONE]\n\n"

        return _event_stream(stream())

    @app.post("/v1/infill", summary="Fill one or more holes between pinned text")
    async def infill(request: Request, req: InfillRequest):
        if req.text is not None:
            if req.prefix is not None or req.suffix is not None:
                raise ApiError(400, "give either text with hole markers or prefix/suffix, not both", "text")
            parts = req.text.split(req.hole_marker)
            if len(parts) < 2:
                raise ApiError(400, f"text holds no hole marker {req.hole_marker!r}", "text")
        elif req.prefix is not None or req.suffix is not None:
            parts = [req.prefix or "", req.suffix or ""]
        else:
            raise ApiError(400, "give prefix and/or suffix, or text with hole markers", "prefix")
        holes = req.fill_length
        if isinstance(holes, int):
            holes = [holes] * (len(parts) - 1)
        if holes is not None and len(holes) != len(parts) - 1:
            raise ApiError(400, f"fill_length lists {len(holes)} lengths for {len(parts) - 1} holes", "fill_length")
        return await fill(request, req, prompt_ids(parts[0]), parts[0], parts[1:], holes, "infill")

    @app.post("/v1/edit", summary="Regenerate a selected span of text in its context")
    async def edit(request: Request, req: EditRequest):
        start, end = req.selection.start, req.selection.end
        if not start <= end <= len(req.text):
            raise ApiError(400, f"selection must satisfy 0 <= start <= end <= {len(req.text)} (the text's length "
                                "in characters)", "selection")
        before, span, after = req.text[:start], req.text[start:end], req.text[end:]
        length = req.fill_length if req.fill_length is not None else max(1, len(tok.encode(span)))
        if req.instruction:
            if tok.chat_template is None:
                raise ApiError(400, "an instruction needs a chat template; this model has none", "instruction")
            turn = [{"role": "user", "content": f"{req.instruction}\n\n{req.text}"}]
            prompt = tok.encode_chat(turn) + tok.encode(before)
        else:
            prompt = prompt_ids(before)
        return await fill(request, req, prompt, before, [after], [length], "edit")

    # ---- metadata ----------------------------------------------------------------------------------------------
    def model_card() -> dict:
        s = model.settings
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "dgemma",
                "canvas_length": cfg.canvas_length, "context_length": cfg.max_position_embeddings,
                "max_tokens": config.max_tokens,
                "defaults": {"max_tokens": s.max_new_tokens, "max_denoising_steps": s.max_denoising_steps,
                             "entropy_bound": s.entropy_bound, "t_min": s.t_min, "t_max": s.t_max},
                "chat_template": tok.chat_template is not None}

    @app.get("/v1/models", summary="The served model")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", summary="One model")
    async def one_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.get("/health", summary="Liveness and queue state")
    async def health():
        s = scheduler()
        return {"status": "ok", "model": config.model_name, "waiting": s.waiting, "running_rows": s.running_rows,
                "batches": s.batches, "requests": s.requests, "max_queue": config.max_queue,
                "prefix_hits": s.prefix.hits, "prefix_reused_tokens": s.prefix.reused_tokens}

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _event_stream(frames) -> StreamingResponse:
    """An SSE response of `frames`, unbuffered, with errors raised mid-stream sent as error frames."""
    return StreamingResponse(_guarded(frames), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _guarded(frames):
    """Pass SSE frames through; an error after the stream began becomes an OpenAI error frame."""
    try:
        async for frame in frames:
            yield frame
    except ApiError as err:
        yield f"data: {json.dumps(_error_body(err.message, err.kind, err.param, err.code))}\n\n"


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device=None, dtype=None, tokenizer=None, **limits) -> int:
    """Load the checkpoint and serve it with uvicorn until interrupted."""
    import uvicorn

    from ..api import load

    model = load(model_path, device=device, dtype=dtype, tokenizer=tokenizer)
    name = Path(model_path).name if Path(model_path).is_dir() else str(model_path)  # a directory's name or a Hub id
    app = create_app(model, ServeConfig(model_name=name, api_key=api_key, **limits))
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0
