"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /health."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from anemll_fast.server.pool import Job, ModelPool, Prepared, QueueFull, UnknownModel, Worker
from anemll_fast.server.schema import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("anemll_fast.server")


@dataclass
class ServerOptions:
    max_queue: int = 16
    timeout: float = 600.0  # seconds per request, queueing included
    api_key: Optional[str] = None
    cors: Optional[List[str]] = None  # allowed origins; None: CORS off
    max_body: int = 8 * 1024 * 1024  # bytes


class ApiError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _param_of(message: str, default: str) -> str:
    """The parameter a façade error names ("top_p: must be ..." -> "top_p")."""
    head = message.split(":", 1)[0].strip()
    return head.split("[", 1)[0].split(".", 1)[0] if head and " " not in head else default


def bad_request(exc: Exception, param: str) -> ApiError:
    message = str(exc)
    return ApiError(400, message, param=_param_of(message, param))


# ------------------------------------------------------------ request -> engine
def _settings(req: Any, model: Any, n_prompt: int, max_tokens: Optional[int], logprobs: Optional[int]) -> Any:
    from anemll_fast.sampling import SamplingSettings

    ctx = model.context_length
    if max_tokens is not None and max_tokens > ctx:
        raise ApiError(400, f"max_tokens: {max_tokens} is over the context length {ctx}", param="max_tokens",
                       code="context_length_exceeded")
    if n_prompt > ctx:
        raise ApiError(400, f"the prompt has {n_prompt} tokens, over the context length {ctx}",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    vocab = model.config.shapes.vocab_size
    for tok in bias:
        if tok >= vocab:
            raise ApiError(400, f"logit_bias: token id {tok} is outside the vocabulary [0, {vocab})", param="logit_bias")
    kwargs: Dict[str, Any] = {
        "max_tokens": max_tokens if max_tokens is not None else max(1, ctx - n_prompt),
        "logprobs": logprobs, "logit_bias": bias,
        "seed": None if req.seed is None else req.seed & ((1 << 64) - 1),
        "stop": tuple([req.stop] if isinstance(req.stop, str) else (req.stop or ())),
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingSettings(**kwargs)
    except ValueError as exc:
        raise bad_request(exc, "temperature") from None


def _common_checks(req: Any) -> None:
    if req.n not in (None, 1):
        raise ApiError(400, f"n: only n=1 is supported, got {req.n}", param="n")


def prepare_chat(req: ChatCompletionRequest, model: Any) -> Prepared:
    from anemll_fast.chat_template import TemplateError
    from anemll_fast.grammar import Grammar, GrammarError
    from anemll_fast.tool_calls import detect_format, forced_call_grammar, tool_names

    _common_checks(req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    choice = req.tool_choice
    if choice is not None and not tools and choice != "none":
        raise ApiError(400, "tool_choice: set, but no tools are given", param="tool_choice")
    offered = tools if choice != "none" else []
    messages = [m.model_dump(exclude_none=True, by_alias=True) for m in req.messages]
    kwargs = dict(req.chat_template_kwargs or {})
    for reserved in ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token"):
        if reserved in kwargs:
            raise ApiError(400, f"chat_template_kwargs: {reserved!r} cannot be overridden", param="chat_template_kwargs")
    try:
        text = model.apply_chat_template(messages, tools=offered or None, **kwargs)
    except TypeError as exc:  # a keyword that names one of apply_chat_template's own parameters
        raise ApiError(400, f"chat_template_kwargs: {exc}", param="chat_template_kwargs") from None
    except TemplateError as exc:
        message = str(exc)
        param = "tools" if "tools[" in message or "tools must" in message else "messages"
        raise ApiError(400, message, param=param) from None
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ApiError(400, "messages: the conversation renders to no tokens", param="messages")
    fmt = detect_format(model.tokenizer.chat_template)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top = req.top_logprobs
    if top is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
    settings = _settings(req, model, len(ids), max_tokens, (top or 0) if req.logprobs else None)
    constraint = None
    try:
        if choice == "required" or not isinstance(choice, (str, type(None))):
            name = None if choice == "required" else choice.function.name  # type: ignore[union-attr]
            constraint = forced_call_grammar(model.tokenizer, fmt, offered, name)
        elif req.response_format is not None:
            constraint = Grammar.from_response_format(model.tokenizer, req.response_format.as_dict())
    except (GrammarError, ValueError) as exc:
        param = "tool_choice" if "tool_choice" in str(exc) else "response_format"
        raise ApiError(400, str(exc), param=param) from None
    return Prepared(ids, settings, constraint, req.cache_prompt, fmt if offered else None, tool_names(offered))


def prepare_completion(req: CompletionRequest, model: Any) -> Prepared:
    from anemll_fast.grammar import Grammar, GrammarError

    _common_checks(req)
    if req.echo:
        raise ApiError(400, "echo: not supported", param="echo")
    if req.suffix:
        raise ApiError(400, "suffix: not supported (no fill-in-the-middle)", param="suffix")
    if req.best_of not in (None, 1):
        raise ApiError(400, f"best_of: only 1 is supported, got {req.best_of}", param="best_of")
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    try:
        ids = model.encode(prompt)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from None
    settings = _settings(req, model, len(ids), req.max_tokens if req.max_tokens is not None else 16, req.logprobs)
    constraint = None
    if req.response_format is not None:
        try:
            constraint = Grammar.from_response_format(model.tokenizer, req.response_format.as_dict())
        except (GrammarError, ValueError) as exc:
            raise ApiError(400, str(exc), param="response_format") from None
    return Prepared(ids, settings, constraint, req.cache_prompt)


def generation_work(prepare: Callable[[Any], Prepared]) -> Callable[[Job, Any], None]:
    """What the worker thread runs for one request: prepare, then stream token events."""

    def work(job: Job, model: Any) -> None:
        from anemll_fast.generate import stream_tokens

        try:
            prepared = prepare(model)
        except ApiError as exc:
            job.emit("error", exc)
            return
        prepared.info["tokenizer"] = model.tokenizer
        if not prepared.cache_prompt:
            model.engine.reset()
        job.emit("start", prepared)
        stream = stream_tokens(model, prepared.ids, prepared.settings, constraint=prepared.constraint)
        produced = 0
        try:
            for response in stream:
                if job.cancelled.is_set() or job.expired:
                    reason = "cancelled" if job.cancelled.is_set() else "timeout"
                    log.info("%s %s after %d tokens", job.id, reason, produced)
                    job.emit(reason)
                    return
                produced += 1
                job.emit("token", response)
        except (ValueError, OverflowError) as exc:  # a grammar the model cannot follow, a bad setting found late
            job.emit("error", bad_request(exc, "response_format"))
        finally:
            stream.close()  # the engine stays usable: its cache is valid up to the last token fed

    return work


# ------------------------------------------------------------------ responses
def _finish(reason: Optional[str]) -> str:
    return "length" if reason == "context" else (reason or "length")


def _usage(last: Any) -> Dict[str, Any]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.generation_tokens,
            "total_tokens": last.prompt_tokens + last.generation_tokens,
            "prompt_tokens_details": {"cached_tokens": last.prompt_tokens - last.prefill_tokens}}


class _TokenText:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer

    def __call__(self, token: int) -> str:
        return self.tok.decode([token], skip_special_tokens=False)


def _chat_logprobs(r: Any, text_of: _TokenText) -> Optional[Dict[str, Any]]:
    if r.token is None or r.logprobs is None:
        return None
    chosen, top = r.logprobs

    def entry(tok: int, lp: float) -> Dict[str, Any]:
        s = text_of(tok)
        return {"token": s, "logprob": float(lp), "bytes": list(s.encode("utf-8"))}

    return {**entry(r.token, chosen), "top_logprobs": [entry(t, lp) for t, lp in top]}


class _CompletionLogprobs:
    def __init__(self, text_of: _TokenText) -> None:
        self.text_of = text_of

    def piece(self, r: Any, text_before: int) -> Optional[Dict[str, Any]]:
        if r.token is None or r.logprobs is None:
            return None
        chosen, top = r.logprobs
        return {"tokens": [self.text_of(r.token)], "token_logprobs": [float(chosen)],
                "top_logprobs": [{self.text_of(t): float(lp) for t, lp in top}], "text_offset": [text_before]}


def _merge_completion_logprobs(pieces: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if not pieces:
        return None
    out: Dict[str, List[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in pieces:
        for key in out:
            out[key].extend(p[key])
    return out


# ------------------------------------------------------------------- the app
@dataclass
class _Ctx:
    pool: ModelPool
    worker: Worker
    options: ServerOptions
    started: float = field(default_factory=time.time)


class _Guard:
    """ASGI middleware: API key (401) and request body size (413), before any parsing."""

    def __init__(self, app: Any, options: ServerOptions) -> None:
        self.app = app
        self.options = options

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.options.api_key
        if key and scope["path"] != "/health" and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                await _send_error(send, ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                                                 type="authentication_error", code="invalid_api_key",
                                                 headers={"WWW-Authenticate": "Bearer"}))
                return
        limit = self.options.max_body
        length = headers.get("content-length")
        too_large = ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(send, too_large)
            return
        received = 0
        started = rejected = False

        async def limited_receive() -> Dict[str, Any]:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not rejected:
                    # Answer now and tell the app the client left: FastAPI would turn an
                    # exception raised here into a 400 about the body.
                    rejected = True
                    if not started:
                        await _send_error(send, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Dict[str, Any]) -> None:
            nonlocal started
            if rejected:
                return  # the 413 is already the answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def _send_error(send: Any, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(pool: ModelPool, worker: Worker, options: ServerOptions) -> FastAPI:
    from anemll_fast import __version__

    app = FastAPI(title="anemll_fast", version=__version__,
                  description="OpenAI-compatible API over ANEMLL models (anemll_fast)")
    ctx = _Ctx(pool, worker, options)
    app.state.ctx = ctx

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            err = ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg', ''))}")
        elif first.get("type") == "missing" and not loc:
            err = ApiError(400, "a JSON object request body is required")
        else:
            # OpenAI's `param` is the top-level field; the message gives the whole path.
            where = ".".join(loc) or "body"
            err = ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", param=loc[0] if loc else None)
        log.info("%s %s -> 400 %s", request.method, request.url.path, err.message)
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @app.get("/health")
    async def health() -> Dict[str, Any]:
        return {"status": "ok", "models": pool.ids, "resident": pool.resident(), "queue": worker.pending}

    def model_card(model_id: str) -> Dict[str, Any]:
        return {"id": model_id, "object": "model", "created": int(ctx.started), "owned_by": "anemll_fast"}

    @app.get("/v1/models")
    async def list_models() -> Dict[str, Any]:
        return {"object": "list", "data": [model_card(i) for i in pool.ids]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Dict[str, Any]:
        try:
            return model_card(pool.resolve(model_id).id)
        except UnknownModel as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None

    async def start(request: Request, body: Any, prepare: Callable[[Any], Prepared],
                    rid: str) -> Tuple[Job, Prepared]:
        try:
            spec = pool.resolve(body.model)
        except UnknownModel as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None
        job = Job(asyncio.get_running_loop(), spec, generation_work(prepare), time.monotonic() + options.timeout,
                  rid)
        try:
            worker.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy ({options.max_queue} requests already wait); retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        kind, value = await _next(job, request)
        if kind == "start":
            return job, value
        _raise_event(kind, value, started=False)
        raise AssertionError("unreachable")

    async def _next(job: Job, request: Optional[Request]) -> Tuple[str, Any]:
        """The job's next event; a client gone or the deadline passed cancels the job."""
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                job.cancel()
                return "timeout", None
            try:
                return await job.next_event(timeout=min(0.25, remaining))
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancel()
                    return "cancelled", None

    def _raise_event(kind: str, value: Any, started: bool) -> None:
        if kind == "error":
            if isinstance(value, ApiError):
                raise value
            raise ApiError(500, f"generation failed: {type(value).__name__}: {value}", type="server_error")
        if kind == "timeout":
            raise ApiError(503 if not started else 504, f"the request timed out after {options.timeout:g} s",
                           type="timeout_error", code="timeout", headers={"Retry-After": "1"})
        raise ApiError(499, "the client closed the request", code="client_closed")

    def request_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    def log_done(rid: str, spec_id: str, last: Any, elapsed: float, extra: str = "") -> None:
        """The request log: one line per generation request."""
        if last is None:
            log.info("%s %s ended before the first token after %.2f s%s", rid, spec_id, elapsed, extra)
            return
        log.info("%s %s prompt=%d cached=%d completion=%d %.1f tok/s %.2f s finish=%s%s", rid, spec_id,
                 last.prompt_tokens, last.prompt_tokens - last.prefill_tokens, last.generation_tokens,
                 last.generation_tps, elapsed, last.finish_reason or "cancelled", extra)

    async def tokens(job: Job, request: Optional[Request]) -> AsyncIterator[Any]:
        """GenerationResponses until the last (finish_reason set); errors raise ApiError."""
        while True:
            kind, value = await _next(job, request)
            if kind != "token":
                _raise_event(kind, value, started=True)
            yield value
            if value.finish_reason is not None:
                return

    # ------------------------------------------------------------ chat
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        t0, rid = time.perf_counter(), request_id("chatcmpl")
        job, prepared = await start(request, body, lambda m: prepare_chat(body, m), rid)
        created, model_id = int(time.time()), job.spec.id
        text_of = _TokenText(prepared.info["tokenizer"])
        want_logprobs = prepared.settings.logprobs is not None
        from anemll_fast.tool_calls import ToolCallStream

        tool_stream = ToolCallStream(prepared.tool_format or "hermes", prepared.tool_names)

        if not body.stream:
            pieces: List[str] = []
            logprobs: List[Dict[str, Any]] = []
            last = None
            try:
                async for r in tokens(job, request):
                    pieces.append(r.text)
                    entry = _chat_logprobs(r, text_of) if want_logprobs else None
                    if entry:
                        logprobs.append(entry)
                    last = r
            finally:
                job.cancel()
            from anemll_fast.tool_calls import parse

            content, calls = parse("".join(pieces), prepared.tool_format or "hermes", prepared.tool_names)
            message: Dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            log_done(rid, model_id, last, time.perf_counter() - t0)
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "message": message,
                             "logprobs": {"content": logprobs} if want_logprobs else None,
                             "finish_reason": "tool_calls" if calls else _finish(last.finish_reason)}],
                "usage": _usage(last),
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: Dict[str, Any], finish: Optional[str] = None, logprobs: Any = None) -> str:
            out: Dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                                   "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                "finish_reason": finish}]}
            if include_usage:
                out["usage"] = None
            return json.dumps(out, ensure_ascii=False)

        async def events() -> AsyncIterator[str]:
            last = None
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for r in tokens(job, None):
                    last = r
                    text = tool_stream.feed(r.text)
                    entry = _chat_logprobs(r, text_of) if want_logprobs else None
                    if r.finish_reason is not None:
                        rest, calls = tool_stream.finish()
                        text += rest
                        if text:
                            yield chunk({"content": text})
                        if calls:
                            yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                        yield chunk({}, "tool_calls" if calls else _finish(r.finish_reason))
                        break
                    if text or entry:
                        yield chunk({"content": text}, logprobs={"content": [entry]} if entry else None)
                if include_usage and last is not None:
                    yield json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                      "model": model_id, "choices": [], "usage": _usage(last)})
            except ApiError as exc:
                yield json.dumps(exc.body())
            finally:
                job.cancel()  # a client gone mid-stream stops the generation within one token
                log_done(rid, model_id, last, time.perf_counter() - t0, " (stream)")
            yield "[DONE]"

        return EventSourceResponse(events(), ping=15)

    # ------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        t0, rid = time.perf_counter(), request_id("cmpl")
        job, prepared = await start(request, body, lambda m: prepare_completion(body, m), rid)
        created, model_id = int(time.time()), job.spec.id
        lp = _CompletionLogprobs(_TokenText(prepared.info["tokenizer"])) if prepared.settings.logprobs is not None else None

        if not body.stream:
            pieces: List[str] = []
            lps: List[Dict[str, Any]] = []
            last = None
            offset = 0
            try:
                async for r in tokens(job, request):
                    piece = lp.piece(r, offset) if lp else None
                    if piece:
                        lps.append(piece)
                    pieces.append(r.text)
                    offset += len(r.text)
                    last = r
            finally:
                job.cancel()
            log_done(rid, model_id, last, time.perf_counter() - t0)
            return {"id": rid, "object": "text_completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "text": "".join(pieces),
                                 "logprobs": _merge_completion_logprobs(lps) if lp else None,
                                 "finish_reason": _finish(last.finish_reason)}],
                    "usage": _usage(last)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            last = None
            offset = 0
            try:
                async for r in tokens(job, None):
                    last = r
                    piece = lp.piece(r, offset) if lp else None
                    offset += len(r.text)
                    finish = _finish(r.finish_reason) if r.finish_reason is not None else None
                    if r.text or piece or finish:
                        out: Dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                                               "model": model_id,
                                               "choices": [{"index": 0, "text": r.text, "logprobs": piece,
                                                            "finish_reason": finish}]}
                        if include_usage:
                            out["usage"] = None
                        yield json.dumps(out, ensure_ascii=False)
                if include_usage and last is not None:
                    yield json.dumps({"id": rid, "object": "text_completion", "created": created, "model": model_id,
                                      "choices": [], "usage": _usage(last)})
            except ApiError as exc:
                yield json.dumps(exc.body())
            finally:
                job.cancel()
                log_done(rid, model_id, last, time.perf_counter() - t0, " (stream)")
            yield "[DONE]"

        return EventSourceResponse(events(), ping=15)

    return app


def build_app(pool: ModelPool, worker: Worker, options: ServerOptions) -> Any:
    """The ASGI application: the FastAPI app behind CORS (when asked) and the key/size guard."""
    app: Any = create_app(pool, worker, options)
    if options.cors:
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(app, allow_origins=options.cors, allow_methods=["*"], allow_headers=["*"])
    return _Guard(app, options)
