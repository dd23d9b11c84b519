"""The HTTP server: OpenAI-compatible routes over the async engine (FastAPI), run by uvicorn.

`build_app(engine, name)` wires a loaded `LLMEngine` to the routes; the app's lifespan starts and stops the
engine thread, so uvicorn's graceful shutdown (stop accepting, let in-flight requests finish, then the
lifespan) drains the engine before it stops (server.py runs it). Every error is OpenAI-shaped JSON,
`{"error": {"message", "type", "param", "code"}}`, with the status OpenAI uses; a bad request never takes
the server down, nor its keep-alive connection. A client that disconnects has its request aborted, so its
KV blocks are freed at once. `ServerLimits` bounds the work one request may ask for.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from ..engine.llm import LLMEngine
from ..tokenizer import Tokenizer
from . import protocol as api
from .async_engine import AsyncEngine, Delta, Stream
from .limits import ServerLimits
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import APIError, Usage, error_json

log = logging.getLogger(__name__)


@dataclass
class _Server:
    """What the routes need, kept on app.state: one server per app, no module state."""
    bridge: AsyncEngine
    metrics: ServerMetrics
    tokenizer: Tokenizer
    model_name: str
    vocab_size: int
    max_model_len: int
    created: int
    limits: ServerLimits

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def check_work(self, num_prompts: int, n: int) -> None:
        """Refuse a request over the per-request limits before any of it is tokenized."""
        lim = self.limits
        if num_prompts > lim.max_prompts_per_request:
            raise APIError(400, f"the request has {num_prompts} prompts; this server takes at most "
                                f"{lim.max_prompts_per_request} per request: split the batch", "prompt")
        if num_prompts * n > lim.max_seqs_per_request:
            raise APIError(400, f"the request asks for {num_prompts} prompt(s) × n = {n}, {num_prompts * n} "
                                f"sequences; this server takes at most {lim.max_seqs_per_request} per request: "
                                "lower n or split the batch", "n")

    def check_room(self, prompts: list[list[int]], max_tokens: int, param: str) -> None:
        """A 400 unless every prompt leaves room in the context for max_tokens more (as OpenAI does, rather
        than cut the completion short or let an absurd max_tokens through)."""
        longest, context = max(map(len, prompts)), self.max_model_len
        room = context - longest
        if room < 1:
            raise APIError(400, f"the prompt has {longest} tokens and the model's context is {context}: no room "
                                "is left to generate; shorten the prompt", "prompt", "context_length_exceeded")
        if max_tokens > room:
            raise APIError(400, f"{param} is {max_tokens}, but the model's context is {context} tokens and the "
                                f"prompt takes {longest}: at most {room} can be generated; lower {param}", param,
                           "context_length_exceeded")

    def tokens(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:  # caught here: an out-of-range id would fail the engine step of every request in it
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", "prompt")
        return prompt

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _server(request: Request) -> _Server:
    return request.app.state.server


def _json(model: BaseModel) -> Response:
    # dumped by the model itself, so its omit-if-None serializers apply
    return Response(model.model_dump_json(), media_type="application/json")


def _event(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def _abort_on_disconnect(request: Request, stream: Stream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.abort()


async def _collect(request: Request, stream: Stream) -> list[Delta]:
    """All deltas of a non-streamed request merged per choice, in choice order."""
    watcher = asyncio.ensure_future(_abort_on_disconnect(request, stream))
    merged: dict[int, Delta] = {}
    try:
        async for deltas in stream:
            for d in deltas:
                m = merged.setdefault(d.index, Delta(d.index, "", []))
                m.text += d.text
                m.logprobs += d.logprobs
                m.finish_reason, m.num_tokens = d.finish_reason, d.num_tokens
    finally:
        watcher.cancel()
        stream.abort()
    return [merged[i] for i in sorted(merged)]


def _sse(request: Request, stream: Stream, head: list[BaseModel], chunks: Callable[[Delta], BaseModel],
         usage: Callable[[int], BaseModel] | None) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        watcher = asyncio.ensure_future(_abort_on_disconnect(request, stream))
        completion_tokens = 0
        try:
            for chunk in head:
                yield _event(chunk)
            async for deltas in stream:
                for d in deltas:
                    completion_tokens += d.num_tokens
                    yield _event(chunks(d))
            if stream.aborted:  # the client left: nobody to send the end to
                return
            if usage is not None:
                yield _event(usage(completion_tokens))
        except APIError as e:  # the status line has gone out: report the error as an event, as OpenAI does
            yield _event(e.json())
        except Exception as e:  # a bug in this request's chunks: end it cleanly rather than cut the connection
            log.exception("stream failed")
            yield _event(error_json(500, f"internal error: {type(e).__name__}: {e}"))
        finally:
            watcher.cancel()
            stream.abort()  # a no-op when finished; frees the blocks when the generator was cancelled
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- routes --------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    return Response(status_code=200 if _server(request).bridge.running else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_server(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(request: Request) -> Response:
    srv = _server(request)
    return _json(api.ModelList(data=[api.ModelCard(id=srv.model_name, created=srv.created)]))


@router.post("/v1/completions")
async def completions(body: api.CompletionRequest, request: Request) -> Response:
    srv = _server(request)
    srv.check_model(body.model)
    srv.check_work(len(body.prompts), body.n or 1)
    prompts = [srv.tokens(p) for p in body.prompts]
    srv.check_room(prompts, body.max_tokens, "max_tokens")
    stream = await srv.bridge.submit(prompts, body.sampling_params(body.max_tokens, body.logprobs), body.stream)
    rid, k, prompt_tokens = f"cmpl-{uuid.uuid4().hex}", body.logprobs, sum(map(len, prompts))

    def response(choices: list[Delta], usage: Usage | None = None) -> api.Completion:
        return api.Completion(id=rid, model=srv.model_name, usage=usage, choices=[api.CompletionChoice(
            index=d.index, text=d.text, finish_reason=d.finish_reason,
            logprobs=api.completion_logprobs(d.logprobs, k, srv.token_text) if k is not None and d.logprobs else None)
            for d in choices])

    if body.stream:  # OpenAI streams completions as partial text_completion objects, one choice each
        usage = (lambda n: response([], Usage.of(prompt_tokens, n))) if body.include_usage else None
        return _sse(request, stream, [], lambda d: response([d]), usage)
    outs = await _collect(request, stream)
    return _json(response(outs, Usage.of(prompt_tokens, sum(d.num_tokens for d in outs))))


@router.post("/v1/chat/completions")
async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
    srv = _server(request)
    srv.check_model(body.model)
    srv.check_work(1, body.n or 1)
    try:
        text = srv.tokenizer.apply_chat_template([m.as_template_dict() for m in body.messages],
                                                 add_generation_prompt=True)
    except Exception as e:  # the template's own checks (an unknown role, ...) or no template at all
        raise APIError(400, f"cannot apply the chat template: {e}", "messages") from None
    ids = srv.tokenizer.encode(text)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", "top_logprobs")
    k = (body.top_logprobs or 0) if body.logprobs else None
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(body, param)
    if max_tokens is None:  # OpenAI's default: as much as the context leaves
        max_tokens = max(1, srv.max_model_len - len(ids))
    srv.check_room([ids], max_tokens, param)
    params = body.sampling_params(max_tokens, k)
    stream = await srv.bridge.submit([ids], params, body.stream)
    rid = f"chatcmpl-{uuid.uuid4().hex}"

    def logprobs(d: Delta) -> api.ChatLogprobs | None:
        return api.chat_logprobs(d.logprobs, k, srv.token_text) if k is not None and d.logprobs else None

    def chunk(d: Delta | None = None, index: int = 0, usage: Usage | None = None) -> api.ChatCompletionChunk:
        """d None: the opening chunk of choice `index` (role only), or the usage chunk (no choices)."""
        choice = (api.ChatChunkChoice(index=index, delta=api.ChoiceDelta(role="assistant", content="")) if d is None
                  else api.ChatChunkChoice(index=d.index, delta=api.ChoiceDelta(content=d.text or None),
                                           logprobs=logprobs(d), finish_reason=d.finish_reason))
        return api.ChatCompletionChunk(id=rid, model=srv.model_name, choices=[] if usage else [choice], usage=usage)

    if body.stream:
        usage = (lambda n: chunk(usage=Usage.of(len(ids), n))) if body.include_usage else None
        return _sse(request, stream, [chunk(index=i) for i in range(params.n)], chunk, usage)
    outs = await _collect(request, stream)
    choices = [api.ChatChoice(index=d.index, message=api.AssistantMessage(content=d.text), logprobs=logprobs(d),
                              finish_reason=d.finish_reason) for d in outs]
    return _json(api.ChatCompletion(id=rid, model=srv.model_name, choices=choices,
                                    usage=Usage.of(len(ids), sum(d.num_tokens for d in outs))))


# ---- errors and the gate -------------------------------------------------------------------------
def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> Response:
    # ASCII JSON (Starlette's JSONResponse writes UTF-8, which fails on a lone surrogate in a message)
    return Response(json.dumps(error_json(status, message, param, code)), status, headers, "application/json")


async def _on_api_error(request: Request, e: APIError) -> Response:
    return _error(e.status, e.message, e.param, e.code, e.headers)


async def _on_http_error(request: Request, e: HTTPException) -> Response:
    return _error(e.status_code, str(e.detail))


async def _on_invalid(request: Request, e: RequestValidationError) -> Response:
    """FastAPI answers 422 in its own shape; OpenAI answers 400 naming the parameter."""
    # a union (content: str | list of parts) reports every member's error; a value check of ours says more than
    # the type mismatch of the member the input was not meant for
    err = next((x for x in e.errors() if x.get("type") == "value_error"), e.errors()[0])
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    if not loc and "json" not in request.headers.get("content-type", ""):
        # FastAPI parses JSON only when declared (no CSRF from a browser through a plain-text form post)
        return _error(400, "the request body must be JSON, sent with the header 'Content-Type: application/json'")
    where = ".".join(loc) or "the request body"
    return _error(400, f"{where}: {err['msg'].removeprefix('Value error, ')}", loc[0] if loc else None)


def _authorized(header: bytes, key: bytes) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 7235), one or more spaces before the key."""
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.lstrip(b" "), key)


class _Gate:
    """ASGI middleware run before FastAPI reads the request:
    - the API key (every path but /health);
    - the body: its size limit, checked on Content-Length and again on the bytes received (a chunked body has
      no length), and its read timeout: all of it within `read_timeout_s`, else a 408 and the connection
      closed (a client that sends less than its Content-Length would otherwise hold the connection forever);
    - crashes: an exception before the response has started becomes a logged, OpenAI-shaped 500 and the
      connection stays usable (Starlette's own handler re-raises it, and uvicorn then drops the connection).
    The body is read here and replayed to the app; later receives (the disconnect) pass through."""

    def __init__(self, app, api_key: str | None, limits: ServerLimits):
        self.app, self.limits = app, limits
        self.api_key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, limit = dict(scope["headers"]), self.limits.max_body_bytes
        if self.api_key is not None and scope["path"] != "/health":
            if not _authorized(headers.get(b"authorization", b""), self.api_key):
                return await _error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                    code="invalid_api_key")(scope, receive, send)
        too_large = _error(413, f"the request body is over the server's limit of {limit} bytes",
                           code="request_too_large")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():  # uvicorn's h11 refuses these itself (see server.py); other servers may not
            return await _error(400, "invalid Content-Length header")(scope, receive, send)
        if int(length) > limit:
            return await too_large(scope, receive, send)
        loop, timeout = asyncio.get_running_loop(), self.limits.read_timeout_s
        deadline = loop.time() + timeout
        body, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                return await _error(408, f"the request body did not arrive within {timeout:g} s",
                                    headers={"Connection": "close"})(scope, receive, send)
            if message["type"] != "http.request":
                return  # the client left before its body arrived
            size += len(message.get("body", b""))
            if size > limit:
                return await too_large(scope, receive, send)
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        replayed = started = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, watch)
        except Exception as e:
            if started:  # the status line is out: nothing left to answer with
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            await _error(500, f"internal error: {type(e).__name__}: {e}")(scope, receive, send)


# ---- assembly ------------------------------------------------------------------------------------
def build_app(engine: LLMEngine, model_name: str, api_key: str | None = None,
              limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The server for an engine (from `LLM(model_dir).engine`); the engine thread runs while the app does.
    server.py's `run` / `make_server` serve it."""
    metrics = ServerMetrics()
    bridge = AsyncEngine(engine, metrics, limits.max_waiting_seqs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        bridge.start()
        try:
            yield
        finally:
            await asyncio.to_thread(bridge.stop)  # joins the engine thread without blocking the loop

    app = FastAPI(title="deepmoe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = _Server(bridge, metrics, engine.tokenizer, model_name,
                               engine.vocab_size, engine.scheduler.max_model_len,
                               int(time.time()), limits)
    app.include_router(router)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_middleware(_Gate, api_key=api_key, limits=limits)
    return app
