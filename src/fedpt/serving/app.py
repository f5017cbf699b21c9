"""The HTTP face of ``fedpt serve``: OpenAI-compatible endpoints and FedPT's binary logits service.

OpenAI-compatible, as vLLM and llama.cpp's server offer them:

    GET  /v1/models
    POST /v1/completions        prompt (text, token ids, or a list of either), max_tokens, temperature,
                                top_p, seed, stop, logprobs (top-k), echo, stream; vLLM's extensions
                                top_k and return_tokens_as_token_ids; FedPT's alpha (served runs)
    POST /v1/chat/completions   messages (chat template), logprobs / top_logprobs, stream, ...

Logits service for FedPT's own server (see ``fedpt.models.remote`` for the wire format):
``/v1/logits/info``, ``/v1/logits/sessions``, ``/v1/logits/sessions/{id}/step``, ``/v1/logits/score``.

Errors are JSON ``{"error": {"message", "type", "code"}}``: 401 without the right API key, 413
over a limit, 422 for invalid input (token ids outside the vocabulary included), 404 for an
unknown model or session, 429 when all logits sessions are in use. No pickle anywhere.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from fedpt.models.remote import SESSION_HEADER, WIRE_DTYPES, tensor_to_bytes
from fedpt.proxy import Decoding
from fedpt.serving.engine import Engine, Event, GenerationRequest, RowDelta, TokenLogprob
from fedpt.serving.models import ServedModel


@dataclass
class ServeLimits:
    """What one request may ask for; over a limit -> 413."""

    max_body_bytes: int = 8 * 2**20
    max_batch: int = 16  # prompts per request, rows per logits session
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 2048
    max_logprobs: int = 100  # top-k per token (vLLM's default cap is 20; FedPT's top-k backend asks more)
    max_sessions: int = 16  # open logits sessions (each holds a KV cache)
    session_idle_seconds: float = 300.0  # a session unused this long is closed


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


# -- request bodies (unknown OpenAI fields are accepted and ignored, as vLLM does) ---------------

class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # vLLM extension; 0 = off
    n: int = Field(1, ge=1, le=1)  # one choice per prompt
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    alpha: float | None = Field(None, ge=0.0, le=100.0)  # FedPT: proxy strength of a served run
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)  # not implemented: only the neutral value
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM extension: tokens as "token_id:<id>"


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class SessionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_ids: list[list[int]] = Field(min_length=1)
    attention_mask: list[list[int]] | None = None
    dtype: str | None = None


class StepBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[int] = Field(min_length=1)
    step: int = Field(ge=0)
    dtype: str | None = None


class ScoreBody(SessionBody):
    keep_last: int = Field(0, ge=0)


# -- the application -----------------------------------------------------------------------------

class _Session:
    def __init__(self, source: Any, rows: int, dtype: str) -> None:
        self.source, self.rows, self.dtype = source, rows, dtype
        self.steps = 0  # steps applied so far
        self.last: tuple[bytes, dict[str, str]] | None = None  # answer of the last step (for a retry)
        self.used = time.monotonic()


def create_app(served: ServedModel, limits: ServeLimits | None = None, api_key: str | None = None,
               gang: int = 1) -> FastAPI:
    """The ASGI app; ``uvicorn.run(create_app(...))`` serves it."""
    limits = limits or ServeLimits()
    engine = Engine(served, gang=gang)
    sessions: dict[str, _Session] = {}
    sessions_lock = threading.Lock()
    app = FastAPI(title="fedpt serve", docs_url=None, redoc_url=None, openapi_url=None)

    # -- guards: API key, body size, uniform errors -------------------------------------------

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              "authentication_error")
        if request.method in ("POST", "PUT"):
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "send a Content-Length header")
            if not length.isdigit() or int(length) > limits.max_body_bytes:
                return _error(413, f"request body over the limit of {limits.max_body_bytes} bytes")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError):
        return _error(err.status, err.message, err.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"invalid request: {where}: {first.get('msg', 'invalid value')}"
                      + (f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception):
        return _error(500, f"internal error: {type(err).__name__}", "server_error")

    # -- checks shared by the endpoints ---------------------------------------------------------

    def check_model(name: str | None) -> None:
        if name is not None and name != served.name:
            raise APIError(404, f"model '{name}' is not served here; this server serves '{served.name}' "
                                "(GET /v1/models)", "not_found_error")

    def check_ids(rows: list[list[int]], what: str = "prompt") -> None:
        if not rows or any(not row for row in rows):
            raise APIError(422, f"{what} is empty")
        if len(rows) > limits.max_batch:
            raise APIError(413, f"{len(rows)} {what}s in one request; the limit is {limits.max_batch}")
        longest = max(len(row) for row in rows)
        if longest > limits.max_prompt_tokens:
            raise APIError(413, f"{what} of {longest} tokens; the limit is {limits.max_prompt_tokens}")
        bad = next((t for row in rows for t in row if not 0 <= t < served.token_limit), None)
        if bad is not None:
            raise APIError(422, f"token id {bad} is outside the vocabulary [0, {served.token_limit})")

    def decoding(body: _Sampling, max_tokens: int) -> Decoding:
        if max_tokens > limits.max_new_tokens:
            raise APIError(413, f"max_tokens={max_tokens} is over the limit of {limits.max_new_tokens}")
        if body.alpha is not None and not served.is_run:
            raise APIError(422, "alpha applies to a served run's proxy-tuned LM (fedpt serve --run); "
                                "this server serves a plain model")
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        return Decoding(max_new_tokens=max_tokens, do_sample=body.temperature > 0,
                        temperature=body.temperature or 1.0, top_p=body.top_p, top_k=body.top_k, seed=seed)

    def stops(stop: str | list[str] | None) -> list[str]:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stop) or len(stop) > 16:
            raise APIError(422, "stop takes up to 16 non-empty strings")
        return stop

    def check_k(k: int | None) -> None:
        if k is not None and k > limits.max_logprobs:
            raise APIError(413, f"logprobs={k} is over the limit of {limits.max_logprobs}")

    def token_text(token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else served.tokenizer.decode([token])

    # -- OpenAI-compatible endpoints --------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "fedpt"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_model(body.model)
        prompts = _prompt_ids(body.prompt, served.tokenizer)
        check_ids(prompts)
        check_k(body.logprobs)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(422, "max_tokens=0 only makes sense with echo=true (scoring the prompt)")
        job = GenerationRequest(prompts, decoding(body, max_tokens), deliver=lambda e: None,
                                logprobs=body.logprobs, echo_logprobs=body.echo and body.logprobs is not None,
                                stop=stops(body.stop), alpha=body.alpha)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served.name}
        as_ids = body.return_tokens_as_token_ids

        def logprobs_block(tokens: list[TokenLogprob], offset: int) -> dict | None:
            if body.logprobs is None:
                return None
            texts = [token_text(t.token_id, as_ids) for t in tokens]
            offsets, at = [], offset
            for text in texts:
                offsets.append(at)
                at += len(text)
            return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                    "top_logprobs": [_top_dict(t, body.logprobs, lambda i: token_text(i, as_ids)) if t.logprob
                                     is not None else None for t in tokens],
                    "text_offset": offsets}

        prompt_texts = [served.tokenizer.decode(ids) for ids in prompts]
        if body.stream:
            async def chunks():
                offsets = [0] * len(prompts)
                async for event in _events(engine, job, request):
                    for i, delta in enumerate(event.rows):
                        text = prompt_texts[i] if event.kind == "prompt" else delta.text
                        if event.kind == "done" or (not text and not delta.tokens and not delta.finish_reason):
                            continue
                        choice = {"index": i, "text": text, "logprobs": logprobs_block(delta.tokens, offsets[i]),
                                  "finish_reason": delta.finish_reason}
                        offsets[i] += len(text)
                        yield _sse(meta | {"choices": [choice]})
                    if event.kind == "error":
                        yield _sse({"error": {"message": event.message, "type": "server_error", "code": 500}})
                yield "data: [DONE]\n\n"

            if body.echo and not job.echo_logprobs:  # echo without logprobs: the prompt text comes first
                return StreamingResponse(_prefixed(meta, prompt_texts, chunks()), media_type="text/event-stream")
            return StreamingResponse(chunks(), media_type="text/event-stream")

        rows, prompt_rows = await _collect(engine, job, len(prompts))
        choices, usage = [], 0
        for i, row in enumerate(rows):
            tokens = (prompt_rows[i].tokens if prompt_rows else []) + row.tokens
            text = (prompt_texts[i] if body.echo else "") + row.text
            choices.append({"index": i, "text": text, "logprobs": logprobs_block(tokens, 0),
                            "finish_reason": row.finish_reason})
            usage += row.generated
        n_prompt = sum(len(p) for p in prompts)
        return meta | {"choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens": usage,
                                                     "total_tokens": n_prompt + usage}}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        try:
            ids = served.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template that rejects these messages
            raise APIError(422, f"the chat template rejects these messages: {str(err).splitlines()[0][:200]}")
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        check_ids([ids])
        k = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(422, "top_logprobs needs logprobs=true")
        check_k(k)
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.max_new_tokens
        job = GenerationRequest([ids], decoding(body, max_tokens), deliver=lambda e: None, logprobs=k,
                                stop=stops(body.stop), alpha=body.alpha)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}

        def content(tokens: list[TokenLogprob]) -> list[dict]:
            def entry(token: int, logprob: float) -> dict:
                text = served.tokenizer.decode([token])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return [entry(t.token_id, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top[:k]]}
                    for t in tokens]

        if body.stream:
            async def chunks():
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
                yield _sse(meta | {"object": "chat.completion.chunk", "choices": [first]})
                async for event in _events(engine, job, request):
                    if event.kind == "error":
                        yield _sse({"error": {"message": event.message, "type": "server_error", "code": 500}})
                    if event.kind != "step":
                        continue
                    delta = event.rows[0]
                    if not delta.text and not delta.tokens and not delta.finish_reason:
                        continue
                    choice = {"index": 0, "delta": {"content": delta.text} if delta.text else {},
                              "logprobs": {"content": content(delta.tokens)} if k is not None else None,
                              "finish_reason": delta.finish_reason}
                    yield _sse(meta | {"object": "chat.completion.chunk", "choices": [choice]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")

        rows, _ = await _collect(engine, job, 1)
        row = rows[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": row.text},
                  "logprobs": {"content": content(row.tokens)} if k is not None else None,
                  "finish_reason": row.finish_reason}
        return meta | {"object": "chat.completion", "choices": [choice],
                       "usage": {"prompt_tokens": len(ids), "completion_tokens": row.generated,
                                 "total_tokens": len(ids) + row.generated}}

    # -- logits service (FedPT's remote backend) ------------------------------------------------

    def wire_dtype(requested: str | None) -> str:
        dtype = requested or (served.dtype if not served.is_run else "float32")
        if dtype not in WIRE_DTYPES:
            raise APIError(422, f"dtype {dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
        return dtype

    def batch(body: SessionBody) -> tuple[torch.Tensor, torch.Tensor]:
        check_ids(body.input_ids, "sequence")
        width = len(body.input_ids[0])
        mask = body.attention_mask or [[1] * width for _ in body.input_ids]
        if any(len(row) != width for row in body.input_ids) or len(mask) != len(body.input_ids) \
                or any(len(row) != width for row in mask) or any(v not in (0, 1) for row in mask for v in row):
            raise APIError(422, "input_ids and attention_mask must be (B, T) of equal shape, mask values 0/1")
        return torch.tensor(body.input_ids), torch.tensor(mask)

    def binary(payload: tuple[bytes, dict[str, str]], extra: dict[str, str] | None = None) -> Response:
        raw, headers = payload
        return Response(raw, media_type="application/octet-stream", headers=headers | (extra or {}))

    def expire_sessions() -> None:
        now = time.monotonic()
        with sessions_lock:
            for sid in [s for s, v in sessions.items() if now - v.used > limits.session_idle_seconds]:
                sessions.pop(sid).source.close()

    @app.get("/v1/logits/info")
    def info():
        return {"model": served.name, "vocab_size": served.vocab_size, "tokenizer_size": served.token_limit,
                "vocab_sha256": served.vocab_hash, "dtype": served.dtype, "proxy_tuned": served.is_run,
                "limits": limits.__dict__}

    @app.post("/v1/logits/sessions")
    def open_session(body: SessionBody):
        input_ids, mask = batch(body)
        dtype = wire_dtype(body.dtype)
        expire_sessions()
        with sessions_lock:
            if len(sessions) >= limits.max_sessions:
                raise APIError(429, f"all {limits.max_sessions} logits sessions are open; close one "
                                    f"(DELETE /v1/logits/sessions/<id>) or wait {limits.session_idle_seconds:.0f} s "
                                    "for idle ones to expire", "rate_limit_error")
            sid = uuid.uuid4().hex
            session = sessions[sid] = _Session(served.source(), len(input_ids), dtype)
        with served.lock:
            logits = session.source.prefill(input_ids, mask)
        return binary(tensor_to_bytes(logits, dtype), {SESSION_HEADER: sid})

    @app.post("/v1/logits/sessions/{sid}/step")
    def step(sid: str, body: StepBody):
        session = sessions.get(sid)
        if session is None:
            raise APIError(404, f"no logits session '{sid}' (closed, or expired after "
                                f"{limits.session_idle_seconds:.0f} s idle)", "not_found_error")
        check_ids([body.tokens], "token row")
        if len(body.tokens) != session.rows:
            raise APIError(422, f"step has {len(body.tokens)} tokens; the session has {session.rows} rows")
        session.used = time.monotonic()
        if body.step == session.steps - 1 and session.last is not None:  # a retry of the last step
            return binary(session.last)
        if body.step != session.steps:
            raise APIError(422, f"step {body.step} out of order: the session expects step {session.steps}")
        with served.lock:
            logits = session.source.step(torch.tensor(body.tokens))
        session.last = tensor_to_bytes(logits, wire_dtype(body.dtype) if body.dtype else session.dtype)
        session.steps += 1
        return binary(session.last)

    @app.delete("/v1/logits/sessions/{sid}")
    def close_session(sid: str):
        with sessions_lock:
            session = sessions.pop(sid, None)
        if session is None:
            raise APIError(404, f"no logits session '{sid}'", "not_found_error")
        session.source.close()
        return {"closed": sid}

    @app.post("/v1/logits/score")
    def score(body: ScoreBody):
        input_ids, mask = batch(body)
        if body.keep_last > input_ids.shape[1]:
            raise APIError(422, f"keep_last={body.keep_last} exceeds the sequence length {input_ids.shape[1]}")
        dtype = wire_dtype(body.dtype)
        with served.lock:
            source = served.source()
            logits = source.score(input_ids, mask, body.keep_last)
            getattr(source, "close", lambda: None)()
        return binary(tensor_to_bytes(logits, dtype))

    return app


# -- helpers -------------------------------------------------------------------------------------

def _prompt_ids(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """OpenAI's prompt forms: text, token ids, or a list of either."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]


def _top_dict(token: TokenLogprob, k: int, text: Any) -> dict[str, float]:
    """vLLM's top_logprobs entry: the top-k plus the chosen token (so up to k+1 entries)."""
    top = {text(i): lp for i, lp in token.top[:k]}
    top.setdefault(text(token.token_id), token.logprob)
    return top


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _prefixed(meta: dict, texts: list[str], rest):
    for i, text in enumerate(texts):
        yield _sse(meta | {"choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]})
    async for chunk in rest:
        yield chunk


async def _events(engine: Engine, job: GenerationRequest, request: Request):
    """The job's events as they come; the job is cancelled if the client goes away."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job.deliver = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    engine.submit(job)
    try:
        while True:
            event = await events.get()
            yield event
            if event.kind in ("done", "error"):
                return
    finally:
        job.cancelled = True  # a no-op when finished; stops decoding for a client that left


@dataclass
class _Collected:
    text: str = ""
    tokens: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    generated: int = 0


async def _collect(engine: Engine, job: GenerationRequest, n: int) -> tuple[list[_Collected], list[RowDelta]]:
    """A whole answer: per row the text, token log-probabilities and finish reason; plus echo rows."""
    rows = [_Collected(tokens=[]) for _ in range(n)]
    prompt: list[RowDelta] = []
    async for event in _events(engine, job, None):
        if event.kind == "error":
            raise APIError(500, f"generation failed: {event.message}", "server_error")
        if event.kind == "prompt":
            prompt = event.rows
        for row, delta in zip(rows, event.rows if event.kind in ("step", "done") else []):
            row.text += delta.text
            row.tokens += delta.tokens
            if event.kind == "step" and row.finish_reason is None:
                row.generated += 1
            row.finish_reason = delta.finish_reason or row.finish_reason
    return rows, prompt
