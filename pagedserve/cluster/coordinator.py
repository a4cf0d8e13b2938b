"""The coordinator: one replica's engine core inside a Ray actor, stepping while requests come.

One coordinator per replica, on a CPU: it makes its replica's placement group and tensor-
parallel worker actors, owns the block tables and the scheduler (the core), and runs its step
loop: steps back to back while any request is in flight, asleep on a condition (no polling) when
none is.

Two threads share the work. The actor's asyncio event loop serves the callers: `add_request`
and `abort_request` from many of them while steps run, and the output streams, once per step
per request (`generate`) or for every request of one subscriber in one batch (`submit` +
`stream`, what a gateway uses). A step thread runs the steps: schedule, dispatch to the ranks,
complete. The core is touched under one lock, held for scheduling and completing a step but
not while the ranks work, so requests are added and aborted during a step (a request aborted
then is skipped when the step's tokens come back).

`Coordinator` is the actor's face; it owns the step thread (`StepLoop`, step_loop.py), the
streams (`OutputStreams`, output_streams.py) and what it reports (`ReplicaReport`).

It never imports torch: the ranks build their workers inside their own actor processes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from pagedserve.cluster.coordinator_process import quiet_ray_logs, tune_collector
from pagedserve.cluster.coordinator_server import SERVICE as COORDINATOR_SERVICE
from pagedserve.cluster.coordinator_server import start_coordinator_server
from pagedserve.cluster.grpc_common import set_serving
from pagedserve.cluster.output_streams import (
    UNSUBSCRIBED_GRACE_S,
    OutputStreams,
    Stream,
    StreamItem,
    num_sequences,
    until_end,
)
from pagedserve.cluster.placement import remove_actor_groups
from pagedserve.cluster.ray_startup import ensure_ray
from pagedserve.cluster.replica_report import ReplicaReport
from pagedserve.cluster.step_loop import StepLoop, start_core
from pagedserve.config import EngineConfig
from pagedserve.engine.core import EngineCoreRequest, EngineStats
from pagedserve.errors import InvalidArgument, Unavailable
from pagedserve.executor.ray import shorten_gil_switch_interval
from pagedserve.metrics.coordinator_metrics import EngineSnapshot, RequestTimer, StepRecorder
from pagedserve.metrics.gpu import GpuReading

logger = logging.getLogger(__name__)


class Coordinator:
    """The actor body; start it with `start_coordinator`. See the module docstring."""

    def __init__(self, config: EngineConfig,
                 unsubscribed_grace_s: float = UNSUBSCRIBED_GRACE_S) -> None:
        if config.model is None:
            raise InvalidArgument("Coordinator needs EngineConfig.model (a checkpoint "
                                  "directory on the cluster's nodes)")
        shorten_gil_switch_interval()
        quiet_ray_logs()
        self.core = start_core(config)
        self.config = config
        self.request_timer = RequestTimer()
        self._outputs = OutputStreams(self.request_timer, self._abort, unsubscribed_grace_s)
        self._lock = threading.Lock()
        self._steps = StepLoop(self.core, config, self._lock, self._outputs,
                               self.request_timer, self._set_health, self._fail_everything)
        self._accepting = True
        self._server = None
        self._server_starting = asyncio.Lock()  # one server even when two callers race
        self._health = None
        self.grpc_address: str | None = None
        self._report = ReplicaReport(self.core, config, self._lock, self._steps, self._outputs)
        tune_collector()

    # ---- what the step thread keeps (read here, by the gRPC service and by tests) -------------

    @property
    def failure(self) -> BaseException | None:
        return self._steps.failure

    @property
    def step_recorder(self) -> StepRecorder:
        return self._steps.step_recorder

    @property
    def _subscribers(self) -> dict[str, asyncio.Queue]:
        return self._outputs.subscribers

    # ---- requests in ------------------------------------------------------------------------

    def _check_serving(self) -> None:
        if self.failure is not None:
            raise Unavailable(f"this replica stopped serving after: {self.failure}")
        if not self._accepting:
            raise Unavailable("this replica is draining or shut down; send the request to "
                              "another replica")

    def _add_locked(self, request: EngineCoreRequest, stream: Stream) -> None:
        self._check_serving()
        self.core.add_request(request)
        # Before the step thread can schedule it (it needs this lock).
        self.request_timer.added(request.request_id)
        self._steps.wake()
        self._outputs.streams[request.request_id] = stream

    async def generate(self, request: EngineCoreRequest) -> AsyncIterator[StreamItem]:
        """Add a request and yield its updates once per step (a list of SequenceUpdate), or
        for beam search its one BeamSearchOutput; raises when the replica fails. A Ray caller
        that stops early must `ray.cancel` the stream (or call abort_request): Ray does not
        close an actor's generator when the caller merely drops it."""
        queue: asyncio.Queue = asyncio.Queue()
        stream = Stream(num_sequences(request), queue=queue)
        with self._lock:
            self._add_locked(request, stream)
        self._steps.start()
        try:
            async for item in until_end(queue):
                yield item
        finally:
            # The caller went away (or the request ended): nothing may keep its blocks.
            if request.request_id in self._outputs.streams:
                self._abort(request.request_id)

    async def submit(self, requests: list[EngineCoreRequest], subscriber: str) -> None:
        """Add requests whose updates go to `stream(subscriber)`, batched per step. If one is
        refused, those of this call queued before it are aborted and the error is raised."""
        self._outputs.subscriber_queue(subscriber)
        added = []
        try:
            # One lock hold for the whole call: the step thread schedules all of them or none.
            with self._lock:
                for request in requests:
                    self._add_locked(request, Stream(num_sequences(request),
                                                     subscriber=subscriber))
                    added.append(request.request_id)
        except BaseException:
            for request_id in added:
                self._abort(request_id)
            raise
        self._steps.start()
        self._outputs.watch_for_orphans(subscriber)

    async def stream(self, subscriber: str) -> AsyncIterator[list[tuple[str, StreamItem]]]:
        """Per step, the (request id, item) of every request of `subscriber` that changed: its
        updates, a beam search's output, or RequestFailed; an aborted request ends with an
        update whose finish_reason is 'abort'. However the stream ends (its gateway closed it,
        died, or its connection was lost: grpc cancels the call), the subscriber's requests
        are aborted: nobody is left to receive them."""
        queue = self._outputs.start_streaming(subscriber)
        try:
            async for item in until_end(queue):
                yield item
        finally:
            self._outputs.stop_streaming(subscriber)

    async def abort_request(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at once and its stream ends with 'abort'."""
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self.core.abort_request(request_id)
        self._outputs.aborted(request_id)

    # ---- the replica's health, as the step thread sees it -------------------------------------

    def _set_health(self, serving: bool) -> None:
        if self._health is not None:
            asyncio.run_coroutine_threadsafe(
                set_serving(self._health, [COORDINATOR_SERVICE], serving), self._steps.loop)

    def _fail_everything(self, error: BaseException) -> None:
        """The ranks are gone: every stream ends with the error; the replica is unhealthy."""
        logger.error("replica failed: %s", error)
        if self._health is not None:
            asyncio.ensure_future(set_serving(self._health, [COORDINATOR_SERVICE], False))
        self._outputs.end_all(error)

    # ---- state, drain, shutdown ---------------------------------------------------------------

    async def serve_grpc(self, host: str | None = "127.0.0.1", port: int = 0) -> str:
        """Start the internal gRPC server (gateways connect to it); returns its address.
        `host` None: this actor's node address, reachable from the rest of the cluster."""
        if host is None:
            host = ensure_ray().util.get_node_ip_address()
        async with self._server_starting:
            if self._server is None:
                self._server, self.grpc_address, self._health = await start_coordinator_server(
                    self, host, port)
        return self.grpc_address

    async def health(self) -> dict[str, Any]:
        """Whether this replica serves, why not, and its latest stats."""
        return self._report.health(self._accepting)

    async def step_log(self) -> list[tuple[float, ...]]:
        """`recent_steps`, oldest first."""
        return self._report.step_log()

    async def stats(self) -> EngineStats:
        return self._report.stats()

    async def engine_snapshot(self) -> EngineSnapshot:
        """What every Subscribe batch carries: the latest stats and the step histogram."""
        return self._report.engine_snapshot()

    async def gpu_telemetry(self) -> list[tuple[int, GpuReading]]:
        """(rank, reading) of each GPU of this replica's ranks, read at most
        GPU_TELEMETRY_TTL_S ago; none on CPU, without NVML, or once the ranks are gone."""
        return await self._report.gpu_telemetry()

    async def model_info(self) -> dict[str, Any]:
        return self._report.model_info()

    async def free_blocks(self) -> int:
        """KV blocks not referenced by any request (tests check it returns to its start)."""
        return self._report.free_blocks()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new requests and wait until those in flight are done; True if they are."""
        self._accepting = False
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._outputs.streams and self.failure is None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return not self._outputs.streams

    async def shutdown(self) -> None:
        """End every stream (Unavailable), stop the loop and the worker actors."""
        self._accepting = False
        error = Unavailable("the replica shut down; retry on another replica")
        self._steps.stop()
        self._outputs.end_all(error)
        await self._steps.join()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        self.core.shutdown()


def start_coordinator(config: EngineConfig, name: str | None = None,
                      num_cpus: float = 1.0, max_restarts: int = 0,
                      unsubscribed_grace_s: float = UNSUBSCRIBED_GRACE_S,
                      lifetime: str | None = None, namespace: str | None = None) -> Any:
    """A coordinator actor for `config` (Ray started or joined first), ready to take requests;
    Ray starts it again (new ranks, no requests, its gRPC server off until `serve_grpc`) up to
    `max_restarts` times if its process dies. Requests of a subscriber that does not stream
    for `unsubscribed_grace_s` are aborted. `lifetime="detached"` (with a `name`, in
    `namespace`) outlives the process that started it (the fleet role). Stop it with
    `stop_coordinator`."""
    ray = ensure_ray()
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_concurrency": 10_000,
                               "max_restarts": max_restarts}
    if name is not None:
        options["name"] = name
    if lifetime is not None:
        options["lifetime"] = lifetime
    if namespace is not None:
        options["namespace"] = namespace
    handle = ray.remote(Coordinator).options(**options).remote(config, unsubscribed_grace_s)
    ray.get(handle.health.remote())  # surfaces a failed start-up (bad config, no GPUs) here
    return handle


def stop_coordinator(handle: Any, timeout_s: float = 30.0) -> None:
    """Shut the coordinator down (its workers and placement group go with it), then the actor."""
    import ray

    try:
        ray.get(handle.shutdown.remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError as error:  # it died before: only its group is left
        logger.warning("coordinator already gone: %s", error)
    finally:
        ray.kill(handle)
        # Only once the actor is dead can no incarnation of it make another group.
        _wait_until_dead(ray, handle, timeout_s)
        remove_actor_groups(handle._actor_id.hex())


def _wait_until_dead(ray: Any, handle: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=1.0)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue  # an incarnation still starting: the kill reaches it next
        time.sleep(0.05)
    logger.warning("coordinator still alive %.0f s after it was killed", timeout_s)
