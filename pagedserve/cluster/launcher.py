"""`pagedserve serve`: Ray, one coordinator per replica with its workers, and the gateway.

The gateway runs in the launching process (it holds the tokenizer), behind the public gRPC
server and, when `http_port` is set, the OpenAI-compatible HTTP API (same loop, same tokens and
TLS); each coordinator is a Ray actor serving its internal gRPC API; Ray is started locally (and
stopped again) unless an address is given. With an AutoscalerConfig whose max_replicas exceeds
its min_replicas, an `AutoscaleController` adds replicas (`add_replica`) and drains and removes
them (`remove_replica`) as the load asks. `Server.stop()` shuts everything down in order: the
autoscaler, the public servers, the gateway's streams, the coordinators (their workers and
placement groups go with them), Ray.

`ServeOptions.role` splits this for many gateways over one fleet: `fleet` runs the
coordinators as named detached actors and the autoscaler (`fleet.Fleet`, no public server);
`gateway` starts no coordinator and routes to the fleet's, found and followed by
`fleet_discovery`; `all` is everything here, as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc

from pagedserve.cluster.auth import BearerTokenAuth, load_tokens, server_credentials
from pagedserve.cluster.autoscaler import AutoscaleController, AutoscalerConfig, LoadSample
from pagedserve.cluster.coordinator import start_coordinator, stop_coordinator
from pagedserve.cluster.fleet_discovery import FleetDiscovery
from pagedserve.cluster.gateway import SERVICE as GATEWAY_SERVICE
from pagedserve.cluster.gateway import Gateway
from pagedserve.cluster.grpc_common import (
    MAX_MESSAGE_BYTES,
    SERVER_OPTIONS,
    add_health_and_reflection,
    add_servicer,
    set_serving,
)
from pagedserve.cluster.ray_startup import start_ray
from pagedserve.cluster.replica_client import ReplicaClient
from pagedserve.cluster.router import RoutingConfig
from pagedserve.config import EngineConfig
from pagedserve.errors import InvalidArgument
from pagedserve.protos.v1 import generation_pb2_grpc
from pagedserve.validation import check_field, is_finite_number, is_int

logger = logging.getLogger(__name__)

AUTH_TOKEN_ENV = "PAGEDSERVE_API_KEYS"
SERVE_ROLES = ("all", "fleet", "gateway")
"""What one `pagedserve serve` process runs (ServeOptions.role)."""


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
    """Coordinators (each with its own tensor-parallel workers) at start."""
    autoscaler: AutoscalerConfig | None = None
    """When to add and remove replicas (between its min and max, which must hold `replicas`);
    None: always `replicas`."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """How the gateway picks a replica per request."""
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
    max_body_bytes: int = MAX_MESSAGE_BYTES
    """Largest OpenAI HTTP request body; a larger one is answered 413 (default: gRPC's limit)."""
    role: str = "all"
    """One of SERVE_ROLES: `all` (coordinators and gateway in this process), `fleet` (named
    detached coordinators and the autoscaler, no public server: `fleet.Fleet`) or `gateway`
    (the public servers over the fleet's coordinators, found by `fleet_discovery`)."""
    discovery_interval_s: float = 2.0
    """Gateway role: seconds between looks for replicas the fleet added or removed."""
    discovery_timeout_s: float = 120.0
    """Gateway role: how long to wait at start for the fleet's first replica."""
    auth_tokens: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        check_field("ServeOptions", "role", self.role in SERVE_ROLES,
                    f"one of {list(SERVE_ROLES)}", self.role)
        check_field("ServeOptions", "ray_address",
                    self.role != "gateway" or self.ray_address is not None,
                    "the fleet's Ray cluster (ray://HEAD:10001 or auto) with role 'gateway'",
                    self.ray_address)
        for name in ("discovery_interval_s", "discovery_timeout_s"):
            value = getattr(self, name)
            check_field("ServeOptions", name, is_finite_number(value) and value > 0,
                        "a finite number > 0", value)
        check_field("ServeOptions", "port", is_int(self.port) and 0 <= self.port <= 65535,
                    "an integer in [0, 65535]", self.port)
        check_field("ServeOptions", "http_port", self.http_port is None or (
            is_int(self.http_port) and 0 <= self.http_port <= 65535),
            "None or an integer in [0, 65535]", self.http_port)
        check_field("ServeOptions", "replicas", is_int(self.replicas) and self.replicas >= 1,
                    "an integer >= 1", self.replicas)
        scaling = self.autoscaler
        check_field("ServeOptions", "replicas", scaling is None
                    or scaling.min_replicas <= self.replicas <= scaling.max_replicas,
                    "within the autoscaler's [min_replicas, max_replicas]", self.replicas)
        check_field("ServeOptions", "max_coordinator_restarts",
                    is_int(self.max_coordinator_restarts) and self.max_coordinator_restarts >= 0,
                    "an integer >= 0", self.max_coordinator_restarts)
        check_field("ServeOptions", "max_body_bytes",
                    is_int(self.max_body_bytes) and self.max_body_bytes >= 1,
                    "an integer >= 1", self.max_body_bytes)
        check_field("ServeOptions", "max_queue_per_replica",
                    is_int(self.max_queue_per_replica) and self.max_queue_per_replica >= 1,
                    "an integer >= 1", self.max_queue_per_replica)


def served_name(config: EngineConfig, options: ServeOptions) -> str:
    """The name clients give as `model` (the fleet's replicas are named after it)."""
    return options.served_model_name or config.model.rstrip("/").split("/")[-1]


class Server:
    """The served system, started by `start()` and stopped by `stop()`."""

    def __init__(self, config: EngineConfig, options: ServeOptions) -> None:
        if config.model is None:
            raise InvalidArgument("EngineConfig.model must be set (the launcher resolves the "
                                  "embedded default before this)")
        self.config = config
        self.options = options
        self.coordinators: list = []
        """Coordinator actor handles, in the order of `gateway.replicas`."""
        self.autoscaler: AutoscaleController | None = None
        self._autoscaling: asyncio.Task | None = None
        self._replica_numbers = itertools.count()
        self._starting: set[asyncio.Future] = set()
        self._coordinator_host: str | None = None
        self.gateway: Gateway | None = None
        self.server: grpc.aio.Server | None = None
        self.address: str | None = None
        self.http = None
        """The OpenAIHttpServer, when `options.http_port` is set."""
        self.http_address: str | None = None
        """Its base URL, http(s)://host:port (the API is under /v1)."""
        self.instance = uuid.uuid4().hex[:8]
        self._started_ray = False
        self.discovery: FleetDiscovery | None = None
        """Gateway role: the fleet's replicas as this gateway routes to them."""
        self._discovering: asyncio.Task | None = None

    @property
    def model_name(self) -> str:
        return served_name(self.config, self.options)

    async def start(self) -> str:
        """Start everything; returns the public address (host:port)."""
        import ray

        options = self.options
        tokens = options.auth_tokens or load_tokens(options.auth_token_file, AUTH_TOKEN_ENV)
        credentials = server_credentials(options.tls_cert, options.tls_key,
                                         options.tls_client_ca)
        if not ray.is_initialized():
            await asyncio.to_thread(start_ray, address=options.ray_address,
                                    logging_level=logging.WARNING)
            self._started_ray = options.ray_address is None
        # Joined clusters: None lets each coordinator bind its own node's address (this process
        # may be a Ray Client on another machine, e.g. a gateway pod).
        self._coordinator_host = "127.0.0.1" if self._started_ray else None
        name = self.model_name
        if options.role == "gateway":
            # Ask with host None: a restarted coordinator binds its own node's address.
            self.discovery = FleetDiscovery(name, lambda handle: handle.serve_grpc.remote(None),
                                            options.discovery_interval_s)
            names, addresses, resolvers = await self.discovery.wait_for_replicas(
                options.discovery_timeout_s)
        else:
            addresses, resolvers = [], []
            for _ in range(options.replicas):
                address, resolve = await self._start_coordinator()
                addresses.append(address)
                resolvers.append(resolve)
            if not options.max_coordinator_restarts:
                resolvers = None
        from pagedserve.workers.models.loader import load_tokenizer

        tokenizer = await asyncio.to_thread(load_tokenizer,
                                            self.config.tokenizer or self.config.model)
        self.gateway = Gateway(name, tokenizer, addresses, options.max_queue_per_replica,
                               resolvers=resolvers, routing=options.routing)
        await self.gateway.start()
        if self.discovery is not None:
            self.discovery.attach(self.gateway, names)
            self._discovering = asyncio.get_running_loop().create_task(self.discovery.run())
        interceptors = [BearerTokenAuth(tokens)] if tokens else []
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        add_servicer(generation_pb2_grpc.add_GenerationServicer_to_server, self.gateway,
                     self.server)
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
                                         options.tls_client_ca,
                                         max_body_bytes=options.max_body_bytes)
            self.http_address = await self.http.start()
        logger.info("gateway serves %s on %s, OpenAI HTTP %s (auth %s, TLS %s)", name,
                    self.address, self.http_address or "off", "on" if tokens else "off",
                    "on" if credentials else "off")
        if options.role == "all" and options.autoscaler is not None \
                and options.autoscaler.enabled:
            self.autoscaler = AutoscaleController(options.autoscaler, self.load_sample,
                                                  self.add_replica, self.remove_replica)
            self._autoscaling = asyncio.get_running_loop().create_task(self.autoscaler.run())
        return self.address

    async def _start_coordinator(self):
        """One more coordinator actor: its address and how to ask for it again. Named per
        server (several servers may share one Ray cluster and namespace)."""
        name = f"pagedserve-coordinator-{self.instance}-{next(self._replica_numbers)}"
        # Shielded: a stop() during the start waits for it and stops what it started.
        starting = asyncio.ensure_future(asyncio.to_thread(
            start_coordinator, self.config, name,
            max_restarts=self.options.max_coordinator_restarts))
        self._starting.add(starting)
        starting.add_done_callback(self._starting.discard)
        handle = await asyncio.shield(starting)
        self.coordinators.append(handle)
        host = self._coordinator_host
        # A restarted coordinator serves again on a port of its own choosing.
        return (await handle.serve_grpc.remote(host),
                lambda: handle.serve_grpc.remote(host))

    def serving(self) -> list[ReplicaClient]:
        """The replicas taking new requests (not draining)."""
        return [replica for replica in self.gateway.replicas if not replica.draining]

    def load_sample(self) -> LoadSample:
        """The serving replicas' load now, for the autoscaler."""
        serving = self.serving()
        return LoadSample(time.monotonic(), tuple(r.in_flight for r in serving),
                          tuple(r.stats.kv_blocks_used / r.stats.kv_blocks_total
                                if r.stats is not None and r.stats.kv_blocks_total else 0.0
                                for r in serving))

    async def add_replica(self) -> ReplicaClient:
        """Start one more replica (coordinator, workers, placement group) and route to it."""
        address, resolve = await self._start_coordinator()
        try:
            return await self.gateway.add_replica(
                address, resolve if self.options.max_coordinator_restarts else None)
        except BaseException:
            await asyncio.to_thread(stop_coordinator, self.coordinators.pop())
            raise

    async def remove_replica(self, index: int) -> None:
        """Drain serving replica `index` (nothing new routed; its requests finish), then
        remove it and stop its coordinator."""
        replica = self.serving()[index]
        await self.gateway.drain(replica)
        position = self.gateway.replicas.index(replica)
        await self.gateway.remove_replica(replica)
        handle = self.coordinators.pop(position)
        await asyncio.to_thread(stop_coordinator, handle)

    async def stop(self, grace_s: float = 5.0) -> None:
        import ray

        for task in (self._autoscaling, self._discovering):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.discovery is not None:
            await self.discovery.close()
        for starting in list(self._starting):  # a replica start the autoscaler left running
            with contextlib.suppress(Exception):
                handle = await starting
                if handle not in self.coordinators:
                    self.coordinators.append(handle)
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
