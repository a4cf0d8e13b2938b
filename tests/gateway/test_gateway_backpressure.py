"""Admission is bounded per replica: ServeOptions(max_queue_per_replica=2) with two requests in
flight answers a third with RESOURCE_EXHAUSTED and a `retry-after-ms` hint in the trailing
metadata; once a slot frees (a request finishes or is cancelled) calls are admitted again."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pagedserve.cluster.launcher import ServeOptions
from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.gateway.gateway_utils import (
    assert_back_to_idle,
    collect_stream,
    free_blocks,
    ids_request,
    rpc_error,
    started_server,
    stream_error,
)

pytestmark = pytest.mark.timeout(90)

QUEUE = 2
LONG_TOKENS = 400  # a second or more: far longer than one refused call takes
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def served(aio, ray_cluster, tiny_checkpoint):
    config = EngineConfig(model=tiny_checkpoint, device="cpu", num_gpu_blocks_override=128,
                          cpu_threads=1)
    options = ServeOptions(host="127.0.0.1", port=0, max_queue_per_replica=QUEUE)
    with started_server(aio, config, options) as server:
        yield server


def _long() -> pb.GenerateRequest:
    return ids_request(PROMPT, temperature=0.0, max_tokens=LONG_TOKENS, ignore_eos=True)


async def _fill(stub) -> tuple[list, list[int]]:
    """QUEUE long streams, each seen running; (the calls, the tokens of their first delta)."""
    calls = [stub.GenerateStream(_long(), timeout=60) for _ in range(QUEUE)]
    first_tokens = []
    for call in calls:
        message = await call.read()
        assert message.WhichOneof("event") == "delta"
        first_tokens.append(len(message.delta.token_ids))
    return calls, first_tokens


def _assert_full(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    trailing = dict(error.trailing_metadata() or ())
    assert "retry-after-ms" in trailing, trailing
    assert int(trailing["retry-after-ms"]) > 0


async def _drain(call) -> int:
    """Read a stream to its end; the number of tokens its deltas carried."""
    tokens = 0
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.WhichOneof("event") == "delta":
            tokens += len(message.delta.token_ids)
        else:
            assert message.final.completions[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert await call.code() == grpc.StatusCode.OK
    return tokens


def test_full_gateway_refuses_then_admits_after_requests_finish(aio, served):
    start_free = free_blocks(served)

    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            calls, first_tokens = await _fill(stub)
            short = ids_request(PROMPT, max_tokens=2)
            _assert_full(await rpc_error(stub.Generate(short, timeout=20)))
            _assert_full(await stream_error(stub.GenerateStream(short, timeout=20)))
            load = await stub.GetServerLoad(pb.GetServerLoadRequest(), timeout=10)
            assert load.gateway_in_flight == QUEUE  # the refused calls took no slot
            assert load.gateway_queue_limit == QUEUE
            # The running ones were not disturbed: each finishes with all its tokens.
            rest = [await _drain(call) for call in calls]
            assert [a + b for a, b in zip(first_tokens, rest, strict=True)] == [
                LONG_TOKENS] * QUEUE
            load = await stub.GetServerLoad(pb.GetServerLoadRequest(), timeout=10)
            assert load.gateway_in_flight == 0
            response = await stub.Generate(short, timeout=30)
            assert len(response.completions[0].token_ids) == 2
            deltas, final = await collect_stream(stub.GenerateStream(short, timeout=30))
            assert final.usage.completion_tokens == 2

    aio.run(body(), timeout=80)
    assert_back_to_idle(served, start_free)


def test_cancelling_one_frees_its_slot(aio, served):
    start_free = free_blocks(served)

    async def body():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            calls, _ = await _fill(stub)
            short = ids_request(PROMPT, max_tokens=2)
            _assert_full(await rpc_error(stub.Generate(short, timeout=20)))
            calls[0].cancel()
            assert await calls[0].code() == grpc.StatusCode.CANCELLED
            for _ in range(200):  # the gateway notices the cancel (bounded: 10 s)
                load = await stub.GetServerLoad(pb.GetServerLoadRequest(), timeout=10)
                if load.gateway_in_flight < QUEUE:
                    break
                await asyncio.sleep(0.05)
            response = await stub.Generate(short, timeout=30)
            assert len(response.completions[0].token_ids) == 2
            calls[1].cancel()

    aio.run(body(), timeout=80)
    assert_back_to_idle(served, start_free)
