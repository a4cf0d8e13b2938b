"""Small swappable policies: waiting-queue order, preemption victim, admission."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator

from pagedserve.scheduler.request import Request

VictimPolicy = Callable[[list[Request]], Request]
"""Picks the request to preempt among the candidates (running, not yet scheduled this step)."""

AdmissionPolicy = Callable[[int, int, int], bool]
"""(blocks the rest of the prompt needs, free blocks, watermark blocks) -> admit now?"""


ServiceOrder = Callable[[Request], object]
"""Sort key of who is served first (smallest first): waiting, swapped and (priority) running."""


def by_arrival(request: Request) -> float:
    return request.arrival_time


def by_priority(request: Request) -> tuple[int, float]:
    """Lower priority value first; earlier arrival among equals."""
    return (request.priority, request.arrival_time)


def newest_first(candidates: list[Request]) -> Request:
    """Preempt the most recently arrived request: it has the least work to redo."""
    return max(candidates, key=lambda r: r.arrival_time)


def lowest_priority_first(candidates: list[Request]) -> Request:
    """Preempt the largest priority value (least urgent); newest among equals."""
    return max(candidates, key=lambda r: (r.priority, r.arrival_time))


def admit_if_whole_prompt_fits(blocks_for_prompt: int, free_blocks: int, watermark: int) -> bool:
    """Admit only when the whole remaining prompt fits above the watermark.

    Admitting a long prompt on the strength of its first chunk lets it grab blocks chunk by chunk
    until a running request must be preempted, which then evicts it in turn (thrash).
    """
    return blocks_for_prompt + watermark <= free_blocks


def admit_if_chunk_fits(blocks_for_prompt: int, free_blocks: int, watermark: int) -> bool:
    """Admit whenever the watermark is respected now (more aggressive, may thrash)."""
    return watermark < free_blocks


class FCFSQueue:
    """Waiting requests by arrival; preempted requests go back to the front."""

    def __init__(self) -> None:
        self._items: deque[Request] = deque()

    def push(self, request: Request) -> None:
        self._items.append(request)

    def push_front(self, request: Request) -> None:
        self._items.appendleft(request)

    def peek(self) -> Request:
        return self._items[0]

    def pop(self) -> Request:
        return self._items.popleft()

    def remove(self, request: Request) -> None:
        self._items.remove(request)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)


class PriorityQueue:
    """Waiting requests by (priority, arrival); lower priority value is served first."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._tiebreak = itertools.count()

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap,
                       (request.priority, request.arrival_time, next(self._tiebreak), request))

    push_front = push

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        self._heap = [item for item in self._heap if item[3] is not request]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (item[3] for item in sorted(self._heap))


WAITING_QUEUES = {"fcfs": FCFSQueue, "priority": PriorityQueue}
SERVICE_ORDERS: dict[str, ServiceOrder] = {"fcfs": by_arrival, "priority": by_priority}
DEFAULT_VICTIM_POLICIES = {"fcfs": newest_first, "priority": lowest_priority_first}
