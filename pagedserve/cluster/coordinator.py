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
then is skipped when the step's tokens come back). Measured on an H200 (bench/coordinator.py),
the step thread waiting on the ranks directly left a smaller gap between GPU steps than an
asyncio loop awaiting them, whose every step paid the hand-over of Ray's reply into the loop.

It never imports torch: the ranks build their workers inside their own actor processes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pagedserve.cluster.coordinator_server import SERVICE as COORDINATOR_SERVICE
from pagedserve.cluster.coordinator_server import start_coordinator_server
from pagedserve.cluster.grpc_common import set_serving
from pagedserve.cluster.placement import (
    ReplicaPlacement,
    ensure_ray,
    remove_actor_groups,
    resolve_device,
)
from pagedserve.cluster.wire import RequestFailed, StepDelivery
from pagedserve.config import EngineConfig
from pagedserve.engine.beam_search import BeamSearchOutput
from pagedserve.engine.core import (
    CoreStepError,
    EngineCore,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    SequenceUpdate,
)
from pagedserve.errors import (
    Internal,
    InvalidArgument,
    PagedServeError,
    Unavailable,
    WorkerFailure,
)
from pagedserve.executor.ray import RayExecutor, shorten_gil_switch_interval
from pagedserve.metrics.coordinator_metrics import EngineSnapshot, RequestTimer, StepRecorder
from pagedserve.metrics.gpu import GpuReading
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.scheduler.output import SchedulerOutput
from pagedserve.validation import check_type

logger = logging.getLogger(__name__)



StreamItem = list[SequenceUpdate] | BeamSearchOutput | RequestFailed
STEP_LOG_SIZE = 4096
GPU_TELEMETRY_TTL_S = 2.0
"""How long one reading of the ranks' GPUs answers gpu_telemetry (several gateways ask)."""
GPU_TELEMETRY_TIMEOUT_S = 5.0
UNSUBSCRIBED_GRACE_S = 10.0
"""How long requests of a subscriber that is not streaming are kept (a gateway's Subscribe
follows its first AddRequests within milliseconds; one that never comes is a dead gateway)."""


@dataclass
class _Stream:
    """Where one request's updates go: its own queue, or its subscriber's batch queue."""

    num_sequences: int
    queue: asyncio.Queue | None = None
    subscriber: str | None = None
    finished: set[int] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return len(self.finished) == self.num_sequences


class _End:
    """Queue sentinel: the stream is over (with an error, when `error` is set)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


async def _until_end(queue: asyncio.Queue) -> AsyncIterator[Any]:
    """The items of a stream's queue up to its _End (raising the _End's error, if any)."""
    while True:
        item = await queue.get()
        if isinstance(item, _End):
            if item.error is not None:
                raise item.error
            return
        yield item


class Coordinator:
    """The actor body; start it with `start_coordinator`. See the module docstring."""

    def __init__(self, config: EngineConfig,
                 unsubscribed_grace_s: float = UNSUBSCRIBED_GRACE_S) -> None:
        if config.model is None:
            raise InvalidArgument("Coordinator needs EngineConfig.model (a checkpoint "
                                  "directory on the cluster's nodes)")
        shorten_gil_switch_interval()
        executor = _start_ranks(config)
        try:
            self.core = EngineCore(config, executor)
            # An empty step builds the dispatch path (a compiled graph compiles on its first
            # step) now rather than in the first request's time to first token.
            executor.execute(SchedulerOutput())
        except BaseException:
            executor.shutdown()
            raise
        self.config = config
        self._streams: dict[str, _Stream] = {}
        self._subscribers: dict[str, asyncio.Queue] = {}
        self._streaming: set[str] = set()
        self.unsubscribed_grace_s = unsubscribed_grace_s
        self._orphan_checks: dict[str, asyncio.TimerHandle] = {}
        self.recent_steps: deque[tuple[float, ...]] = deque(maxlen=STEP_LOG_SIZE)
        """Per recent step: wall seconds, rank 0's seconds, sequences, then the seconds spent
        scheduling, dispatching and waiting, and completing, and the GPU's idle seconds."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._step_thread: threading.Thread | None = None
        self._accepting = True
        self.failure: BaseException | None = None
        self._restarts_left = config.max_worker_restarts
        self._needs_ranks = False
        """The ranks died and the requests wait, requeued, for new ones (see _replace_ranks)."""
        self.num_worker_restarts = 0
        self._server = None
        self._server_starting = asyncio.Lock()  # one server even when two callers race
        self._health = None
        self.grpc_address: str | None = None
        self.num_steps = 0
        self.last_stats = self.core.stats()
        self.step_recorder = StepRecorder(self.last_stats)
        self.request_timer = RequestTimer()
        self._gpu_readings: list[tuple[int, GpuReading]] = []
        self._gpu_read_at = float("-inf")

    # ---- requests in ------------------------------------------------------------------------

    def _start_loop(self) -> None:
        if self._step_thread is None:
            self._loop = asyncio.get_running_loop()
            self._step_thread = threading.Thread(target=self._run_steps, name="step-loop",
                                                 daemon=True)
            self._step_thread.start()

    def _check_serving(self) -> None:
        if self.failure is not None:
            raise Unavailable(f"this replica stopped serving after: {self.failure}")
        if not self._accepting:
            raise Unavailable("this replica is draining or shut down; send the request to "
                              "another replica")

    def _add(self, request: EngineCoreRequest, stream: _Stream) -> None:
        with self._lock:
            self._add_locked(request, stream)
        self._start_loop()

    def _add_locked(self, request: EngineCoreRequest, stream: _Stream) -> None:
        self._check_serving()
        self.core.add_request(request)
        # Before the step thread can schedule it (it needs this lock).
        self.request_timer.added(request.request_id)
        self._work.notify()
        self._streams[request.request_id] = stream

    @staticmethod
    def _num_sequences(request: EngineCoreRequest) -> int:
        params = request.params
        check_type("params", params, "SamplingParams or BeamSearchParams",
                   isinstance(params, SamplingParams | BeamSearchParams))
        return 1 if isinstance(params, BeamSearchParams) else params.n

    async def generate(self, request: EngineCoreRequest) -> AsyncIterator[StreamItem]:
        """Add a request and yield its updates once per step (a list of SequenceUpdate), or
        for beam search its one BeamSearchOutput; raises when the replica fails. A Ray caller
        that stops early must `ray.cancel` the stream (or call abort_request): Ray does not
        close an actor's generator when the caller merely drops it."""
        queue: asyncio.Queue = asyncio.Queue()
        self._add(request, _Stream(self._num_sequences(request), queue=queue))
        try:
            async for item in _until_end(queue):
                yield item
        finally:
            # The caller went away (or the request ended): nothing may keep its blocks.
            if request.request_id in self._streams:
                self._abort(request.request_id)

    async def submit(self, requests: list[EngineCoreRequest], subscriber: str) -> None:
        """Add requests whose updates go to `stream(subscriber)`, batched per step. If one is
        refused, those of this call queued before it are aborted and the error is raised."""
        self._subscriber_queue(subscriber)
        added = []
        try:
            # One lock hold for the whole call: the step thread schedules all of them or none.
            with self._lock:
                for request in requests:
                    self._add_locked(request, _Stream(self._num_sequences(request),
                                                      subscriber=subscriber))
                    added.append(request.request_id)
        except BaseException:
            for request_id in added:
                self._abort(request_id)
            raise
        self._start_loop()
        if subscriber not in self._streaming and subscriber not in self._orphan_checks:
            self._orphan_checks[subscriber] = asyncio.get_running_loop().call_later(
                self.unsubscribed_grace_s, self._drop_if_unsubscribed, subscriber)

    async def stream(self, subscriber: str) -> AsyncIterator[list[tuple[str, StreamItem]]]:
        """Per step, the (request id, item) of every request of `subscriber` that changed: its
        updates, a beam search's output, or RequestFailed; an aborted request ends with an
        update whose finish_reason is 'abort'. However the stream ends (its gateway closed it,
        died, or its connection was lost: grpc cancels the call), the subscriber's requests
        are aborted: nobody is left to receive them."""
        if subscriber in self._streaming:
            raise InvalidArgument(f"subscriber {subscriber!r} is already streaming")
        self._streaming.add(subscriber)
        queue = self._subscriber_queue(subscriber)
        try:
            async for item in _until_end(queue):
                yield item
        finally:
            self._streaming.discard(subscriber)
            del self._subscribers[subscriber]
            for request_id, stream in list(self._streams.items()):
                if stream.subscriber == subscriber:
                    self._abort(request_id)

    def _drop_if_unsubscribed(self, subscriber: str) -> None:
        """Abort the requests of a subscriber that added them but has not streamed for
        `unsubscribed_grace_s` (its gateway died between AddRequests and Subscribe, or after
        its stream ended): their blocks would be held for ever."""
        self._orphan_checks.pop(subscriber, None)
        if subscriber in self._streaming:
            return
        self._subscribers.pop(subscriber, None)
        orphans = [request_id for request_id, stream in self._streams.items()
                   if stream.subscriber == subscriber]
        if orphans:
            logger.warning("aborting %d requests of %s, which has not subscribed for %.0f s",
                           len(orphans), subscriber, self.unsubscribed_grace_s)
        for request_id in orphans:
            self._abort(request_id)

    def _subscriber_queue(self, subscriber: str) -> asyncio.Queue:
        """A subscriber's batch queue, made by its first submit or stream (either may come
        first: they are separate calls)."""
        queue = self._subscribers.get(subscriber)
        if queue is None:
            queue = self._subscribers[subscriber] = asyncio.Queue()
        return queue

    async def abort_request(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at once and its stream ends with 'abort'."""
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self.core.abort_request(request_id)
        self.request_timer.forget(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        final = [SequenceUpdate(request_id, index, finish_reason="abort")
                 for index in range(stream.num_sequences) if index not in stream.finished]
        self._send(request_id, stream, final)
        if stream.queue is not None:
            stream.queue.put_nowait(_End())

    # ---- the step loop ----------------------------------------------------------------------

    def _run_steps(self) -> None:
        """The step thread: one step after another while there is work (see the module
        docstring). A step's outputs go to the event loop, which owns the streams, only once
        the next step is on its way to the ranks: delivering them competes for the GIL, and
        while the ranks compute nothing waits for it."""
        core = self.core
        executor = core.executor
        undelivered: EngineCoreOutputs | None = None
        while True:
            if self._needs_ranks:
                if not self._replace_ranks():
                    return
                executor = core.executor
            with self._work:
                while not self._stopping and not core.has_unfinished_requests():
                    undelivered = self._hand_over(undelivered)
                    self._report_idle()
                    self._work.wait()
                if self._stopping:
                    return
                started = time.perf_counter()
                step = None
                try:
                    step = core.schedule()
                    scheduled = time.perf_counter()
                    self.request_timer.scheduled(step)
                    submitted = executor.submit(step)
                except Exception as error:
                    undelivered = self._hand_over(undelivered)
                    if self._handle_failure(step, error):
                        return
                    continue
            undelivered = self._hand_over(undelivered)
            try:
                result = executor.wait(submitted)
            except Exception as error:
                with self._lock:
                    if self._handle_failure(step, error):
                        return
                continue
            returned = time.perf_counter()
            with self._lock:
                undelivered = core.complete(step, result, started)
                self.step_recorder.observe_step(undelivered.stats)
            self.num_steps += 1
            self.last_stats = stats = undelivered.stats
            self.recent_steps.append((stats.step_seconds, stats.execute_seconds,
                                      len(step.scheduled), scheduled - started,
                                      returned - scheduled, time.perf_counter() - returned,
                                      stats.gpu_idle_seconds))

    def _report_idle(self) -> None:
        """Under the lock, in the step thread, with nothing left to run: record the idle
        state and send it to every subscriber, so that gauges fall back to zero (the last
        step's snapshot still counted requests that were aborted after it)."""
        self.step_recorder.set_state(self.core.stats())
        self._loop.call_soon_threadsafe(self._deliver_idle)

    def _deliver_idle(self) -> None:
        for queue in self._subscribers.values():
            queue.put_nowait(StepDelivery(step_time=time.monotonic()))

    def _hand_over(self, outputs: EngineCoreOutputs | None) -> None:
        """Give a step's outputs to the event loop for delivery (none: nothing to do); returns
        None, what the step thread then holds."""
        if outputs is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _handle_failure(self, step, error: Exception) -> bool:
        """Under the lock, in the step thread: abort what the failure touched and tell the
        event loop, or, for lost ranks while restarts are left, requeue every request for new
        ranks. True when the replica is lost (the step thread then ends)."""
        if isinstance(error, WorkerFailure) and self._restarts_left > 0:
            logger.error("%s; requeueing %d requests for new ranks", error,
                         self.core.num_requests)
            self.core.requeue_for_new_ranks()
            self._needs_ranks = True
            self._set_health(False)
            return False
        if isinstance(error, WorkerFailure) and self.config.max_worker_restarts > 0:
            return self._lose_replica(self._restarts_spent(error))
        try:
            if step is None:
                raise error
            self.core.fail_step(step, error)
        except CoreStepError as failed:
            cause = failed.__cause__
            if isinstance(cause, WorkerFailure):
                return self._lose_replica(cause)
            logger.error("step failed (%s); its requests were aborted", cause)
            self._loop.call_soon_threadsafe(self._deliver,
                                            EngineCoreOutputs(updates=failed.updates))
        except WorkerFailure as lost:
            return self._lose_replica(lost)
        except PagedServeError as other:  # e.g. the KV cache cannot hold a waiting request
            logger.error("step could not run: %s", other)
            self.core.abort_all()
            self._loop.call_soon_threadsafe(self._fail_all_streams, other)
        except Exception as bug:
            logger.exception("step loop failed")
            return self._lose_replica(Internal(f"the step loop failed ({bug!r}); this "
                                               "replica stopped serving"))
        return False

    def _replace_ranks(self) -> bool:
        """In the step thread, without the lock (loading weights takes a while; requests keep
        arriving and may be aborted meanwhile): new ranks in a new placement group, until one
        set starts or the restarts run out (then the replica is lost; returns False)."""
        while self._restarts_left > 0:
            self._restarts_left -= 1
            began = time.monotonic()
            try:
                executor = _start_ranks(self.config)
                try:
                    with self._lock:
                        self.core.attach_ranks(executor)
                    executor.execute(SchedulerOutput())  # builds the dispatch path
                except BaseException:
                    executor.shutdown()
                    raise
            except Exception as error:
                logger.error("new ranks failed to start: %s", error)
                continue
            self._needs_ranks = False
            self.num_worker_restarts += 1
            self._set_health(True)
            logger.warning("new ranks ready in %.1f s; %d restarts left",
                           time.monotonic() - began, self._restarts_left)
            return True
        with self._lock:
            return self._lose_replica(self._restarts_spent(None))

    def _restarts_spent(self, error: BaseException | None) -> Unavailable:
        spent = Unavailable(
            f"tensor-parallel workers failed and {self.config.max_worker_restarts} restarts did "
            f"not bring them back (EngineConfig.max_worker_restarts){f': {error}' if error else ''}"
            "; this replica stopped serving, retry on another one")
        spent.__cause__ = error
        return spent

    def _set_health(self, serving: bool) -> None:
        if self._health is not None:
            asyncio.run_coroutine_threadsafe(
                set_serving(self._health, [COORDINATOR_SERVICE], serving), self._loop)

    def _lose_replica(self, error: BaseException) -> bool:
        self.failure = error
        self.core.abort_all()
        self._loop.call_soon_threadsafe(self._fail_everything, error)
        return True

    def _fail_all_streams(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._fail_stream(request_id, error)

    def _fail_everything(self, error: BaseException) -> None:
        """The ranks are gone: every stream ends with the error; the replica is unhealthy."""
        logger.error("replica failed: %s", error)
        if self._health is not None:
            asyncio.ensure_future(set_serving(self._health, [COORDINATOR_SERVICE], False))
        self._fail_all_streams(error)
        for queue in self._subscribers.values():
            queue.put_nowait(_End(error))

    def _fail_stream(self, request_id: str, error: BaseException) -> None:
        """End a request with `error` (its caller sees the error's status, e.g. UNAVAILABLE,
        and may retry elsewhere), not with a finish reason."""
        self.request_timer.forget(request_id)
        stream = self._streams.pop(request_id)
        if stream.queue is not None:
            stream.queue.put_nowait(_End(error))
        else:
            self._send(request_id, stream, RequestFailed(request_id, error))

    def _deliver(self, outputs: EngineCoreOutputs) -> None:
        starts = self.request_timer.first_tokens(outputs)
        by_request: dict[str, list[SequenceUpdate]] = {}
        for update in outputs.updates:
            by_request.setdefault(update.request_id, []).append(update)
        batches: dict[str, list[tuple[str, StreamItem]]] = {}
        for request_id, updates in by_request.items():
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            for update in updates:
                if update.finished:
                    stream.finished.add(update.index)
            self._send(request_id, stream, updates, batches)
            if stream.done:
                self._end(request_id, stream)
        for beam_output in outputs.beam_outputs:
            stream = self._streams.get(beam_output.request_id)
            if stream is not None:
                stream.finished.add(0)
                self._send(beam_output.request_id, stream, beam_output, batches)
                self._end(beam_output.request_id, stream)
        for subscriber, batch in batches.items():
            self._subscribers[subscriber].put_nowait(StepDelivery(
                batch, outputs.timestamp,
                [starts[request_id] for request_id, _ in batch if request_id in starts]))

    def _send(self, request_id: str, stream: _Stream, item: StreamItem,
              batches: dict[str, list] | None = None) -> None:
        if stream.queue is not None:
            stream.queue.put_nowait(item)
        elif stream.subscriber in self._subscribers:
            if batches is None:
                self._subscribers[stream.subscriber].put_nowait([(request_id, item)])
            else:
                batches.setdefault(stream.subscriber, []).append((request_id, item))

    def _end(self, request_id: str, stream: _Stream) -> None:
        del self._streams[request_id]
        self.request_timer.forget(request_id)
        if stream.queue is not None:
            stream.queue.put_nowait(_End())

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
        return {"healthy": self.failure is None and self._accepting and not self._needs_ranks,
                "failure": None if self.failure is None else str(self.failure),
                "restarting_workers": self._needs_ranks,
                "worker_restarts": self.num_worker_restarts,
                "num_requests": len(self._streams), "num_steps": self.num_steps}

    async def step_log(self) -> list[tuple[float, ...]]:
        """`recent_steps`, oldest first."""
        return list(self.recent_steps)

    async def stats(self) -> EngineStats:
        if self.failure is not None:
            return self.last_stats
        with self._lock:
            return self.core.stats()

    async def engine_snapshot(self) -> EngineSnapshot:
        """What every Subscribe batch carries: the latest stats and the step histogram."""
        return self.step_recorder.snapshot()

    async def gpu_telemetry(self) -> list[tuple[int, GpuReading]]:
        """(rank, reading) of each GPU of this replica's ranks, read at most
        GPU_TELEMETRY_TTL_S ago; none on CPU, without NVML, or once the ranks are gone."""
        now = time.monotonic()
        if now - self._gpu_read_at >= GPU_TELEMETRY_TTL_S:
            self._gpu_read_at = now
            self._gpu_readings = await self._read_gpus()
        return self._gpu_readings

    async def _read_gpus(self) -> list[tuple[int, GpuReading]]:
        workers = self.core.executor.workers if self.failure is None else []
        try:
            per_rank = await asyncio.wait_for(
                asyncio.gather(*(w.gpu_telemetry.remote() for w in workers)),
                GPU_TELEMETRY_TIMEOUT_S)
        except Exception as error:  # a rank died or hangs: report no GPUs, not an error
            logger.warning("GPU telemetry from the ranks failed: %r", error)
            return []
        return [(rank, reading) for rank, readings in enumerate(per_rank)
                for reading in readings]

    async def model_info(self) -> dict[str, Any]:
        core = self.core
        return {"model": self.config.model, "max_model_len": core.max_model_len,
                "vocab_size": core.vocab_size, "dtype": core.dtype, "device": core.device,
                "block_size": core.block_size, "eos_token_ids": list(core.eos_token_ids),
                "tensor_parallel_size": self.config.tensor_parallel_size,
                "max_num_seqs": self.config.max_num_seqs,
                "num_gpu_blocks": core.scheduler.kv.pool.num_blocks,
                "kv_cache_dtype": core.kv_cache_dtype,
                "kv_cache_capacity_tokens": core.scheduler.kv.pool.num_blocks * core.block_size}

    async def free_blocks(self) -> int:
        """KV blocks not referenced by any request (tests check it returns to its start)."""
        with self._lock:
            return self.core.scheduler.kv.pool.num_free_blocks

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new requests and wait until those in flight are done; True if they are."""
        self._accepting = False
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._streams and self.failure is None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return not self._streams

    async def shutdown(self) -> None:
        """End every stream (Unavailable), stop the loop and the worker actors."""
        self._accepting = False
        error = Unavailable("the replica shut down; retry on another replica")
        with self._work:
            self._stopping = True
            self.core.abort_all()
            self._work.notify()
        for request_id in list(self._streams):
            self._fail_stream(request_id, error)
        for queue in self._subscribers.values():
            queue.put_nowait(_End(error))
        if self._step_thread is not None:
            # At most one step is in flight; its results are dropped with the requests.
            await asyncio.to_thread(self._step_thread.join)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        self.core.shutdown()


def _start_ranks(config: EngineConfig) -> RayExecutor:
    """The replica's ranks as Ray actors in a placement group of their own."""
    device_type = resolve_device(config.device, use_ray=True)
    return RayExecutor(config, config.model, device_type,
                       ReplicaPlacement(config.tensor_parallel_size, device_type,
                                        config.placement_wait_s))


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
        remove_actor_groups(handle._actor_id.hex())
