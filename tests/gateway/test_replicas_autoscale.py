"""The autoscaler on a local Ray cluster: sustained load scales 1 -> 2 replicas (a new
coordinator with its own placement group, taking new requests at once), idle scales back to 1
after the down-delay by draining (the drained replica's request in flight finishes there), and
no request fails. The tiny model on CPU, real gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pagedserve.cluster.autoscaler import AutoscalerConfig
from pagedserve.cluster.launcher import ServeOptions
from pagedserve.cluster.placement import REPLICA_GROUP_PREFIX
from pagedserve.config import EngineConfig
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.engine.engine_utils import make_prompts
from tests.gateway.gateway_utils import ids_request, started_server

pytestmark = pytest.mark.timeout(300)

SCALING = AutoscalerConfig(min_replicas=1, max_replicas=2, target_queue_depth=3,
                           target_kv_usage=1.0, upscale_delay_s=1.0, downscale_delay_s=3.0,
                           interval_s=0.2)


def replica_groups(ray) -> list[dict]:
    return [group for group in ray.util.placement_group_table().values()
            if group["name"].startswith(REPLICA_GROUP_PREFIX) and group["state"] == "CREATED"]


async def stream_to_end(stub, prompt: list[int], max_tokens: int) -> tuple[int, int]:
    """(finish reason, tokens streamed) of one greedy stream read to its end."""
    call = stub.GenerateStream(ids_request(prompt, temperature=0.0, max_tokens=max_tokens,
                                           ignore_eos=True), timeout=240)
    tokens, reason = 0, None
    async for message in call:
        if message.WhichOneof("event") == "delta":
            tokens += len(message.delta.token_ids)
        else:
            reason = message.final.completions[0].finish_reason
    return reason, tokens


async def until(condition, timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.05)


def test_load_scales_up_and_idle_scales_down_with_no_request_lost(aio, ray_cluster,
                                                                   tiny_checkpoint):
    config = EngineConfig(model=tiny_checkpoint, device="cpu", num_gpu_blocks_override=512,
                          max_num_seqs=4, cpu_threads=1, distributed_executor_backend="ray")
    options = ServeOptions(host="127.0.0.1", port=0, replicas=1, autoscaler=SCALING)
    prompts = make_prompts([5 + i % 7 for i in range(16)], seed=51)
    # A coordinator killed by an earlier module leaves its group behind: not this server's.
    earlier = {g["placement_group_id"] for g in replica_groups(ray_cluster)}
    with started_server(aio, config, options) as server:
        gateway = server.gateway

        async def main():
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                # Load: 8 requests on one replica, over the target of 3 for the up-delay.
                first = [asyncio.ensure_future(stream_to_end(stub, p, 400))
                         for p in prompts[:8]]
                await until(lambda: len(gateway.replicas) == 2, 120, "scale-up")
                added = gateway.replicas[1]
                second = [asyncio.ensure_future(stream_to_end(stub, p, 200))
                          for p in prompts[8:12]]
                await until(lambda: added.in_flight > 0, 10, "the new replica gets requests")
                loaded = await asyncio.gather(*first, *second)
                # Light load: one long request per replica, under the target: one replica is
                # drained while its request runs, and that request finishes there.
                light = [asyncio.ensure_future(stream_to_end(stub, p, 1900))
                         for p in prompts[12:14]]
                await until(lambda: sum(r.in_flight for r in gateway.replicas) == 2, 10,
                            "both long requests admitted")
                placed = sorted(r.in_flight for r in gateway.replicas)
                drained_busy = 0
                while len(gateway.replicas) == 2:
                    drained_busy = max([drained_busy] + [r.in_flight for r in gateway.replicas
                                                         if r.draining])
                    await asyncio.sleep(0.05)
                done = await asyncio.wait_for(asyncio.gather(*light), 180)
                await until(lambda: len(server.autoscaler.decisions) == 2, 60,
                            "the drained coordinator stopped")
                return loaded, placed, drained_busy, done

        loaded, placed, drained_busy, done = aio.run(main(), timeout=280)
        assert loaded == [(pb.FINISH_REASON_LENGTH, 400)] * 8 \
            + [(pb.FINISH_REASON_LENGTH, 200)] * 4
        assert placed == [1, 1]
        assert drained_busy == 1
        assert done == [(pb.FINISH_REASON_LENGTH, 1900)] * 2
        assert server.autoscaler.decisions == [(1, 2), (2, 1)]
        assert len(gateway.replicas) == len(server.coordinators) == 1
        assert (gateway.replicas[0].in_flight, gateway.replicas[0].in_flight_tokens) == (0, 0)
        assert len([g for g in replica_groups(ray_cluster)
                    if g["placement_group_id"] not in earlier]) == 1
    assert not [name for name in ray_cluster.util.list_named_actors()
                if name.startswith(f"pagedserve-coordinator-{server.instance}-")]
