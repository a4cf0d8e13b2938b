"""Tokenizing a gateway's prompts without stalling its event loop.

The gateway's one event loop serves every call, stream and HTTP connection; a text prompt can
be up to the message limit (64 MiB), and encoding a million characters takes about half a
second. Short texts are encoded in place (a thread hop would cost more than the encoding);
longer ones, and chat templates, run on a small thread pool of this gateway's (Hugging Face's
Rust tokenizers let go of the GIL while they encode), at most `max_threads` at a time: the
others wait on the loop, where a cancelled call leaves nothing behind in the pool's queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from pagedserve.cluster.gateway_request import GatewayRequest
from pagedserve.engine.core import EngineCoreRequest
from pagedserve.engine.processor import Processor
from pagedserve.validation import check_field, is_int

T = TypeVar("T")

INLINE_CHARS = 8192
"""Texts up to this many characters are encoded on the loop (well under a millisecond)."""
MAX_THREADS = 2
"""Encodings running at once: the gateway's host has other work (streams, detokenizing)."""


class PromptTokenizer:
    """`processor`'s tokenization, off the event loop for long texts (see the module)."""

    def __init__(self, processor: Processor, max_threads: int = MAX_THREADS,
                 inline_chars: int = INLINE_CHARS) -> None:
        check_field("PromptTokenizer", "max_threads", is_int(max_threads) and max_threads >= 1,
                    "an integer >= 1", max_threads)
        check_field("PromptTokenizer", "inline_chars",
                    is_int(inline_chars) and inline_chars >= 0, "an integer >= 0",
                    inline_chars)
        self.processor = processor
        self.inline_chars = inline_chars
        self._max_threads = max_threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None

    def _inline(self, prompt: Any) -> bool:
        return not isinstance(prompt, str) or len(prompt) <= self.inline_chars

    async def make_request(self, request_id: str, request: GatewayRequest,
                           arrival_time: float) -> EngineCoreRequest:
        """`Processor.make_request` of the request (its checks raise InvalidArgument)."""
        make = self.processor.make_request
        args = (request_id, request.prompt, request.params, request.priority,
                request.cache_salt, arrival_time)
        if self._inline(request.prompt):
            return make(*args)
        return await self.run(make, *args)

    async def encode(self, text: str) -> list[int]:
        if self._inline(text):
            return self.processor.encode(text)
        return await self.run(self.processor.encode, text)

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` on the pool, once one of its `max_threads` slots is free."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._max_threads, thread_name_prefix="gateway-tokenize")
            self._slots = asyncio.Semaphore(self._max_threads)
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        try:
            future = self._pool.submit(work, *args)
        except BaseException:
            self._slots.release()
            raise
        # The slot is free when the thread is, not when a cancelled caller leaves: a running
        # encoding cannot be stopped, and the pool must not queue more behind it.
        future.add_done_callback(lambda _: _call_soon(loop, self._slots.release))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Stop the pool's threads once their encodings end (queued ones are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> None:
    """`callback` on `loop` from another thread; nothing once the loop is closed (the gateway
    stopped while an encoding ran: nobody waits for the slot)."""
    with contextlib.suppress(RuntimeError):  # also when it closes in between
        loop.call_soon_threadsafe(callback)
