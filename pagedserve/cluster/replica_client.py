"""One replica (its coordinator) as a gateway sees it: a channel, a Subscribe stream that
brings every step's updates of this gateway's requests and the replica's engine snapshot, its
GPU telemetry as last asked, and the unary calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from pagedserve.cluster.grpc_common import CHANNEL_OPTIONS
from pagedserve.protos.v1 import coordinator_pb2 as cpb
from pagedserve.protos.v1 import coordinator_pb2_grpc
from pagedserve.protos.v1 import generation_pb2 as pb

logger = logging.getLogger(__name__)


class ReplicaClient:
    """A coordinator at `address`; `on_batch(self, StepBatch)` runs for every step batch,
    `on_lost(self, error)` once when the stream ends for good."""

    def __init__(self, address: str, subscriber: str,
                 on_batch: Callable[[ReplicaClient, cpb.StepBatch], None],
                 on_lost: Callable[[ReplicaClient, BaseException], None],
                 label: str = "0") -> None:
        self.address = address
        self.label = label
        """The `replica` label of its metrics (its index in the gateway's list)."""
        self.subscriber = subscriber
        self._on_batch = on_batch
        self._on_lost = on_lost
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.up = False
        self.in_flight = 0
        self.model_info: pb.ModelInfo | None = None
        self.stats: cpb.EngineSnapshot | None = None
        """The engine snapshot of the latest batch (or of start-up)."""
        self.gpus: list[pb.GpuStats] = []
        """Its GPUs as `refresh_gpus` last read them."""
        self._task: asyncio.Task | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        self.model_info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                       timeout=timeout_s)
        self.stats = await self.stub.GetStats(cpb.GetStatsRequest(), timeout=timeout_s)
        self._task = asyncio.get_running_loop().create_task(self._subscribe())
        self.up = True

    async def _subscribe(self) -> None:
        call = self.stub.Subscribe(cpb.SubscribeRequest(subscriber=self.subscriber))
        try:
            async for batch in call:
                self.stats = batch.stats
                self._on_batch(self, batch)
            error: BaseException = ConnectionError("the coordinator ended the stream")
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as rpc_error:
            error = rpc_error
        self.up = False
        logger.error("replica %s lost: %s", self.address, error)
        self._on_lost(self, error)

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
