"""What a coordinator measures for the metrics: its engine snapshot (queues, KV blocks,
counters, the per-step token histogram) and each request's queue and prefill time, all in its
own clock. Plain data, no prometheus_client: the gateway exposes them."""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass

from pagedserve.engine.core import EngineCoreOutputs, EngineStats
from pagedserve.metrics.names import ITERATION_TOKENS_BUCKETS
from pagedserve.scheduler.output import SchedulerOutput


@dataclass(frozen=True)
class EngineSnapshot:
    """A replica's engine state for the metrics (see EngineSnapshot in coordinator.proto)."""

    stats: EngineStats
    """The latest stats: after the last step, or when the replica went idle."""
    iteration_tokens_counts: tuple[int, ...]
    """Steps per bucket of ITERATION_TOKENS_BUCKETS by tokens computed (the last: above
    every bound); not cumulative."""
    iteration_tokens_sum: int
    """Tokens computed over all those steps."""


class StepRecorder:
    """The step thread records each step and the idle state; any thread takes snapshots."""

    def __init__(self, stats: EngineStats) -> None:
        self._lock = threading.Lock()
        self._stats = stats
        self._counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        self._sum = 0

    def observe_step(self, stats: EngineStats) -> None:
        """A completed step. Steps that computed nothing (the one that only collects the
        step still in flight) are no iteration and are not counted."""
        with self._lock:
            self._stats = stats
            if stats.step_tokens > 0:
                self._counts[bisect.bisect_left(ITERATION_TOKENS_BUCKETS,
                                                stats.step_tokens)] += 1
                self._sum += stats.step_tokens

    def set_state(self, stats: EngineStats) -> None:
        """The state without a step, e.g. once the replica is idle (aborts change it too)."""
        with self._lock:
            self._stats = stats

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            return EngineSnapshot(self._stats, tuple(self._counts), self._sum)


@dataclass(frozen=True)
class RequestStart:
    """A request's first token came: its wait for a first step and its prefill."""

    request_id: str
    queue_seconds: float
    """From the coordinator taking it to the first step that computed any of it."""
    prefill_seconds: float
    """From that step to the step whose results held its first token."""


@dataclass
class _Timing:
    added: float
    scheduled: float | None = None


class RequestTimer:
    """Each request's times up to its first token (time.monotonic() of the coordinator). The
    event loop adds, reports and forgets requests; the step thread marks them scheduled."""

    def __init__(self) -> None:
        self._requests: dict[str, _Timing] = {}
        self._lock = threading.Lock()

    def added(self, request_id: str) -> None:
        with self._lock:
            self._requests[request_id] = _Timing(time.monotonic())

    def scheduled(self, step: SchedulerOutput) -> None:
        """After scheduling `step`: the requests it shows the ranks for the first time (a
        recomputed one again, which keeps its first time)."""
        now = time.monotonic()
        with self._lock:
            if not self._requests:  # the common case once every running request has a token
                return
            for item in step.scheduled:
                if item.new_request is None:
                    continue
                timing = self._requests.get(item.request_id.partition("/")[0])
                if timing is not None and timing.scheduled is None:
                    timing.scheduled = now

    def first_tokens(self, outputs: EngineCoreOutputs) -> dict[str, RequestStart]:
        """By request id, the requests whose first token is in `outputs` (forgotten then)."""
        starts = {}
        with self._lock:
            if not self._requests:
                return starts
            for update in outputs.updates:
                timing = self._requests.get(update.request_id)
                if timing is None or timing.scheduled is None or not update.new_token_ids:
                    continue
                del self._requests[update.request_id]
                starts[update.request_id] = RequestStart(
                    update.request_id, timing.scheduled - timing.added,
                    outputs.timestamp - timing.scheduled)
        return starts

    def forget(self, request_id: str) -> None:
        """The request ended (or never gets a token: beam search, aborted)."""
        with self._lock:
            self._requests.pop(request_id, None)
