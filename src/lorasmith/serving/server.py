"""`lorasmith serve`: an OpenAI-compatible HTTP API (FastAPI) over the serving engine.
FastAPI is an optional extra (`lorasmith[serve]`): only `lorasmith serve` imports this module.

``GET /v1/models``, ``POST /v1/chat/completions`` (plain, or streamed as server-sent events: a role
delta, content deltas, a last chunk with ``finish_reason``, then ``data: [DONE]``). Requests may carry
``tools`` and ``tool_choice``, ``tool`` messages and assistant ``tool_calls``, ``content`` as a list of
text parts, and the ``developer`` role (serving/tool_use.py); calls the model writes come back as
``tool_calls`` with ``finish_reason: "tool_calls"``, streamed as OpenAI streams tool-call deltas.
``response_format`` (json_object, json_schema) is honoured by constrained decoding (serving/constrained.py),
``logprobs``/``top_logprobs`` give the model's log-probs of each answer token. ``GET /metrics``: queue
depth, running rows, totals and a latency histogram, in Prometheus text. Errors use
OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) with 400 (bad request),
401 (API key), 404 (unknown model or path), 413 (body too large) and 503 (queue full); a failure
inside generation is a 500 with a message, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorasmith.evaluation.generate import Sampling
from lorasmith.serving import tool_use
from lorasmith.serving.engine import Busy, Engine, Request


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None


HARMLESS = {"user", "store", "metadata", "parallel_tool_calls", "stream_options", "service_tier"}
"""Fields OpenAI clients send that change nothing about the answer: accepted and not used."""
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}
"""Fields accepted at the value that asks for nothing; any other value is refused (400), not ignored."""


class CompletionRequest(BaseModel):
    """``/v1/completions``: a plain prompt continued as it is (no chat template)."""

    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str | list[str]
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(16, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    """Log-probs of each token and this many alternatives (the legacy completions shape)."""


COMPLETION_NEUTRAL = {**NEUTRAL, "echo": False, "suffix": None, "best_of": 1}
"""/v1/completions' own fields at the value that asks for nothing."""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by unsupported(): refused by name, never silently ignored
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    """``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``: constrained decoding."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BodyLimit:
    """An ASGI middleware that holds the body limit while the body is read, with or without
    Content-Length (a chunked body has none): past the limit the request is answered 413 and whatever
    the app would have answered is dropped."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope.get("headers") or ()).get(b"content-length", b"")
        state = {"read": 0, "over": size.isdigit() and int(size) > self.max_bytes, "answered": False}

        async def limited_receive():
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.max_bytes:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not state["over"]:
                return await send(message)
            if not state["answered"]:
                state["answered"] = True
                await JSONResponse(error_body(f"request body over {self.max_bytes} bytes", "invalid_request_error"), 413)(
                    scope, receive, send
                )

        if state["over"]:
            await guarded_send({"type": "http.response.start"})
            return
        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["answered"]:
            await guarded_send({"type": "http.response.start"})


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_tokens_limit: int = 1024,
    max_body_bytes: int = 1 << 20,
    max_prompt_tokens: int | None = None,
    request_timeout: float | None = None,
):
    """The app. ``max_prompt_tokens``: a cap below the model's context; ``request_timeout``: seconds after
    which a request is ended (504) and its generation stopped."""
    app = FastAPI(title="lorasmith", docs_url=None, redoc_url=None)
    expected = f"Bearer {api_key}".encode() if api_key is not None else None

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        given = request.headers.get("authorization", "").encode()
        if expected is not None and not hmac.compare_digest(given, expected):  # constant time
            return JSONResponse(error_body("invalid or missing API key (Authorization: Bearer ...)", "authentication_error"), 401)
        return await call_next(request)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.param), e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        if first.get("type") == "json_invalid":
            where, message = None, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        return JSONResponse(error_body(message, "invalid_request_error", where), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), e.status_code)

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        return JSONResponse(error_body(f"generation failed: {type(e).__name__}", "server_error"), 500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queue.qsize()}

    @app.get("/metrics")
    async def metrics():
        """Prometheus text format: queue depth and totals since start."""
        c = engine.counters
        lines = [
            "# TYPE lorasmith_queue_depth gauge",
            f"lorasmith_queue_depth {engine.queue.qsize()}",
            "# TYPE lorasmith_running_requests gauge",
            f"lorasmith_running_requests {engine.running}",
            "# TYPE lorasmith_requests_total counter",
            f'lorasmith_requests_total{{outcome="ok"}} {c["requests"]}',
            f'lorasmith_requests_total{{outcome="failed"}} {c["failed"]}',
            "# TYPE lorasmith_tokens_total counter",
            f'lorasmith_tokens_total{{kind="prompt"}} {c["prompt_tokens"]}',
            f'lorasmith_tokens_total{{kind="completion"}} {c["completion_tokens"]}',
            "# TYPE lorasmith_generation_seconds_total counter",
            f"lorasmith_generation_seconds_total {c['generation_seconds']:.3f}",
            "# HELP lorasmith_request_seconds from queueing to the whole answer",
            "# TYPE lorasmith_request_seconds histogram",
            *(f'lorasmith_request_seconds_bucket{{le="{_le(b)}"}} {n}' for b, n in engine.latency.items()),
            f"lorasmith_request_seconds_sum {engine.latency_sum:.3f}",
            f"lorasmith_request_seconds_count {c['requests']}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "lorasmith"} for name in engine.served]
        return {"object": "list", "data": data}

    async def run(req: Request, prefix: str, http: HttpRequest):
        """Queue ``req``: its id and creation time, and a streamed response or the finished completion."""
        _submit(engine, req)
        rid, created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            events = _events(req, rid, created, http, engine.tokenizer, request_timeout)
            return rid, created, StreamingResponse(events, media_type="text/event-stream")
        return rid, created, await _wait(req, request_timeout)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        req = _to_request(body, engine, max_tokens_limit, max_prompt_tokens)
        rid, created, done = await run(req, "chatcmpl", http)
        if req.stream:
            return done
        message, finish = tool_use.answer(done, req)
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": _chat_logprobs(engine.tokenizer, done)}
        head = {"id": rid, "object": "chat.completion", "created": created, "model": body.model}
        return head | {"choices": [choice], "usage": _usage(done)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        req = _text_request(body, engine, max_tokens_limit, max_prompt_tokens)
        rid, created, done = await run(req, "cmpl", http)
        if req.stream:
            return done
        logprobs = _text_logprobs(engine.tokenizer, done)
        choice = {"index": 0, "text": done.text, "logprobs": logprobs, "finish_reason": done.finish_reason}
        head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        return head | {"choices": [choice], "usage": _usage(done)}

    return app


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"


def _submit(engine: Engine, req: Request) -> None:
    try:
        engine.submit(req)
    except Busy as e:
        raise ApiError(503, f"server busy: {e}; retry later", kind="server_error") from None


async def _wait(req: Request, timeout: float | None):
    """The completion of a queued request, or a 504 after ``timeout`` (its slot freed)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(req.result), timeout)
    except asyncio.TimeoutError:
        req.cancelled.set()
        raise ApiError(504, f"the request took longer than the server's limit of {timeout:g} s", kind="timeout") from None
    except asyncio.CancelledError:
        req.cancelled.set()
        raise


def unsupported(body: BaseModel, neutral: dict = NEUTRAL) -> str | None:
    """The first field of the request this server would otherwise have to ignore."""
    for name, value in (body.model_extra or {}).items():
        if name in HARMLESS or (name in neutral and value in (neutral[name], None)):
            continue
        return name
    return None


def _common(body, engine: Engine, max_tokens_limit: int, neutral: dict) -> tuple[int, tuple[str, ...]]:
    """The checks both endpoints make: unsupported fields, the model, n, max_tokens, stop."""
    if field_ := unsupported(body, neutral):
        raise ApiError(400, f"{field_}: not supported by this server (leave it out)", param=field_)
    if body.model not in engine.served:
        names = sorted(engine.served)
        raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists {names}", param="model")
    if body.n != 1:
        raise ApiError(400, "n must be 1", param="n")
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens or min(256, max_tokens_limit)
    if limit > max_tokens_limit:
        raise ApiError(400, f"max_tokens {limit} is over this server's limit of {max_tokens_limit}", param="max_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
    return limit, stop


def _check_context(engine: Engine, n_prompt: int | None, limit: int, max_prompt_tokens: int | None, param: str) -> None:
    """Before queueing: a prompt over the context would hold the one worker for minutes."""
    if n_prompt is None:
        return
    if max_prompt_tokens and n_prompt > max_prompt_tokens:
        over = f"{param}: the prompt is {n_prompt} tokens, over this server's --max-prompt-tokens {max_prompt_tokens}"
        raise ApiError(400, over, param=param)
    if engine.context and n_prompt + limit > engine.context:
        raise ApiError(
            400,
            f"{param}: the prompt is {n_prompt} tokens and max_tokens {limit}: {n_prompt + limit} in all, "
            f"over the model's context of {engine.context} tokens; shorten the prompt or lower max_tokens",
            param=param,
        )


def _text_request(body: CompletionRequest, engine: Engine, max_tokens_limit: int, max_prompt_tokens: int | None) -> Request:
    limit, stop = _common(body, engine, max_tokens_limit, COMPLETION_NEUTRAL)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1 or not prompts[0]:
        raise ApiError(400, "prompt: one non-empty string (a list of several is not supported)", param="prompt")
    _check_context(engine, engine.prompt_tokens([], None, text=prompts[0]), limit, max_prompt_tokens, "prompt")
    sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    return Request(
        body.model, [], limit, sampling=sampling, stop=stop, stream=body.stream, text=prompts[0], logprobs=body.logprobs
    )


def _to_request(body: ChatRequest, engine: Engine, max_tokens_limit: int, max_prompt_tokens: int | None = None) -> Request:
    limit, stop = _common(body, engine, max_tokens_limit, NEUTRAL)
    served = engine.served[body.model]
    try:
        messages = tool_use.canonical_messages([m.model_dump(exclude_none=True) for m in body.messages])
        declared = tool_use.declared_tools(body.tools)
        tools, forced = tool_use.chosen_tools(declared, body.tool_choice)
        tool_use.check(messages, declared)
    except tool_use.BadRequest as e:
        raise ApiError(400, str(e), param=e.param) from None
    if not any(m["role"] == "user" for m in messages):
        raise ApiError(400, "messages: at least one user message is needed", param="messages")
    if served.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": served.system_prompt})  # what the adapter was trained with
    if tools and engine.template is not None and engine.template.tool_support:
        raise ApiError(
            400, f"tools: this model's chat template cannot render tools ({engine.template.tool_support})", param="tools"
        )
    sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    prefill = tool_use.forced_prefix(engine.syntax, forced) if forced else ""
    _check_context(engine, engine.prompt_tokens(messages, tools, prefill), limit, max_prompt_tokens, "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    return Request(
        model=body.model,
        messages=messages,
        max_tokens=limit,
        sampling=sampling,
        stop=stop,
        stream=body.stream,
        tools=tools,
        prefill=prefill,
        syntax=engine.syntax,
        grammar=_grammar(engine, body.response_format, tools),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )


def _grammar(engine: Engine, response_format: dict | None, tools):
    """The JSON grammar ``response_format`` asks for, compiled before queueing (a bad schema is a 400)."""
    from lorasmith.serving.constrained import BadFormat, schema_of

    try:
        if schema_of(response_format) is None:
            return None
        if tools:
            raise BadFormat("response_format with tools: the answer could not be a tool call; send one or the other")
        return engine.grammars().matcher(response_format)
    except BadFormat as e:
        raise ApiError(400, str(e), param=e.param) from None


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _chat_logprobs(tokenizer, done) -> dict | None:
    """OpenAI's chat ``logprobs``: each answer token, its log-prob and bytes, and the top alternatives."""
    if done.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = _token(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [entry(t["id"], t["logprob"]) | {"top_logprobs": [entry(i, lp) for i, lp in t["top"]]} for t in done.logprobs]
    return {"content": content, "refusal": None}


def _text_logprobs(tokenizer, done) -> dict | None:
    """The completions endpoint's ``logprobs``: tokens, their log-probs, top alternatives, text offsets."""
    if done.logprobs is None:
        return None
    tokens = [_token(tokenizer, t["id"]) for t in done.logprobs]
    offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    return {
        "tokens": tokens,
        "token_logprobs": [t["logprob"] for t in done.logprobs],
        "top_logprobs": [{_token(tokenizer, i): lp for i, lp in t["top"]} for t in done.logprobs],
        "text_offset": offsets,
    }


def _usage(c) -> dict:
    total = c.prompt_tokens + c.completion_tokens
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "total_tokens": total}


async def _events(req: Request, rid: str, created: int, http, tokenizer, timeout: float | None = None):
    """Server-sent events: the role, the text as it is generated (holding back what may start a stop
    string), the last chunk with finish_reason, then [DONE]. A client that disconnects cancels generation."""
    import queue

    plain = req.text is not None  # /v1/completions: text chunks, no role, no tool calls

    def chunk(delta: dict, finish: str | None = None, logprobs=None, **extra) -> str:
        if plain:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": logprobs, "finish_reason": finish}
            body = {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": [choice]}
        else:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model, "choices": [choice]}
        return f"data: {json.dumps(body | extra)}\n\n"

    markers = (*req.stop, *tool_use.markers(req))
    hold = max((len(s) for s in markers), default=1) - 1
    buffered = tool_use.buffers_stream(req)  # a syntax whose calls cannot be told from text as it streams
    text, sent = req.prefill, 0
    deadline = time.monotonic() + timeout if timeout else None
    try:
        if not plain:
            yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                piece = req.chunks.get_nowait()
            except queue.Empty:
                if await http.is_disconnected():
                    req.cancelled.set()
                    return
                if deadline is not None and time.monotonic() > deadline:
                    req.cancelled.set()
                    yield f"data: {json.dumps(error_body(f'the request took longer than {timeout:g} s', 'timeout'))}\n\n"
                    return
                await asyncio.sleep(0.01)
                continue
            if piece is None:
                break
            text += piece
            if buffered:
                continue
            cut = min((text.find(s) for s in markers if s in text), default=-1)
            safe = cut if cut >= 0 else len(text) - hold
            if safe > sent:
                yield chunk({"content": text[sent:safe]})
                sent = safe
        try:
            done = await asyncio.wrap_future(req.result)
        except Exception as e:
            yield f"data: {json.dumps(error_body(f'generation failed: {type(e).__name__}', 'server_error'))}\n\n"
            return
        message, finish = ({"content": done.text}, done.finish_reason) if plain else tool_use.answer(done, req)
        content = message.get("content") or ""
        if len(content) > sent or done.logprobs is not None:  # the log-probs of the whole answer ride on the last piece
            logprobs = _text_logprobs(tokenizer, done) if plain else _chat_logprobs(tokenizer, done)
            yield chunk({"content": content[sent:]}, logprobs=logprobs)
        for k, call in enumerate(message.get("tool_calls") or ()):
            head = {
                "index": k,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            yield chunk({"tool_calls": [head]})
            yield chunk({"tool_calls": [{"index": k, "function": {"arguments": call["function"]["arguments"]}}]})
        if message.get("reasoning_content"):
            yield chunk({"reasoning_content": message["reasoning_content"]})
        yield chunk({}, finish, usage=_usage(done))
        yield "data: [DONE]\n\n"
    finally:
        req.cancelled.set()  # a no-op once finished; frees the worker if the client went away
