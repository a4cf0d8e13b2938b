"""Load: 64 concurrent streaming clients send 1,000 short requests, a tenth of them cancelled
mid-stream. Every other request completes with exactly its max_tokens tokens, none is lost or
mixed up with another, nothing hangs, and every KV block is free again afterwards."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.gateway.gateway_utils import (
    assert_back_to_idle,
    coordinator_requests,
    free_blocks,
    started_server,
)

CLIENTS = 64
REQUESTS = 1000
CANCELLED_FRACTION = 0.1
BOUND_S = 90.0


@pytest.fixture(scope="module")
def served(aio, ray_cluster, tiny_checkpoint):
    config = EngineConfig(model=tiny_checkpoint, device="cpu", num_gpu_blocks_override=256,
                          max_num_seqs=CLIENTS, cpu_threads=1)
    with started_server(aio, config) as server:
        yield server


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_many_concurrent_streams_with_cancellations(aio, served):
    rng = random.Random(20240601)
    plans = []
    cancelled = set(rng.sample(range(REQUESTS), int(REQUESTS * CANCELLED_FRACTION)))
    for index in range(REQUESTS):
        prompt = [rng.randrange(3, 256) for _ in range(rng.randint(2, 12))]
        sampling = pb.SamplingParams(max_tokens=rng.randint(4, 8), ignore_eos=True)
        if index % 2:
            sampling.temperature = 0.0
        else:
            sampling.temperature = 0.8
            sampling.seed = index
        plans.append(pb.GenerateRequest(request_id=f"load-{index}",
                                        token_ids=pb.TokenIds(ids=prompt), sampling=sampling))
    start_free = free_blocks(served)
    outcomes: dict[int, tuple] = {}

    async def one(stub, index: int) -> None:
        request = plans[index]
        call = stub.GenerateStream(request, timeout=60)
        tokens: list[int] = []
        final = None
        while (message := await call.read()) is not grpc.aio.EOF:
            assert message.request_id == request.request_id
            if message.WhichOneof("event") == "delta":
                assert message.delta.index == 0
                tokens.extend(message.delta.token_ids)
                if index in cancelled:
                    call.cancel()
                    outcomes[index] = ("cancelled", await call.code())
                    return
            else:
                assert final is None
                final = message.final
        outcomes[index] = ("done", await call.code(), tokens, final)

    async def client(next_index) -> None:
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            while (index := next(next_index, None)) is not None:
                await one(stub, index)

    async def body() -> float:
        started = time.monotonic()
        indices = iter(range(REQUESTS))
        await asyncio.gather(*(client(indices) for _ in range(CLIENTS)))
        async with grpc.aio.insecure_channel(served.address) as channel:
            load = await generation_pb2_grpc.GenerationStub(channel).GetServerLoad(
                pb.GetServerLoadRequest(), timeout=10)
            assert load.gateway_in_flight == 0
        return time.monotonic() - started

    elapsed = aio.run(body(), timeout=BOUND_S)
    print(f"{REQUESTS} requests from {CLIENTS} clients in {elapsed:.1f} s")
    assert sorted(outcomes) == list(range(REQUESTS)), "requests lost"
    for index, outcome in outcomes.items():
        wanted = plans[index].sampling.max_tokens
        if index in cancelled:
            assert outcome == ("cancelled", grpc.StatusCode.CANCELLED), (index, outcome)
            continue
        kind, code, tokens, final = outcome
        assert (kind, code) == ("done", grpc.StatusCode.OK), (index, outcome[:2])
        assert final is not None, f"request {index}: no final message"
        assert len(tokens) == wanted, (index, len(tokens), wanted)
        assert all(0 <= t < 256 for t in tokens)
        assert final.usage.completion_tokens == wanted
        assert final.usage.prompt_tokens == len(plans[index].token_ids.ids)
        assert [c.finish_reason for c in final.completions] == [pb.FINISH_REASON_LENGTH]
    assert_back_to_idle(served, start_free)
    assert coordinator_requests(served) == 0
