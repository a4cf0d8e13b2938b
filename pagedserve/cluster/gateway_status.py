"""What the gateway reports about the served system beyond single requests: GetServerStatus
(`pagedserve status`: each replica's load and GPUs, the recent throughput) and the periodic
reading of the replicas' GPU telemetry that the metrics and the status show."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from pagedserve.cluster.replica_client import ReplicaClient
from pagedserve.protos.v1 import generation_pb2 as pb

logger = logging.getLogger(__name__)

GPU_REFRESH_INTERVAL_S = 5.0
"""How often the gateway reads its replicas' GPUs (NVML values change on that scale)."""
SUMMED_LOAD_FIELDS = ("num_running", "num_waiting", "num_swapped", "num_requests",
                      "kv_blocks_used", "kv_blocks_total", "num_preemptions_total")


async def refresh_gpus(replicas: Sequence[ReplicaClient],
                       interval_s: float = GPU_REFRESH_INTERVAL_S) -> None:
    """Read every up replica's GPUs now and then every `interval_s`, until cancelled. A scrape
    reads the last values and so never waits on a replica."""
    while True:
        await asyncio.gather(*(replica.refresh_gpus() for replica in replicas if replica.up))
        await asyncio.sleep(interval_s)


async def server_status(gateway: Any) -> pb.ServerStatus:
    """The ServerStatus of `gateway` (a cluster.gateway.Gateway): each replica's load as its
    coordinator reports it now, its GPUs as last read, and the totals."""
    replicas: list[ReplicaClient] = gateway.replicas
    limit = gateway.max_queue_per_replica
    up = [replica for replica in replicas if replica.up]
    loads = dict(zip(up, await asyncio.gather(*(replica.load() for replica in up)),
                     strict=True))
    status = pb.ServerStatus(model=gateway.model_name,
                             load=pb.ServerLoad(gateway_queue_limit=limit * len(replicas)))
    total = status.load
    for replica in replicas:
        load = pb.ServerLoad(gateway_in_flight=replica.in_flight, gateway_queue_limit=limit)
        if replica in loads:
            load.MergeFrom(loads[replica])
            load.num_replicas_up = 1
        status.replicas.append(pb.ReplicaStatus(index=int(replica.label),
                                                address=replica.address, up=replica.up,
                                                load=load, gpus=replica.gpus))
        total.gateway_in_flight += replica.in_flight
        total.num_replicas_up += load.num_replicas_up
        for name in SUMMED_LOAD_FIELDS:
            setattr(total, name, getattr(total, name) + getattr(load, name))
    if total.kv_blocks_total:
        total.kv_cache_usage = total.kv_blocks_used / total.kv_blocks_total
    throughput = gateway.metrics.requests.throughput()
    status.throughput_window_seconds = throughput.window_seconds
    status.prompt_tokens_per_second = throughput.prompt_tokens_per_second
    status.generation_tokens_per_second = throughput.generation_tokens_per_second
    status.requests_per_second = throughput.requests_per_second
    return status
