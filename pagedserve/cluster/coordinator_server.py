"""The coordinator's internal gRPC server (grpc.aio, on the coordinator actor's event loop).

It speaks token ids with gateways (protos/pagedserve/protos/v1/coordinator.proto): requests
added under a subscriber name, one Subscribe stream per gateway carrying the updates of all its
requests once per step (with the step's time, first-token timings and the engine snapshot),
aborts, load, model info, engine stats and GPU telemetry; plus grpc.health.v1 and reflection.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from pagedserve.cluster import wire
from pagedserve.cluster.grpc_common import (
    SERVER_OPTIONS,
    add_health_and_reflection,
    add_servicer,
    set_serving,
    status_of,
)
from pagedserve.cluster.wire import RequestFailed, StepDelivery
from pagedserve.engine.beam_search import BeamSearchOutput
from pagedserve.errors import PagedServeError
from pagedserve.protos.v1 import coordinator_pb2 as cpb
from pagedserve.protos.v1 import coordinator_pb2_grpc
from pagedserve.protos.v1 import generation_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE = cpb.DESCRIPTOR.services_by_name["Coordinator"].full_name


def load_to_proto(stats: Any) -> pb.ServerLoad:
    return pb.ServerLoad(
        num_running=stats.num_running, num_waiting=stats.num_waiting,
        num_swapped=stats.num_swapped, num_requests=stats.num_requests,
        kv_blocks_used=stats.kv_blocks_used, kv_blocks_total=stats.kv_blocks_total,
        kv_cache_usage=stats.kv_cache_usage, num_preemptions_total=stats.num_preemptions)


def model_info_to_proto(info: dict[str, Any]) -> pb.ModelInfo:
    return pb.ModelInfo(
        model=info["model"], max_model_len=info["max_model_len"],
        vocab_size=info["vocab_size"], eos_token_ids=info["eos_token_ids"],
        tensor_parallel_size=info["tensor_parallel_size"], block_size=info["block_size"],
        num_kv_blocks=info["num_gpu_blocks"], dtype=info["dtype"],
        max_num_seqs=info["max_num_seqs"], num_replicas=1,
        kv_cache_dtype=info["kv_cache_dtype"],
        kv_cache_capacity_tokens=info["kv_cache_capacity_tokens"])


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    """The Coordinator service over one `Coordinator` object (same process, same loop)."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator

    async def AddRequests(self, request, context):
        try:
            requests = [wire.core_request_from_proto(r) for r in request.requests]
            await self.coordinator.submit(requests, request.subscriber)
        except PagedServeError as error:
            await context.abort(status_of(error), str(error))
        return cpb.AddRequestsResponse()

    async def Subscribe(self, request, context):
        try:
            async for batch in self.coordinator.stream(request.subscriber):
                message = _batch_to_proto(batch)
                message.stats.CopyFrom(wire.snapshot_to_proto(
                    self.coordinator.step_recorder.snapshot()))
                yield message
        except PagedServeError as error:
            await context.abort(status_of(error), str(error))

    async def AbortRequests(self, request, context):
        for request_id in request.request_ids:
            await self.coordinator.abort_request(request_id)
        return pb.AbortResponse(aborted_request_ids=request.request_ids)

    async def GetLoad(self, request, context):
        return load_to_proto(await self.coordinator.stats())

    async def GetModelInfo(self, request, context):
        return model_info_to_proto(await self.coordinator.model_info())

    async def GetStats(self, request, context):
        return wire.snapshot_to_proto(await self.coordinator.engine_snapshot())

    async def GetGpuTelemetry(self, request, context):
        return cpb.GpuTelemetry(gpus=[wire.gpu_to_proto(rank, reading) for rank, reading
                                      in await self.coordinator.gpu_telemetry()])


def _batch_to_proto(batch: list[tuple[str, Any]]) -> cpb.StepBatch:
    message = cpb.StepBatch()
    if isinstance(batch, StepDelivery):
        message.step_time = batch.step_time
        message.starts.extend(cpb.RequestStart(request_id=start.request_id,
                                               queue_seconds=start.queue_seconds,
                                               prefill_seconds=start.prefill_seconds)
                              for start in batch.starts)
    for _, item in batch:
        if isinstance(item, RequestFailed):
            message.failures.append(cpb.RequestFailure(
                request_id=item.request_id, status=status_of(item.error).name,
                message=str(item.error)))
        elif isinstance(item, BeamSearchOutput):
            message.beam_results.append(wire.beam_result_to_proto(item))
        else:
            message.updates.extend(wire.update_to_proto(update) for update in item)
    return message


async def start_coordinator_server(coordinator: Any, host: str,
                                   port: int = 0) -> tuple[grpc.aio.Server, str, Any]:
    """Serve `coordinator` on host:port (0: a port the OS picks); returns the server, the
    address it listens on, and its health servicer."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_servicer(coordinator_pb2_grpc.add_CoordinatorServicer_to_server,
                 CoordinatorServicer(coordinator), server)
    health = add_health_and_reflection(server, [SERVICE])
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"coordinator server could not bind {host}:{port}")
    await server.start()
    await set_serving(health, [SERVICE], True)
    address = f"{host}:{bound}"
    logger.info("coordinator serves gRPC on %s", address)
    return server, address, health
