"""A coordinator's step loop: the step thread that runs its core's steps, and its ranks' failures.

The thread steps back to back while any request is in flight and sleeps on a condition (no
polling) when none is. It holds the core's lock while scheduling and completing a step but not
while the ranks work, and hands each step's outputs to the event loop's `OutputStreams`.
Measured on an H200 (bench/coordinator.py), the step thread waiting on the ranks directly left a
smaller gap between GPU steps than an asyncio loop awaiting them, whose every step paid the
hand-over of Ray's reply into the loop.

When the ranks die and restarts are left (`EngineConfig.max_worker_restarts`), every request is
requeued and the thread starts new ranks in a new placement group; otherwise the replica is lost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from pagedserve.cluster.coordinator_process import tune_collector
from pagedserve.cluster.output_streams import OutputStreams
from pagedserve.cluster.placement import ReplicaPlacement, resolve_device
from pagedserve.config import EngineConfig
from pagedserve.engine.core import CoreStepError, EngineCore, EngineCoreOutputs
from pagedserve.errors import Internal, PagedServeError, Unavailable, WorkerFailure
from pagedserve.executor.ray import RayExecutor
from pagedserve.metrics.coordinator_metrics import RequestTimer, StepRecorder
from pagedserve.scheduler.output import SchedulerOutput

# The coordinator's logger: these lines were the coordinator's before it was split into modules.
logger = logging.getLogger("pagedserve.cluster.coordinator")

STEP_LOG_SIZE = 4096


def start_ranks(config: EngineConfig) -> RayExecutor:
    """The replica's ranks as Ray actors in a placement group of their own."""
    device_type = resolve_device(config.device, use_ray=True)
    return RayExecutor(config, config.model, device_type,
                       ReplicaPlacement(config.tensor_parallel_size, device_type,
                                        config.placement_wait_s))


def start_core(config: EngineConfig) -> EngineCore:
    """The replica's core over new ranks, its dispatch path built."""
    executor = start_ranks(config)
    try:
        core = EngineCore(config, executor)
        # An empty step builds the dispatch path (a compiled graph compiles on its first
        # step) now rather than in the first request's time to first token.
        executor.execute(SchedulerOutput())
    except BaseException:
        executor.shutdown()
        raise
    return core


class StepLoop:
    """The step thread of one coordinator. `set_health(serving)` is called in the step thread
    when the ranks go and come back; `on_lost(error)` on the event loop once the replica is
    lost. Calls under `lock` are marked so."""

    def __init__(self, core: EngineCore, config: EngineConfig, lock: threading.Lock,
                 outputs: OutputStreams, request_timer: RequestTimer,
                 set_health: Callable[[bool], None],
                 on_lost: Callable[[BaseException], None]) -> None:
        self.core = core
        self.config = config
        self.lock = lock
        self._work = threading.Condition(lock)
        self._outputs = outputs
        self._request_timer = request_timer
        self._set_health = set_health
        self._on_lost = on_lost
        self._stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self._restarts_left = config.max_worker_restarts
        self.needs_ranks = False
        """The ranks died and the requests wait, requeued, for new ones (see _replace_ranks)."""
        self.num_worker_restarts = 0
        self.num_steps = 0
        self.recent_steps: deque[tuple[float, ...]] = deque(maxlen=STEP_LOG_SIZE)
        """Per recent step: wall seconds, rank 0's seconds, sequences, then the seconds spent
        scheduling, dispatching and waiting, and completing, and the GPU's idle seconds."""
        self.last_stats = core.stats()
        self.step_recorder = StepRecorder(self.last_stats)

    def start(self) -> None:
        """On the event loop, with the first request: the thread starts (once)."""
        if self._thread is None:
            self.loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run_steps, name="step-loop",
                                            daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Under the lock: there is work (a request was added)."""
        self._work.notify()

    def stop(self) -> None:
        """No further step: every request is aborted in the core and the thread ends."""
        with self._work:
            self._stopping = True
            self.core.abort_all()
            self._work.notify()

    async def join(self) -> None:
        if self._thread is not None:
            # At most one step is in flight; its results are dropped with the requests.
            await asyncio.to_thread(self._thread.join)

    def _run_steps(self) -> None:
        """The step thread: one step after another while there is work (see the module
        docstring). A step's outputs go to the event loop, which owns the streams, only once
        the next step is on its way to the ranks: delivering them competes for the GIL, and
        while the ranks compute nothing waits for it."""
        core = self.core
        executor = core.executor
        undelivered: EngineCoreOutputs | None = None
        while True:
            if self.needs_ranks:
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
                    self._request_timer.scheduled(step)
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
                with self.lock:
                    if self._handle_failure(step, error):
                        return
                continue
            returned = time.perf_counter()
            with self.lock:
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
        self.loop.call_soon_threadsafe(self._outputs.deliver_idle)

    def _hand_over(self, outputs: EngineCoreOutputs | None) -> None:
        """Give a step's outputs to the event loop for delivery (none: nothing to do); returns
        None, what the step thread then holds."""
        if outputs is not None:
            self.loop.call_soon_threadsafe(self._outputs.deliver, outputs)

    def _handle_failure(self, step, error: Exception) -> bool:
        """Under the lock, in the step thread: abort what the failure touched and tell the
        event loop, or, for lost ranks while restarts are left, requeue every request for new
        ranks. True when the replica is lost (the step thread then ends)."""
        if isinstance(error, WorkerFailure) and self._restarts_left > 0:
            logger.error("%s; requeueing %d requests for new ranks", error,
                         self.core.num_requests)
            self.core.requeue_for_new_ranks()
            self.needs_ranks = True
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
            self.loop.call_soon_threadsafe(self._outputs.deliver,
                                           EngineCoreOutputs(updates=failed.updates))
        except WorkerFailure as lost:
            return self._lose_replica(lost)
        except PagedServeError as other:  # e.g. the KV cache cannot hold a waiting request
            logger.error("step could not run: %s", other)
            self.core.abort_all()
            self.loop.call_soon_threadsafe(self._outputs.fail_all, other)
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
                executor = start_ranks(self.config)
                try:
                    with self.lock:
                        self.core.attach_ranks(executor)
                    executor.execute(SchedulerOutput())  # builds the dispatch path
                except BaseException:
                    executor.shutdown()
                    raise
            except Exception as error:
                logger.error("new ranks failed to start: %s", error)
                continue
            self.needs_ranks = False
            self.num_worker_restarts += 1
            tune_collector()  # the lost ranks' executor was frozen with the start-up heap
            self._set_health(True)
            logger.warning("new ranks ready in %.1f s; %d restarts left",
                           time.monotonic() - began, self._restarts_left)
            return True
        with self.lock:
            return self._lose_replica(self._restarts_spent(None))

    def _restarts_spent(self, error: BaseException | None) -> Unavailable:
        spent = Unavailable(
            f"tensor-parallel workers failed and {self.config.max_worker_restarts} restarts did "
            f"not bring them back (EngineConfig.max_worker_restarts){f': {error}' if error else ''}"
            "; this replica stopped serving, retry on another one")
        spent.__cause__ = error
        return spent

    def _lose_replica(self, error: BaseException) -> bool:
        self.failure = error
        self.core.abort_all()
        self.loop.call_soon_threadsafe(self._on_lost, error)
        return True
