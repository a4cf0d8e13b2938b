"""A coordinator's output streams: where each request's updates go, on the actor's event loop.

A request streams on a queue of its own (`Coordinator.generate`) or on its subscriber's batch
queue (`submit` + `stream`, what a gateway uses), which gets one batch per step with every
changed request of that subscriber. The step thread hands each step's outputs to the event loop,
which delivers them here; a request's stream ends when all its sequences finished, when it is
aborted (with 'abort' updates), or with an error when the replica fails or shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pagedserve.cluster.wire import RequestFailed, StepDelivery
from pagedserve.engine.beam_search import BeamSearchOutput
from pagedserve.engine.core import EngineCoreOutputs, EngineCoreRequest, SequenceUpdate
from pagedserve.errors import InvalidArgument
from pagedserve.metrics.coordinator_metrics import RequestTimer
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.validation import check_type

# The coordinator's logger: these lines were the coordinator's before it was split into modules.
logger = logging.getLogger("pagedserve.cluster.coordinator")

StreamItem = list[SequenceUpdate] | BeamSearchOutput | RequestFailed
UNSUBSCRIBED_GRACE_S = 10.0
"""How long requests of a subscriber that is not streaming are kept (a gateway's Subscribe
follows its first AddRequests within milliseconds; one that never comes is a dead gateway)."""


@dataclass
class Stream:
    """Where one request's updates go: its own queue, or its subscriber's batch queue."""

    num_sequences: int
    queue: asyncio.Queue | None = None
    subscriber: str | None = None
    finished: set[int] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return len(self.finished) == self.num_sequences


class End:
    """Queue sentinel: the stream is over (with an error, when `error` is set)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


async def until_end(queue: asyncio.Queue) -> AsyncIterator[Any]:
    """The items of a stream's queue up to its End (raising the End's error, if any)."""
    while True:
        item = await queue.get()
        if isinstance(item, End):
            if item.error is not None:
                raise item.error
            return
        yield item


def num_sequences(request: EngineCoreRequest) -> int:
    """How many sequences a request's stream waits for (beam search reports one output)."""
    params = request.params
    check_type("params", params, "SamplingParams or BeamSearchParams",
               isinstance(params, SamplingParams | BeamSearchParams))
    return 1 if isinstance(params, BeamSearchParams) else params.n


class OutputStreams:
    """Every request's stream and every subscriber's batch queue; event loop only. `abort`
    aborts a request in the core and then here (the coordinator's `_abort`)."""

    def __init__(self, request_timer: RequestTimer, abort: Callable[[str], None],
                 unsubscribed_grace_s: float) -> None:
        self.request_timer = request_timer
        self._abort = abort
        self.unsubscribed_grace_s = unsubscribed_grace_s
        self.streams: dict[str, Stream] = {}
        self.subscribers: dict[str, asyncio.Queue] = {}
        self._streaming: set[str] = set()
        self._orphan_checks: dict[str, asyncio.TimerHandle] = {}

    # ---- subscribers --------------------------------------------------------------------------

    def subscriber_queue(self, subscriber: str) -> asyncio.Queue:
        """A subscriber's batch queue, made by its first submit or stream (either may come
        first: they are separate calls)."""
        queue = self.subscribers.get(subscriber)
        if queue is None:
            queue = self.subscribers[subscriber] = asyncio.Queue()
        return queue

    def watch_for_orphans(self, subscriber: str) -> None:
        """After a submit: unless `subscriber` streams within `unsubscribed_grace_s`, its
        requests are aborted."""
        if subscriber not in self._streaming and subscriber not in self._orphan_checks:
            self._orphan_checks[subscriber] = asyncio.get_running_loop().call_later(
                self.unsubscribed_grace_s, self._drop_if_unsubscribed, subscriber)

    def start_streaming(self, subscriber: str) -> asyncio.Queue:
        """The batch queue of a subscriber that begins its (one) stream."""
        if subscriber in self._streaming:
            raise InvalidArgument(f"subscriber {subscriber!r} is already streaming")
        self._streaming.add(subscriber)
        return self.subscriber_queue(subscriber)

    def stop_streaming(self, subscriber: str) -> None:
        """The subscriber's stream ended: nobody is left to receive its requests."""
        self._streaming.discard(subscriber)
        del self.subscribers[subscriber]
        for request_id, stream in list(self.streams.items()):
            if stream.subscriber == subscriber:
                self._abort(request_id)

    def _drop_if_unsubscribed(self, subscriber: str) -> None:
        """Abort the requests of a subscriber that added them but has not streamed for
        `unsubscribed_grace_s` (its gateway died between AddRequests and Subscribe, or after
        its stream ended): their blocks would be held for ever."""
        self._orphan_checks.pop(subscriber, None)
        if subscriber in self._streaming:
            return
        self.subscribers.pop(subscriber, None)
        orphans = [request_id for request_id, stream in self.streams.items()
                   if stream.subscriber == subscriber]
        if orphans:
            logger.warning("aborting %d requests of %s, which has not subscribed for %.0f s",
                           len(orphans), subscriber, self.unsubscribed_grace_s)
        for request_id in orphans:
            self._abort(request_id)

    # ---- delivery -----------------------------------------------------------------------------

    def deliver(self, outputs: EngineCoreOutputs) -> None:
        """One step's outputs: each request's updates to its queue, or batched per subscriber."""
        starts = self.request_timer.first_tokens(outputs)
        by_request: dict[str, list[SequenceUpdate]] = {}
        for update in outputs.updates:
            by_request.setdefault(update.request_id, []).append(update)
        batches: dict[str, list[tuple[str, StreamItem]]] = {}
        for request_id, updates in by_request.items():
            stream = self.streams.get(request_id)
            if stream is None:
                continue
            for update in updates:
                if update.finished:
                    stream.finished.add(update.index)
            self._send(request_id, stream, updates, batches)
            if stream.done:
                self._end(request_id, stream)
        for beam_output in outputs.beam_outputs:
            stream = self.streams.get(beam_output.request_id)
            if stream is not None:
                stream.finished.add(0)
                self._send(beam_output.request_id, stream, beam_output, batches)
                self._end(beam_output.request_id, stream)
        for subscriber, batch in batches.items():
            self.subscribers[subscriber].put_nowait(StepDelivery(
                batch, outputs.timestamp,
                [starts[request_id] for request_id, _ in batch if request_id in starts]))

    def deliver_idle(self) -> None:
        """A batch with no updates to every subscriber: it carries the idle state."""
        for queue in self.subscribers.values():
            queue.put_nowait(StepDelivery(step_time=time.monotonic()))

    def _send(self, request_id: str, stream: Stream, item: StreamItem,
              batches: dict[str, list] | None = None) -> None:
        if stream.queue is not None:
            stream.queue.put_nowait(item)
        elif stream.subscriber in self.subscribers:
            if batches is None:
                self.subscribers[stream.subscriber].put_nowait([(request_id, item)])
            else:
                batches.setdefault(stream.subscriber, []).append((request_id, item))

    def _end(self, request_id: str, stream: Stream) -> None:
        del self.streams[request_id]
        self.request_timer.forget(request_id)
        if stream.queue is not None:
            stream.queue.put_nowait(End())

    # ---- requests that end early --------------------------------------------------------------

    def aborted(self, request_id: str) -> None:
        """After the core aborted the request: its stream ends with 'abort' updates."""
        self.request_timer.forget(request_id)
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        final = [SequenceUpdate(request_id, index, finish_reason="abort")
                 for index in range(stream.num_sequences) if index not in stream.finished]
        self._send(request_id, stream, final)
        if stream.queue is not None:
            stream.queue.put_nowait(End())

    def fail(self, request_id: str, error: BaseException) -> None:
        """End a request with `error` (its caller sees the error's status, e.g. UNAVAILABLE,
        and may retry elsewhere), not with a finish reason."""
        self.request_timer.forget(request_id)
        stream = self.streams.pop(request_id)
        if stream.queue is not None:
            stream.queue.put_nowait(End(error))
        else:
            self._send(request_id, stream, RequestFailed(request_id, error))

    def fail_all(self, error: BaseException) -> None:
        for request_id in list(self.streams):
            self.fail(request_id, error)

    def end_all(self, error: BaseException) -> None:
        """Every request and every subscriber's stream ends with `error`."""
        self.fail_all(error)
        for queue in self.subscribers.values():
            queue.put_nowait(End(error))
