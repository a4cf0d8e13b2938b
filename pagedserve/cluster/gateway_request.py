"""What a front (the gRPC service, the OpenAI HTTP API) hands the gateway, and what it gets back:
a `GatewayRequest` in, a `RequestStream` of that request's outputs out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from pagedserve.engine.beam_search import BeamSearchOutput
from pagedserve.engine.core import EngineCoreRequest
from pagedserve.engine.outputs import RequestOutput
from pagedserve.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class GatewayRequest:
    """One request as a front parsed it; the gateway checks it against the model's limits."""

    prompt: str | list[int]
    """Text (tokenized by the gateway) or token ids."""
    params: SamplingParams | BeamSearchParams
    """Sampling (its `output_kind` says how outputs are reported) or beam search."""
    request_id: str = ""
    """Empty: the gateway makes one. No '/' (sequence ids of n > 1 use it)."""
    priority: int = 0
    """Scheduling priority (lower first, with the 'priority' policy)."""
    cache_salt: str | None = None
    """Prefix-cache isolation: only requests with the same salt share cached blocks."""


class ReplicaLost:
    """Queue item: the request's replica failed with `error` (a PagedServeError)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class RequestStream:
    """The outputs of one admitted request, in its `output_kind`: RequestOutputs until one
    with `finished` set, or a beam search's single BeamSearchOutput. A failed replica raises
    its error. Closing the stream before the end (`close`, leaving `async with`, or the
    consumer's cancellation) aborts the request at its coordinator, which frees its blocks."""

    def __init__(self, core_request: EngineCoreRequest, queue: asyncio.Queue,
                 on_close: Callable[[str, bool], None]) -> None:
        self.core_request = core_request
        self._queue = queue
        self._on_close = on_close
        self.finished = False
        """True once the last output arrived (nothing is left to abort)."""
        self._closed = False

    @property
    def request_id(self) -> str:
        return self.core_request.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput | BeamSearchOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        return self._taken(await self._queue.get())

    def next_ready(self) -> RequestOutput | BeamSearchOutput | None:
        """The next output if it has already arrived, else None (also after the last): a
        consumer that fell behind takes what is waiting in one go."""
        if self.finished or self._closed or self._queue.empty():
            return None
        return self._taken(self._queue.get_nowait())

    def _taken(self, item: RequestOutput | BeamSearchOutput | ReplicaLost
               ) -> RequestOutput | BeamSearchOutput:
        if isinstance(item, ReplicaLost):
            raise item.error
        if not isinstance(item, RequestOutput) or item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        """Forget the request at the gateway; abort it at the coordinator unless finished.
        Synchronous, so that a cancelled consumer's cleanup cannot be cancelled half-way."""
        if not self._closed:
            self._closed = True
            self._on_close(self.request_id, self.finished)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()
