"""`pagedserve serve`: Ray, one coordinator per replica with its workers, and the gateway.

The gateway runs in the launching process (it holds the tokenizer), behind the public gRPC
server and, when `http_port` is set, the OpenAI-compatible HTTP API (same loop, same tokens and
TLS); each coordinator is a Ray actor serving its internal gRPC API; Ray is started locally (and
stopped again) unless an address is given. `Server.stop()` shuts everything down in order: the
public servers, the gateway's streams, the coordinators (their workers and placement groups go
with them), Ray.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import grpc

from pagedserve.cluster.auth import BearerTokenAuth, load_tokens, server_credentials
from pagedserve.cluster.coordinator import start_coordinator, stop_coordinator
from pagedserve.cluster.gateway import SERVICE as GATEWAY_SERVICE
from pagedserve.cluster.gateway import Gateway
from pagedserve.cluster.grpc_common import SERVER_OPTIONS, add_health_and_reflection, set_serving
from pagedserve.config import EngineConfig
from pagedserve.errors import InvalidArgument
from pagedserve.protos.v1 import generation_pb2_grpc
from pagedserve.validation import check_field, is_int

logger = logging.getLogger(__name__)

AUTH_TOKEN_ENV = "PAGEDSERVE_API_KEYS"


@dataclass
class ServeOptions:
    """How `pagedserve serve` runs, beside the engine's own EngineConfig."""

    host: str = "127.0.0.1"
    """Address the public gRPC server binds (0.0.0.0 for every interface)."""
    port: int = 50051
    """Its port; 0 picks a free one (the bound address is printed and returned)."""
    http_port: int | None = None
    """Port of the OpenAI-compatible HTTP API on `host`; 0 picks a free one; None: no HTTP
    (the CLI's default is 8000: one fixed port here would collide between Servers)."""
    ray_address: str | None = None
    """A Ray cluster to join; None starts a local one (stopped again on exit)."""
    replicas: int = 1
    """Coordinators (each with its own tensor-parallel workers)."""
    max_coordinator_restarts: int = 3
    """Times Ray restarts a coordinator whose process died; the gateway reconnects to it."""
    max_queue_per_replica: int = 1024
    """Requests in flight per replica before the gateway answers RESOURCE_EXHAUSTED."""
    auth_token_file: str | None = None
    """File of bearer tokens, one per line; with PAGEDSERVE_API_KEYS (comma-separated)."""
    tls_cert: str | None = None
    """PEM certificate of the server (TLS on when given with tls_key)."""
    tls_key: str | None = None
    """PEM private key of the server."""
    tls_client_ca: str | None = None
    """PEM CA of client certificates: mutual TLS (clients must present one)."""
    served_model_name: str | None = None
    """Name clients give as `model` (default: the model directory's name)."""
    auth_tokens: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        check_field("ServeOptions", "port", is_int(self.port) and 0 <= self.port <= 65535,
                    "an integer in [0, 65535]", self.port)
        check_field("ServeOptions", "http_port", self.http_port is None or (
            is_int(self.http_port) and 0 <= self.http_port <= 65535),
            "None or an integer in [0, 65535]", self.http_port)
        check_field("ServeOptions", "replicas", is_int(self.replicas) and self.replicas >= 1,
                    "an integer >= 1", self.replicas)
        check_field("ServeOptions", "max_coordinator_restarts",
                    is_int(self.max_coordinator_restarts) and self.max_coordinator_restarts >= 0,
                    "an integer >= 0", self.max_coordinator_restarts)
        check_field("ServeOptions", "max_queue_per_replica",
                    is_int(self.max_queue_per_replica) and self.max_queue_per_replica >= 1,
                    "an integer >= 1", self.max_queue_per_replica)


class Server:
    """The served system, started by `start()` and stopped by `stop()`."""

    def __init__(self, config: EngineConfig, options: ServeOptions) -> None:
        if config.model is None:
            raise InvalidArgument("EngineConfig.model must be set (the launcher resolves the "
                                  "embedded default before this)")
        self.config = config
        self.options = options
        self.coordinators: list = []
        self.gateway: Gateway | None = None
        self.server: grpc.aio.Server | None = None
        self.address: str | None = None
        self.http = None
        """The OpenAIHttpServer, when `options.http_port` is set."""
        self.http_address: str | None = None
        """Its base URL, http(s)://host:port (the API is under /v1)."""
        self.instance = uuid.uuid4().hex[:8]
        self._started_ray = False

    async def start(self) -> str:
        """Start everything; returns the public address (host:port)."""
        import ray

        options = self.options
        tokens = options.auth_tokens or load_tokens(options.auth_token_file, AUTH_TOKEN_ENV)
        credentials = server_credentials(options.tls_cert, options.tls_key,
                                         options.tls_client_ca)
        if not ray.is_initialized():
            await asyncio.to_thread(ray.init, address=options.ray_address,
                                    logging_level=logging.WARNING)
            self._started_ray = options.ray_address is None
        coordinator_host = "127.0.0.1" if self._started_ray \
            else ray.util.get_node_ip_address()
        addresses, resolvers = [], []
        for index in range(options.replicas):
            # Named per server: several servers may share one Ray cluster and namespace.
            handle = await asyncio.to_thread(start_coordinator, self.config,
                                             f"pagedserve-coordinator-{self.instance}-{index}",
                                             max_restarts=options.max_coordinator_restarts)
            self.coordinators.append(handle)
            addresses.append(await handle.serve_grpc.remote(coordinator_host))
            # A restarted coordinator serves again on a port of its own choosing.
            resolvers.append(lambda handle=handle: handle.serve_grpc.remote(coordinator_host))
        from pagedserve.workers.models.loader import load_tokenizer

        tokenizer = await asyncio.to_thread(load_tokenizer,
                                            self.config.tokenizer or self.config.model)
        name = options.served_model_name or self.config.model.rstrip("/").split("/")[-1]
        self.gateway = Gateway(name, tokenizer, addresses, options.max_queue_per_replica,
                               resolvers=resolvers if options.max_coordinator_restarts else None)
        await self.gateway.start()
        interceptors = [BearerTokenAuth(tokens)] if tokens else []
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        generation_pb2_grpc.add_GenerationServicer_to_server(self.gateway, self.server)
        health = add_health_and_reflection(self.server, [GATEWAY_SERVICE])
        self.gateway.health = health
        target = f"{options.host}:{options.port}"
        port = self.server.add_secure_port(target, credentials) if credentials \
            else self.server.add_insecure_port(target)
        if port == 0:
            raise OSError(f"could not bind {target}")
        await self.server.start()
        await set_serving(health, [GATEWAY_SERVICE], True)
        self.address = f"{options.host}:{port}"
        if options.http_port is not None:
            # Imported only here: a gRPC-only server runs without fastapi and uvicorn.
            from pagedserve.cluster.openai_server import OpenAIHttpServer

            self.http = OpenAIHttpServer(self.gateway, tokens, options.host, options.http_port,
                                         options.tls_cert, options.tls_key,
                                         options.tls_client_ca)
            self.http_address = await self.http.start()
        logger.info("gateway serves %s on %s, OpenAI HTTP %s (auth %s, TLS %s)", name,
                    self.address, self.http_address or "off", "on" if tokens else "off",
                    "on" if credentials else "off")
        return self.address

    async def stop(self, grace_s: float = 5.0) -> None:
        import ray

        fronts = [self.server.stop(grace=grace_s)] if self.server is not None else []
        if self.http is not None:
            fronts.append(self.http.stop(grace_s))
        await asyncio.gather(*fronts)
        if self.gateway is not None:
            await self.gateway.close()
        for handle in self.coordinators:
            await asyncio.to_thread(stop_coordinator, handle)
        self.coordinators.clear()
        if self._started_ray and ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)
