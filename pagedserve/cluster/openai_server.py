"""The OpenAI-compatible HTTP API of a gateway: a FastAPI app served by uvicorn on the
gateway's own event loop, in the launching process, beside the gRPC server.

Routes: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
`stream`), GET /v1/models, /health (open, for probes: 200 while a replica is up, else 503) and
/metrics (open, Prometheus text, as vLLM leaves it). Requests take the gRPC service's path
(`Gateway.submit`), its bearer tokens (on /v1/*) and its TLS settings. Errors are OpenAI error
objects with the HTTP status of their class (`PagedServeError.http_status`): 400 naming the
field, 401, 404 for an unknown model, 429 with Retry-After when every replica is full, 503
when none is up. A client that disconnects aborts its requests at their coordinators.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import aclosing

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from pagedserve.cluster.auth import BearerTokens
from pagedserve.cluster.gateway import RETRY_AFTER_MS, Gateway
from pagedserve.cluster.gateway_request import RequestStream
from pagedserve.cluster.grpc_common import MAX_MESSAGE_BYTES
from pagedserve.cluster.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
)
from pagedserve.cluster.openai_serving import OpenAIServing, error_object
from pagedserve.errors import PagedServeError
from pagedserve.validation import check_field, is_int

logger = logging.getLogger(__name__)

CLIENT_GONE = 499
"""The status logged for a request whose client left (nginx's 'client closed request')."""


def error_response(message: str, status: int, param: str | None = None) -> JSONResponse:
    headers = {}
    if status == 429:  # seconds for HTTP; the openai client prefers the finer retry-after-ms
        headers = {"Retry-After": str(math.ceil(RETRY_AFTER_MS / 1000)),
                   "retry-after-ms": str(RETRY_AFTER_MS)}
    elif status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_object(message, status, param), status_code=status,
                        headers=headers)


def _refusal(error: PagedServeError, body: OpenAIRequest) -> JSONResponse:
    """The error as this request's field names it: 'max_completion_tokens' where the message
    says 'SamplingParams.max_tokens'."""
    param = body.param_of(error.field)
    message = str(error)
    if param is not None and param != (error.field or "").rpartition(".")[2]:
        message = f"{param}: {message}"
    return error_response(message, error.http_status, param)


class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <token>` (before the body is read,
    so a bad token is 401 whatever the body)."""

    def __init__(self, app, tokens: BearerTokens) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not self.tokens.accepts(header):
                response = error_response("missing or invalid API key; send 'Authorization: "
                                          "Bearer <token>'", 401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is 413 with an OpenAI error object,
    refused by its Content-Length before anything is read, or once the chunks read so far
    pass the limit (a chunked body), so no body larger than the limit is held in memory."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self) -> JSONResponse:
        return error_response(self._refusal_message(), 413)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refusal()(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read: FastAPI passes an HTTPException
                    # on, and the app's handler makes it an error object.
                    raise HTTPException(413, self._refusal_message())
            return message

        await self.app(scope, counted_receive, send)

    def _refusal_message(self) -> str:
        return (f"the request body is over {self.max_bytes} bytes (the server's "
                "max_body_bytes); send a shorter prompt")


def _close(streams: list[RequestStream]) -> None:
    """The requests let go of: aborted at their coordinators unless they finished."""
    for stream in streams:
        stream.close()


_EVENT_STREAM_HEADERS = [(b"cache-control", b"no-cache"),
                         (b"content-type", b"text/event-stream; charset=utf-8")]
_DONE = b"data: [DONE]\n\n"


class _EventStream(Response):
    """Server-sent events: each piece `events` yields is one write, and the one that ends
    with [DONE] ends the body too (no empty write after it). The requests are closed however
    the response ends, also when the client left before the first event; a client that
    leaves cancels the wait for the next event (the watch is on the connection, not on the
    next write).

    Leaner than Starlette's StreamingResponse, which this replaces on the per-token path: no
    task group, no encoding, no extra write per response."""

    def __init__(self, events: AsyncIterator[bytes], streams: list[RequestStream]) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_EVENT_STREAM_HEADERS)
        self._events = events
        self._streams = streams
        self._ended = False
        self._client_left = False

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        watch = asyncio.ensure_future(self._watch(receive, task))
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async with aclosing(self._events) as events:
                async for data in events:
                    self._ended = data.endswith(_DONE)
                    await send({"type": "http.response.body", "body": data,
                                "more_body": not self._ended})
            if not self._ended:
                self._ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Cancelled by the watch: the client left, nothing to report. Anything else
            # (a server that stops) goes on.
            if not self._client_left or task.uncancel() > 0:
                raise
        finally:
            watch.cancel()
            _close(self._streams)
        if self.background is not None:
            await self.background()

    async def _watch(self, receive, task: asyncio.Task) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._ended:
            self._client_left = True
            task.cancel()


async def _client_left(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work) -> dict | None:
    """`work`'s result, or None once the client disconnected first (`work` is cancelled;
    closing its streams, the caller aborts the requests at their coordinators)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_client_left(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task in done else None


def build_app(gateway: Gateway, tokens: list[str],
              max_body_bytes: int = MAX_MESSAGE_BYTES) -> FastAPI:
    """The app; a body over `max_body_bytes` is 413 (by default gRPC's message limit)."""
    check_field("build_app", "max_body_bytes", is_int(max_body_bytes) and max_body_bytes >= 1,
                "an integer >= 1", max_body_bytes)
    serving = OpenAIServing(gateway)
    app = FastAPI(title="pagedserve", summary="OpenAI-compatible API of a pagedserve gateway")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)  # inside the auth check
    if tokens:
        app.add_middleware(BearerAuth, tokens=BearerTokens(tokens))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        locations = [_location_of(problem) for problem in problems]
        message = "; ".join(f"{'.'.join(parts)}: {problem['msg']}" if parts else problem["msg"]
                            for parts, problem in zip(locations, problems, strict=True))
        param = next((parts[0] for parts in locations if parts), None)
        return error_response(f"invalid request: {message}", 400, param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(str(error.detail), error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer is sent.
        return error_response(f"internal error: {type(error).__name__}", 500)

    async def generate(body: OpenAIRequest, request: Request) -> Response:
        try:
            streams = await serving.admit(body)
        except PagedServeError as error:
            return _refusal(error, body)
        if body.stream:
            return _EventStream(serving.events(body, streams), streams)
        try:
            result = await _unless_client_leaves(request, serving.response(body, streams))
        except PagedServeError as error:
            return _refusal(error, body)
        finally:
            _close(streams)
        return Response(status_code=CLIENT_GONE) if result is None else JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return serving.models()

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Response:
        try:
            serving.check_model(model)
        except PagedServeError as error:
            return error_response(str(error), error.http_status, "model")
        return JSONResponse(serving.models()["data"][0])

    @app.get("/health")
    async def health() -> Response:
        if any(replica.up for replica in gateway.replicas):
            return Response(status_code=200)
        return error_response("no replica is up", 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = gateway.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    return app


_UNION_MEMBER_TAGS = ("str", "int", "float", "bool")


def _location_of(problem: dict) -> list[str]:
    """Where a validation problem is, as ['messages', '0', 'content']: pydantic's location
    without FastAPI's leading 'body' and the union members it tried below the field
    ('prompt.list[int].1' -> prompt, 1); the field itself is kept as sent, whatever its
    name (an unknown field may be called 'str' or 'a.b'). Empty for a body that is not
    JSON at all."""
    if problem["type"] == "json_invalid" or len(problem["loc"]) < 2:
        return []
    field, *below = (str(part) for part in problem["loc"][1:])
    return [field, *(part for part in below
                     if "[" not in part and part not in _UNION_MEMBER_TAGS)]


class OpenAIHttpServer:
    """uvicorn serving `build_app(gateway, tokens)` on the running loop; `start` returns the
    base URL, `stop` lets responses in flight finish for `grace_s` and then cancels them."""

    def __init__(self, gateway: Gateway, tokens: list[str], host: str, port: int,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_client_ca: str | None = None,
                 max_body_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.host = host
        self.port = port
        self.config = uvicorn.Config(
            build_app(gateway, tokens, max_body_bytes), lifespan="off", ws="none", log_config=None,
            log_level="warning", access_log=False, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
            ssl_ca_certs=tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE)
        self.server = uvicorn.Server(self.config)
        self._socket: socket.socket | None = None
        self._ticks: asyncio.Task | None = None

    async def start(self) -> str:
        # The socket is bound here rather than by uvicorn: port 0 then tells its port, and a
        # taken port raises OSError instead of uvicorn's sys.exit. Server.serve() is not used:
        # it would replace the launcher's SIGINT/SIGTERM handlers with its own; these are the
        # steps it takes inside them.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._socket = socket.create_server((self.host, self.port), family=family,
                                            backlog=self.config.backlog)
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[self._socket])
        self._ticks = asyncio.ensure_future(self.server.main_loop())  # Date header, exit flag
        port = self._socket.getsockname()[1]
        host = f"[{self.host}]" if family == socket.AF_INET6 else self.host
        return f"{'https' if self.config.is_ssl else 'http'}://{host}:{port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._ticks is None:
            return
        self.config.timeout_graceful_shutdown = grace_s
        self.server.should_exit = True
        await self._ticks
        await self.server.shutdown(sockets=[self._socket])
        self._ticks = None
