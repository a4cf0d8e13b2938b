"""Helpers of the gateway tests: one event-loop thread, servers started and stopped on it, raw
stub calls, and the coordinator's free KV blocks.

Every grpc.aio object (the Server's public server and gateway, the test's channels) lives on
the one loop that `LoopThread` runs; a test body is a coroutine handed to `LoopThread.run`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc

from pagedserve.cluster.launcher import ServeOptions, Server
from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


class LoopThread:
    """An asyncio loop running in a daemon thread; `run` waits for one coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-tests-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 60.0) -> Any:
        """The coroutine's result; it is cancelled if it takes longer than `timeout` seconds
        or if the waiting thread is interrupted (a pytest-timeout, Ctrl-C)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the test coroutine took more than {timeout} s") from None
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_the_rest(), timeout=10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        if not self.thread.is_alive():
            self.loop.close()


@contextlib.contextmanager
def started_server(aio: LoopThread, config: EngineConfig,
                   options: ServeOptions | None = None) -> Iterator[Server]:
    """A Server (on 127.0.0.1, a free port) started on `aio`'s loop; stopped on exit, also when
    its start failed half-way."""
    server = Server(config, options or ServeOptions(host="127.0.0.1", port=0))
    try:
        aio.run(server.start(), timeout=START_TIMEOUT_S)
        yield server
    finally:
        aio.run(server.stop(grace_s=1.0), timeout=STOP_TIMEOUT_S)


def free_blocks(server: Server) -> int:
    """Free KV blocks over the server's coordinators (asked from this thread, not the loop)."""
    import ray

    return sum(ray.get(handle.free_blocks.remote(), timeout=30)
               for handle in server.coordinators)


def coordinator_requests(server: Server) -> int:
    """Requests the server's coordinators still hold."""
    import ray

    return sum(ray.get(handle.health.remote(), timeout=30)["num_requests"]
               for handle in server.coordinators)


def wait_until(condition: Callable[[], bool], timeout: float = 15.0,
               interval: float = 0.05) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def assert_back_to_idle(server: Server, start_free: int, timeout: float = 15.0) -> None:
    """Every block free again and no request left at the coordinators (polled, bounded)."""
    ok = wait_until(lambda: free_blocks(server) == start_free
                    and coordinator_requests(server) == 0, timeout)
    assert ok, (f"after {timeout} s: {free_blocks(server)} free blocks (started with "
                f"{start_free}), {coordinator_requests(server)} requests at the coordinators")


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error the call ends with; fails the test if it succeeds."""
    try:
        result = await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"the call succeeded (expected an error): {str(result)[:300]}")


async def stream_error(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError:
    """The error a server-streaming call ends with (after any messages); fails if it ends
    cleanly."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the stream ended cleanly (expected an error)")


async def collect_stream(call: grpc.aio.UnaryStreamCall
                         ) -> tuple[list[pb.GenerateStreamResponse], pb.GenerateResponse]:
    """(the deltas' messages, the final message's GenerateResponse); checks that exactly one
    final message comes last."""
    deltas, finals = [], []
    async for message in call:
        assert not finals, "a message came after the final one"
        which = message.WhichOneof("event")
        assert which in ("delta", "final"), which
        (deltas if which == "delta" else finals).append(message)
    assert len(finals) == 1, f"{len(finals)} final messages"
    return deltas, finals[0].final


def ids_request(ids: list[int], **sampling: Any) -> pb.GenerateRequest:
    """A GenerateRequest of a token-id prompt and these SamplingParams fields."""
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                              sampling=pb.SamplingParams(**sampling))
