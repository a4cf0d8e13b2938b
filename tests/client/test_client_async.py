"""AsyncClient against the fake gateway: the same calls, awaited (each test runs its own loop)."""

from __future__ import annotations

import asyncio
import gc

import grpc
import pytest

from pagedserve import errors
from pagedserve.client import AsyncClient, StreamDelta, StreamFinal
from pagedserve.protos.v1 import generation_pb2 as pb
from tests.client.conftest import FAST_RETRY
from tests.client.fake_gateway import Failure, canned_stream


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


def test_generate_and_small_rpcs(server):
    async def main():
        async with AsyncClient(server.address, api_key="k") as client:
            result = await client.generate([1, 2], temperature=0, max_tokens=4)
            assert result.outputs[0].text == "Hello" and result.usage.total_tokens == 8
            assert await client.tokenize("hi") == [104, 105]
            assert await client.detokenize([104]) == "h"
            assert await client.abort("r") == ["r"]
            assert (await client.model_info()).num_replicas == 2
            assert (await client.load()).kv_blocks_total == 100
            beams = await client.beam_search("b", beam_width=2, max_tokens=3)
            assert len(beams.outputs) == 2

    run(main())
    first = server.servicer.calls[0]
    assert first.request.sampling == pb.SamplingParams(temperature=0, max_tokens=4)
    assert first.metadata["authorization"] == "Bearer k"


def test_stream(server):
    async def main():
        async with AsyncClient(server.address) as client:
            return [e async for e in client.generate_stream("p", n=2)]

    events = run(main())
    assert [type(e) for e in events] == [StreamDelta] * 3 + [StreamFinal]
    assert [o.text for o in events[-1].outputs] == ["Hello", "Yo"]


@pytest.mark.parametrize("how", ["break", "aclose", "async_with", "task_cancel"])
def test_leaving_a_stream_early_cancels_the_rpc(server, how):
    server.servicer.stream = canned_stream()[:1]
    server.servicer.hold_stream = True
    cancelled = server.servicer.cancelled

    async def consume(client):
        if how == "break":
            async for _ in client.generate_stream("p"):
                break
            gc.collect()
        elif how == "aclose":
            stream = client.generate_stream("p")
            assert isinstance(await stream.__anext__(), StreamDelta)
            await stream.aclose()
        elif how == "async_with":
            async with client.generate_stream("p") as stream:
                await stream.__anext__()
        else:
            async def read_all():
                return [e async for e in client.generate_stream("p")]
            task = asyncio.ensure_future(read_all())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    async def main():
        async with AsyncClient(server.address) as client:
            await consume(client)
            # The client is still open: only the stream's own cancel can have reached the server.
            assert await asyncio.to_thread(cancelled.wait, 5)

    run(main())


def test_retries_and_errors(server):
    server.servicer.failures = [
        Failure(grpc.StatusCode.UNAVAILABLE, "down"),
        Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"),
        Failure(grpc.StatusCode.INVALID_ARGUMENT, "top_k must be >= -1"),
    ]

    async def main():
        async with AsyncClient(server.address, retry=FAST_RETRY) as client:
            with pytest.raises(errors.InvalidArgument, match="top_k must be >= -1"):
                await client.generate("x", top_k=-5)
            assert (await client.generate("x")).request_id == "req-1"

    run(main())
    assert server.servicer.methods() == ["Generate"] * 4


def test_stream_not_retried_after_a_delta(server):
    server.servicer.stream = canned_stream()[:1]
    server.servicer.stream_error = Failure(grpc.StatusCode.UNAVAILABLE, "replica died")

    async def main():
        async with AsyncClient(server.address, retry=FAST_RETRY) as client:
            stream = client.generate_stream("p")
            assert isinstance(await stream.__anext__(), StreamDelta)
            with pytest.raises(errors.Unavailable, match="replica died"):
                await stream.__anext__()

    run(main())
    assert len(server.servicer.calls) == 1


def test_stream_retried_before_a_delta_and_failover(server, dead_address):
    server.servicer.failures = [Failure(grpc.StatusCode.UNAVAILABLE, "warming up")]

    async def main():
        async with AsyncClient([dead_address, server.address], retry=FAST_RETRY) as client:
            events = [e async for e in client.generate_stream("p")]
            assert client.current_target == server.address
            return events

    assert isinstance(run(main())[-1], StreamFinal)
    assert server.servicer.methods() == ["GenerateStream"] * 2


def test_deadline(server):
    server.servicer.delay_s = 2.0

    async def main():
        async with AsyncClient(server.address) as client:
            with pytest.raises(errors.DeadlineExceeded):
                await client.generate("x", timeout=0.2)

    run(main())
