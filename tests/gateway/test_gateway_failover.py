"""A replica's coordinator killed mid-stream: its requests move to the other replica. Those
with no tokens yet are sent again; greedy ones with tokens go on from them, so each stream ends
with exactly the offline engine's tokens (none missing, none repeated); a seeded sampled one
with tokens cannot go on unchanged and ends UNAVAILABLE. Two replicas (TP=1, CPU) behind one
gateway, real gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.cluster.launcher import ServeOptions
from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.engine.engine_utils import make_prompts
from tests.gateway.gateway_utils import ids_request, started_server

pytestmark = pytest.mark.timeout(180)

MAX_TOKENS = 300
NUM_GREEDY = 6


@pytest.fixture(scope="module")
def config(tiny_checkpoint):
    return EngineConfig(model=tiny_checkpoint, device="cpu", num_gpu_blocks_override=512,
                        cpu_threads=1)


def test_requests_of_a_killed_replica_finish_on_the_other_one(aio, ray_cluster, config):
    prompts = make_prompts([4 + i for i in range(NUM_GREEDY + 1)], seed=31)
    offline = LLM(model=config.model, device="cpu", num_gpu_blocks_override=512)
    expected = [o.outputs[0].token_ids for o in offline.generate(
        prompts[:NUM_GREEDY], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                             ignore_eos=True), use_tqdm=False)]
    with started_server(aio, config, ServeOptions(host="127.0.0.1", port=0,
                                                  replicas=2)) as server:
        gateway = server.gateway

        async def main():
            channel = grpc.aio.insecure_channel(server.address)
            stub = generation_pb2_grpc.GenerationStub(channel)
            requests = [ids_request(p, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
                        for p in prompts[:NUM_GREEDY]]
            requests.append(ids_request(prompts[-1], temperature=1.0, seed=7,
                                        max_tokens=MAX_TOKENS, ignore_eos=True))
            for index, request in enumerate(requests):
                request.request_id = f"f{index}"
            calls = [stub.GenerateStream(r, timeout=120) for r in requests]
            tokens = [list((await call.read()).delta.token_ids) for call in calls]
            # The seeded request's replica fails.
            victim_index = gateway.replicas.index(gateway._owner["f6"])
            victim = gateway.replicas[victim_index]
            on_victim = sorted(i for i, owner in gateway._owner.items() if owner is victim)
            await asyncio.to_thread(ray_cluster.kill, server.coordinators[victim_index])
            outcomes = []
            for index, call in enumerate(calls):
                try:
                    while (message := await call.read()) is not grpc.aio.EOF:
                        if message.WhichOneof("event") == "delta":
                            tokens[index] += message.delta.token_ids
                        else:
                            outcomes.append((message.final.completions[0].finish_reason,
                                             message.final.usage.completion_tokens))
                except grpc.aio.AioRpcError as error:
                    outcomes.append(error.code())
            await channel.close()
            return victim_index, on_victim, tokens, outcomes

        victim_index, on_victim, tokens, outcomes = aio.run(main(), timeout=150)
        assert any(f"f{i}" in on_victim for i in range(NUM_GREEDY))
        assert tokens[:NUM_GREEDY] == expected
        assert outcomes[:NUM_GREEDY] == [(pb.FINISH_REASON_LENGTH, MAX_TOKENS)] * NUM_GREEDY
        assert outcomes[-1] == grpc.StatusCode.UNAVAILABLE
        assert [r.up for r in gateway.replicas] == [victim_index == 1, victim_index == 0]


def test_a_restarted_coordinator_serves_again_through_the_same_gateway(aio, ray_cluster,
                                                                        config):
    """Its process killed (SIGKILL): the stream in flight ends UNAVAILABLE (no other replica),
    Ray starts the coordinator again (new ranks, a new port), the gateway reconnects and serves
    the next request on it."""
    import os
    import signal
    import time

    (prompt,) = make_prompts([6], seed=32)
    expected = LLM(model=config.model, device="cpu", num_gpu_blocks_override=512).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    options = ServeOptions(host="127.0.0.1", port=0, max_coordinator_restarts=1)
    with started_server(aio, config, options) as server:
        gateway = server.gateway
        handle = server.coordinators[0]
        pid = ray_cluster.get(handle.__ray_call__.remote(lambda self: os.getpid()))

        async def main():
            channel = grpc.aio.insecure_channel(server.address)
            stub = generation_pb2_grpc.GenerationStub(channel)
            call = stub.GenerateStream(ids_request(prompt, temperature=0.0, max_tokens=1500,
                                                   ignore_eos=True), timeout=120)
            await call.read()
            os.kill(pid, signal.SIGKILL)
            try:
                while await call.read() is not grpc.aio.EOF:
                    pass
                code = None
            except grpc.aio.AioRpcError as error:
                code = error.code()
            deadline = time.monotonic() + 90
            while not gateway.replicas[0].up:
                assert time.monotonic() < deadline, "the gateway never reconnected"
                await asyncio.sleep(0.1)
            reply = await stub.Generate(ids_request(prompt, temperature=0.0, max_tokens=16,
                                                    ignore_eos=True), timeout=60)
            await channel.close()
            return code, list(reply.completions[0].token_ids)

        code, tokens = aio.run(main(), timeout=150)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert tokens == expected
        new_pid = ray_cluster.get(handle.__ray_call__.remote(lambda self: os.getpid()))
        assert new_pid != pid
