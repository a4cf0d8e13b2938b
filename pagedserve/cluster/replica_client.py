"""One replica (its coordinator) as a gateway sees it: a channel, a Subscribe stream that
brings every step's updates of this gateway's requests and the replica's engine snapshot, its
GPU telemetry as last asked, and the unary calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.cluster.grpc_common import CHANNEL_OPTIONS
from pagedserve.protos.v1 import coordinator_pb2 as cpb
from pagedserve.protos.v1 import coordinator_pb2_grpc
from pagedserve.protos.v1 import generation_pb2 as pb

logger = logging.getLogger(__name__)

COORDINATOR_SERVICE = cpb.DESCRIPTOR.services_by_name["Coordinator"].full_name


RECONNECT_FIRST_DELAY_S = 0.5
RECONNECT_MAX_DELAY_S = 5.0
RECONNECT_TIMEOUT_S = 600.0
"""How long a lost replica is tried again (a restarted coordinator loads its model first)."""


class ReplicaClient:
    """A coordinator at `address`; `on_batch(self, StepBatch)` runs for every step batch,
    `on_lost(self, error)` each time the stream ends. With `resolve` (an awaitable giving the
    coordinator's address again: Ray restarts a dead coordinator on a new port), a lost replica
    is tried again with backoff and `on_back(self)` runs once it serves again."""

    def __init__(self, address: str, subscriber: str,
                 on_batch: Callable[[ReplicaClient, cpb.StepBatch], None],
                 on_lost: Callable[[ReplicaClient, BaseException], None],
                 label: str = "0",
                 resolve: Callable[[], Awaitable[str]] | None = None,
                 on_back: Callable[[ReplicaClient], None] | None = None) -> None:
        self.address = address
        self._resolve = resolve
        self._on_back = on_back
        self.label = label
        """The `replica` label of its metrics (its index in the gateway's list)."""
        self.subscriber = subscriber
        self._on_batch = on_batch
        self._on_lost = on_lost
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.up = False
        self.in_flight = 0
        """Requests the gateway has sent here that have not finished."""
        self.in_flight_tokens = 0
        """Their prompt tokens plus what they may still generate (router.request_cost)."""
        self.draining = False
        """Set by Gateway.drain: no new request comes here; the ones in flight finish."""
        self.drained = asyncio.Event()
        """Set once a draining replica has no request in flight."""
        self.model_info: pb.ModelInfo | None = None
        self.stats: cpb.EngineSnapshot | None = None
        """The engine snapshot of the latest batch (or of start-up)."""
        self.gpus: list[pb.GpuStats] = []
        """Its GPUs as `refresh_gpus` last read them."""
        self._task: asyncio.Task | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        await self._handshake(timeout_s)
        self._task = asyncio.get_running_loop().create_task(self._serve())
        self.up = True

    async def _handshake(self, timeout_s: float) -> None:
        self.model_info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                       timeout=timeout_s)
        self.stats = await self.stub.GetStats(cpb.GetStatsRequest(), timeout=timeout_s)

    async def _serve(self) -> None:
        while True:
            error = await self._subscribe()
            self.up = False
            logger.error("replica %s lost: %s", self.address, error)
            self._on_lost(self, error)
            if self._resolve is None or not await self._reconnect():
                return
            self.up = True
            logger.warning("replica %s serves again", self.address)
            if self._on_back is not None:
                self._on_back(self)

    async def _subscribe(self) -> BaseException:
        """Take step batches until the stream ends; why it ended."""
        call = self.stub.Subscribe(cpb.SubscribeRequest(subscriber=self.subscriber))
        try:
            async for batch in call:
                self.stats = batch.stats
                self._on_batch(self, batch)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as rpc_error:
            return rpc_error
        return ConnectionError("the coordinator ended the stream")

    async def _check_serving(self) -> None:
        """Raise unless its health service says SERVING (a coordinator that lost its ranks for
        good still answers, and refuses every request)."""
        health = health_pb2_grpc.HealthStub(self.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=COORDINATOR_SERVICE),
                                   timeout=10.0)
        statuses = health_pb2.HealthCheckResponse.ServingStatus
        if reply.status != statuses.Value("SERVING"):
            raise ConnectionError(f"its health is {statuses.Name(reply.status)}")

    async def _reconnect(self) -> bool:
        """Ask for the coordinator's address again (and connect) until it answers, with
        backoff, for at most RECONNECT_TIMEOUT_S; False if it never did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_TIMEOUT_S
        delay = RECONNECT_FIRST_DELAY_S
        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(2 * delay, RECONNECT_MAX_DELAY_S)
            try:
                address = await self._resolve()
                await self.channel.close()
                self.address = address
                self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
                await self._check_serving()
                await self._handshake(timeout_s=30.0)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # still restarting (or gone: tried until the deadline)
                logger.info("replica %s not back yet: %s", self.address, error)
                continue
            return True
        return False

    def release(self, tokens: int) -> None:
        """One request (of `tokens`, its request_cost) left this replica."""
        self.in_flight -= 1
        self.in_flight_tokens -= tokens
        if self.draining and self.in_flight == 0:
            self.drained.set()

    async def add(self, requests: list[cpb.CoreRequest], timeout_s: float = 30.0) -> None:
        await self.stub.AddRequests(cpb.AddRequestsRequest(subscriber=self.subscriber,
                                                           requests=requests),
                                    timeout=timeout_s)

    async def abort(self, request_ids: list[str]) -> None:
        await self.stub.AbortRequests(pb.AbortRequest(request_ids=request_ids), timeout=10.0)

    async def load(self) -> pb.ServerLoad:
        return await self.stub.GetLoad(pb.GetServerLoadRequest(), timeout=10.0)

    async def refresh_gpus(self, timeout_s: float = 10.0) -> None:
        """Read its GPUs again; a failed read keeps the last one (the stream notices a lost
        replica)."""
        try:
            telemetry = await self.stub.GetGpuTelemetry(cpb.GetGpuTelemetryRequest(),
                                                        timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            logger.warning("GPU telemetry of replica %s failed: %s", self.address,
                           error.details())
            return
        self.gpus = list(telemetry.gpus)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.up = False
        await self.channel.close()
