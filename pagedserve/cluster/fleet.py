"""`pagedserve serve --role fleet`: the replicas, shared by any number of `--role gateway`
processes.

Each replica is a coordinator started as a named detached Ray actor in FLEET_NAMESPACE
(`fleet_discovery.replica_actor_name`), so gateways find it by name and it outlives whichever
gateway dies; its workers and placement group are owned by it. A fleet that starts where
replicas of its model are already running (its previous process died) adopts them. The
autoscaler runs here on the coordinators' own reports (GetLoad: requests running or waiting,
KV-cache use), since no one gateway sees all the traffic. Scale-down drains the coordinator
(it refuses new requests; gateways see it draining at their next poll), then stops it.
`stop()` stops every coordinator: the fleet's end is the service's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from pagedserve.cluster.autoscaler import AutoscaleController, LoadSample
from pagedserve.cluster.coordinator import start_coordinator, stop_coordinator
from pagedserve.cluster.fleet_discovery import (
    FLEET_NAMESPACE,
    fleet_replica_names,
    list_named_actors,
    replica_actor_name,
    replica_number,
)
from pagedserve.cluster.grpc_common import CHANNEL_OPTIONS
from pagedserve.cluster.ray_startup import start_ray
from pagedserve.protos.v1 import coordinator_pb2_grpc
from pagedserve.protos.v1 import generation_pb2 as pb

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 600.0
"""How long a replica scaled down may take to finish its requests before it is stopped."""
LOAD_TIMEOUT_S = 5.0
"""How long the autoscaler waits for one coordinator's GetLoad."""


def load_sample_from(loads: list[pb.ServerLoad | None], now: float) -> LoadSample:
    """The autoscaler's sample from the serving coordinators' GetLoad answers (None: it did
    not answer, counted as idle): queue depth is what runs or waits there."""
    return LoadSample(now, tuple(load.num_running + load.num_waiting if load else 0
                                 for load in loads),
                      tuple(load.kv_blocks_used / load.kv_blocks_total
                            if load and load.kv_blocks_total else 0.0 for load in loads))


@dataclass
class FleetReplica:
    """One coordinator of the fleet."""

    name: str
    handle: Any
    address: str
    channel: grpc.aio.Channel
    draining: bool = False


class Fleet:
    """The named coordinators of one model, and the autoscaler over them."""

    def __init__(self, config: Any, options: Any, model_name: str,
                 namespace: str = FLEET_NAMESPACE) -> None:
        self.config = config
        self.options = options
        self.model_name = model_name
        self.namespace = namespace
        self.replicas: list[FleetReplica] = []
        self.autoscaler: AutoscaleController | None = None
        self._autoscaling: asyncio.Task | None = None
        self._next_number = 0
        self._starting: set[asyncio.Future] = set()
        self._host: str | None = None
        self._started_ray = False

    async def start(self) -> None:
        import ray

        if not ray.is_initialized():
            await asyncio.to_thread(start_ray, address=self.options.ray_address,
                                    namespace=self.namespace, logging_level=logging.WARNING)
            self._started_ray = self.options.ray_address is None
        # Joined clusters: None lets each coordinator bind its own node's address.
        self._host = "127.0.0.1" if self._started_ray else None
        await self._adopt()
        while len(self.replicas) < self.options.replicas:
            await self.add_replica()
        scaling = self.options.autoscaler
        if scaling is not None and scaling.enabled:
            self.autoscaler = AutoscaleController(scaling, self.load_sample, self.add_replica,
                                                  self.remove_replica)
            self._autoscaling = asyncio.get_running_loop().create_task(self.autoscaler.run())

    async def _adopt(self) -> None:
        """Take over the replicas of this model a previous fleet process left running."""
        import ray

        listed = await asyncio.to_thread(list_named_actors)
        for name in fleet_replica_names(listed, self.model_name, self.namespace):
            self._next_number = max(self._next_number,
                                    replica_number(name, self.model_name) + 1)
            try:
                handle = await asyncio.to_thread(ray.get_actor, name, self.namespace)
                address = await handle.serve_grpc.remote(self._host)
            except (ValueError, ray.exceptions.RayError) as error:
                logger.warning("fleet: cannot adopt %s: %r", name, error)
                continue
            self.replicas.append(self._replica(name, handle, address))
            logger.info("fleet: adopted %s at %s", name, address)

    @staticmethod
    def _replica(name: str, handle: Any, address: str) -> FleetReplica:
        return FleetReplica(name, handle, address,
                            grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))

    def serving(self) -> list[FleetReplica]:
        return [replica for replica in self.replicas if not replica.draining]

    async def load_sample(self) -> LoadSample:
        """The serving coordinators' load as they report it (GetLoad)."""
        serving = self.serving()
        loads = await asyncio.gather(*(self._load(r) for r in serving))
        return load_sample_from(list(loads), time.monotonic())

    async def _load(self, replica: FleetReplica) -> pb.ServerLoad | None:
        stub = coordinator_pb2_grpc.CoordinatorStub(replica.channel)
        try:
            return await stub.GetLoad(pb.GetServerLoadRequest(), timeout=LOAD_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            logger.warning("fleet: GetLoad of %s failed: %s", replica.name, error.code().name)
        await self._reconnect(replica)
        return None

    async def _reconnect(self, replica: FleetReplica) -> None:
        """Follow a coordinator Ray restarted (it serves again on a new port once asked)."""
        import ray

        try:
            address = await asyncio.wait_for(replica.handle.serve_grpc.remote(self._host),
                                             LOAD_TIMEOUT_S)
        except (TimeoutError, ray.exceptions.RayError) as error:
            logger.warning("fleet: %s does not answer: %r", replica.name, error)
            return
        if address != replica.address:
            await replica.channel.close()
            replica.address = address
            replica.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)

    async def add_replica(self) -> FleetReplica:
        """Start one more named detached coordinator (its workers, its placement group)."""
        name = replica_actor_name(self.model_name, self._next_number)
        self._next_number += 1
        # Shielded: a stop() during the start waits for it and stops what it started.
        starting = asyncio.ensure_future(asyncio.to_thread(
            start_coordinator, self.config, name,
            max_restarts=self.options.max_coordinator_restarts,
            lifetime="detached", namespace=self.namespace))
        self._starting.add(starting)
        starting.add_done_callback(self._starting.discard)
        handle = await asyncio.shield(starting)
        try:
            address = await handle.serve_grpc.remote(self._host)
        except BaseException:
            await asyncio.to_thread(stop_coordinator, handle)
            raise
        replica = self._replica(name, handle, address)
        self.replicas.append(replica)
        logger.info("fleet: started %s at %s", name, address)
        return replica

    async def remove_replica(self, index: int) -> None:
        """Drain serving replica `index` (it refuses new requests, its requests finish), then
        stop it."""
        replica = self.serving()[index]
        replica.draining = True
        await replica.handle.drain.remote(DRAIN_TIMEOUT_S)
        await self._stop(replica)

    async def _stop(self, replica: FleetReplica) -> None:
        self.replicas.remove(replica)
        await replica.channel.close()
        await asyncio.to_thread(stop_coordinator, replica.handle)
        logger.info("fleet: stopped %s", replica.name)

    async def stop(self) -> None:
        import ray

        if self._autoscaling is not None:
            self._autoscaling.cancel()
            await asyncio.gather(self._autoscaling, return_exceptions=True)
        for starting in list(self._starting):  # a replica start the autoscaler left running
            with contextlib.suppress(Exception):
                handle = await starting
                if all(handle != r.handle for r in self.replicas):
                    await asyncio.to_thread(stop_coordinator, handle)
        for replica in list(self.replicas):
            await self._stop(replica)
        if self._started_ray and ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)
