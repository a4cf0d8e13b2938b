"""What both gRPC servers (gateway and coordinator) share: status mapping, health, reflection,
channel and server options, and servicers whose requests are parsed before their handlers."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from pagedserve.errors import PagedServeError

MAX_MESSAGE_BYTES = 64 << 20
"""Largest request or response: a 128K-token prompt of ids is about 0.5 MB, logprobs of long
outputs a few MB; anything near this limit is a mistake."""

KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),  # notice a vanished peer within about half a minute
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    *KEEPALIVE_OPTIONS,
]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    *KEEPALIVE_OPTIONS,
]


def status_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC status an error maps to (by class, never by message)."""
    if isinstance(error, PagedServeError) or hasattr(error, "grpc_status"):
        return grpc.StatusCode[error.grpc_status]
    return grpc.StatusCode.INTERNAL


def add_health_and_reflection(server: grpc.aio.Server,
                              service_names: list[str]) -> health_aio.HealthServicer:
    """Standard grpc.health.v1 (SERVING for '' and each service) and server reflection."""
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    return health


async def set_serving(health: health_aio.HealthServicer, service_names: list[str],
                      serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving \
        else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        await health.set(name, status)


def add_servicer(add_to_server: Callable[[Any, Any], None], servicer: Any,
                 server: grpc.aio.Server) -> None:
    """`add_to_server(servicer, server)` (a generated `add_*Servicer_to_server`), with each
    request parsed before its handler runs: bytes that do not parse are INVALID_ARGUMENT
    naming the message (grpc itself answers UNKNOWN, as if the handler had failed)."""
    add_to_server(servicer, _ParsingServer(server))


class _ParsingServer:
    """What generated code calls on a server; passes the handlers on with `_parsing`."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_ParsingGenericHandler(h)
                                                    for h in handlers))

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: _parsing(handler) for name, handler in handlers.items()})


class _ParsingGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        """Per method of the service (never per unknown name a client sends)."""

    def service(self, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = _parsing(handler)
        return wrapped


def _parsing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with raw bytes in (no deserializer) and the parse done first by its
    behaviour, which aborts with INVALID_ARGUMENT when the parse fails. Unary requests only
    (every pagedserve RPC); streaming requests are left as they are."""
    parse = handler.request_deserializer
    if parse is None or handler.request_streaming:
        return handler
    message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "the request message"

    async def parsed(raw: bytes, context):
        try:
            return parse(raw)
        except (DecodeError, ValueError, TypeError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request does not parse as {name}: {error}")

    if handler.unary_stream is not None:
        behaviour = handler.unary_stream
        if not inspect.isasyncgenfunction(behaviour):
            return handler

        async def unary_stream(raw: bytes, context):
            async for response in behaviour(await parsed(raw, context), context):
                yield response

        return handler._replace(request_deserializer=None, unary_stream=unary_stream)
    behaviour = handler.unary_unary
    if not inspect.iscoroutinefunction(behaviour):
        return handler

    async def unary_unary(raw: bytes, context):
        return await behaviour(await parsed(raw, context), context)

    return handler._replace(request_deserializer=None, unary_unary=unary_unary)
