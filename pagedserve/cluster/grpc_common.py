"""What both gRPC servers (gateway and coordinator) share: status mapping, health, reflection,
channel and server options."""

from __future__ import annotations

import grpc
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
