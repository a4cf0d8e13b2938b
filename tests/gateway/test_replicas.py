"""Several replicas behind one gateway: `serve`'s replica flags, each replica's placement group,
prefix-affinity and round-robin routing seen in the coordinators' prefix-cache counters, the
status and metrics of every replica, and a replica drained (its request in flight finishes,
nothing new reaches it), removed and another added while serving. Two replicas (TP=1 as Ray
actors, CPU) of the tiny model, real gRPC on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import pytest

from pagedserve.cli_serve import add_serve_arguments, replica_options
from pagedserve.cluster.launcher import ServeOptions
from pagedserve.cluster.placement import REPLICA_GROUP_PREFIX, spread_target
from pagedserve.cluster.router import RoutingConfig
from pagedserve.config import EngineConfig
from pagedserve.errors import InvalidArgument
from pagedserve.protos.v1 import generation_pb2 as pb
from pagedserve.protos.v1 import generation_pb2_grpc
from tests.engine.engine_utils import make_prompts
from tests.gateway.gateway_utils import ids_request, started_server, wait_until
from tests.helpers.prometheus_text import parse_samples, value

pytestmark = pytest.mark.timeout(240)

BLOCK_SIZE = 16
PREFIX_BLOCKS = 4


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(("argv", "replicas", "scaling", "policy"), [
    ((), 1, None, "prefix_affinity"),
    (("--replicas", "2"), 2, None, "prefix_affinity"),
    (("--min-replicas", "1", "--max-replicas", "3"), 1, (1, 3), "prefix_affinity"),
    (("--min-replicas", "2"), 2, (2, 2), "prefix_affinity"),
    (("--max-replicas", "3"), 1, (1, 3), "prefix_affinity"),
    (("--replicas", "2", "--max-replicas", "4", "--routing-policy", "round_robin"), 2, (2, 4),
     "round_robin"),
])
def test_serve_flags_give_the_replica_options(argv, replicas, scaling, policy):
    options = ServeOptions(**replica_options(parse(*argv)))
    autoscaler = options.autoscaler
    assert options.replicas == replicas and options.routing.policy == policy
    assert scaling == (None if autoscaler is None else (autoscaler.min_replicas,
                                                         autoscaler.max_replicas))


@pytest.mark.parametrize(("argv", "field"), [
    (("--replicas", "0"), "ServeOptions.replicas"),
    (("--replicas", "-2"), "ServeOptions.replicas"),
    (("--replicas", "5", "--max-replicas", "4"), "ServeOptions.replicas"),
    (("--replicas", "1", "--min-replicas", "2"), "ServeOptions.replicas"),
    (("--min-replicas", "3", "--max-replicas", "2"), "AutoscalerConfig.max_replicas"),
    (("--min-replicas", "0", "--max-replicas", "2"), "AutoscalerConfig.min_replicas"),
    (("--max-replicas", "2", "--target-kv-usage", "1.5"), "AutoscalerConfig.target_kv_usage"),
    (("--max-replicas", "2", "--upscale-delay-s", "nan"), "AutoscalerConfig.upscale_delay_s"),
])
def test_serve_refuses_bad_replica_flags_naming_the_field(argv, field):
    with pytest.raises(InvalidArgument, match=field):
        ServeOptions(**replica_options(parse(*argv)))


def test_serve_refuses_an_unknown_routing_policy(capsys):
    with pytest.raises(SystemExit):
        parse("--routing-policy", "random")
    assert "invalid choice: 'random'" in capsys.readouterr().err


def test_spread_target_picks_the_node_with_fewest_replicas_that_fits():
    capacity = {"a": 8, "b": 8, "c": 1}
    assert spread_target(capacity, [], 2) == "a"
    assert spread_target(capacity, ["a"], 2) == "b"
    assert spread_target(capacity, ["a", "b", "a"], 2) == "b"
    assert spread_target(capacity, ["a", "b"], 1) == "c"
    assert spread_target(capacity, [], 9) is None
    assert spread_target({}, [], 1) is None


@pytest.fixture(scope="module")
def earlier_groups(ray_cluster) -> set[str]:
    """Replica groups of the folder's Ray cluster before this module's server (a coordinator
    killed by an earlier module leaves its group behind)."""
    return {g["placement_group_id"] for g in replica_groups(ray_cluster, set())}


@pytest.fixture(scope="module")
def served(aio, ray_cluster, tiny_checkpoint, earlier_groups):
    config = EngineConfig(model=tiny_checkpoint, device="cpu", num_gpu_blocks_override=256,
                          block_size=BLOCK_SIZE, cpu_threads=1,
                          distributed_executor_backend="ray")
    options = ServeOptions(host="127.0.0.1", port=0, replicas=2)
    with started_server(aio, config, options) as server:
        yield server


def replica_groups(ray, earlier: set[str]) -> list[dict]:
    """The placed replica groups, less `earlier` ones (by id)."""
    return [group for group in ray.util.placement_group_table().values()
            if group["name"].startswith(REPLICA_GROUP_PREFIX) and group["state"] == "CREATED"
            and group["placement_group_id"] not in earlier]


def coordinator_names(ray, server) -> list[str]:
    prefix = f"pagedserve-coordinator-{server.instance}-"
    return sorted(name for name in ray.util.list_named_actors() if name.startswith(prefix))


def prefix_hits(server) -> list[int]:
    return [replica.stats.prefix_cache_hits for replica in server.gateway.replicas]


async def generate(server, prompts, **sampling) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return [await stub.Generate(ids_request(p, temperature=0.0, ignore_eos=True,
                                                **sampling), timeout=60)
                for p in prompts]


def test_each_replica_has_its_own_strict_pack_group(served, ray_cluster, earlier_groups):
    groups = replica_groups(ray_cluster, earlier_groups)
    assert len(groups) == 2
    assert [(g["strategy"], len(g["bundles"])) for g in groups] == [("STRICT_PACK", 1)] * 2


def test_affinity_sends_a_shared_prefix_to_one_replica_and_hits_its_cache(aio, served):
    prefix, *suffixes = make_prompts([PREFIX_BLOCKS * BLOCK_SIZE] + [5] * 6, seed=41)
    before = prefix_hits(served)
    aio.run(generate(served, [prefix + s for s in suffixes], max_tokens=2), timeout=120)
    # The first request computes the prefix; the other five find all its blocks.
    expected = 5 * PREFIX_BLOCKS * BLOCK_SIZE
    assert wait_until(lambda: sorted(
        a - b for a, b in zip(prefix_hits(served), before, strict=True)) == [0, expected])


def test_round_robin_spreads_the_same_prefix_over_both(aio, served):
    gateway = served.gateway
    gateway.use_routing(RoutingConfig(policy="round_robin"))
    try:
        prefix, *suffixes = make_prompts([PREFIX_BLOCKS * BLOCK_SIZE] + [5] * 6, seed=42)
        before = prefix_hits(served)
        aio.run(generate(served, [prefix + s for s in suffixes], max_tokens=2), timeout=120)
        # Each replica computes the prefix once and finds it twice afterwards.
        each = 2 * PREFIX_BLOCKS * BLOCK_SIZE
        assert wait_until(lambda: [a - b for a, b in zip(prefix_hits(served), before,
                                                           strict=True)] == [each, each])
    finally:
        gateway.use_routing(RoutingConfig())


def test_status_and_metrics_show_every_replica(aio, served):
    async def main():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            return await stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=30)

    status = aio.run(main())
    assert [(r.index, r.up) for r in status.replicas] == [(0, True), (1, True)]
    assert status.load.num_replicas_up == 2

    async def render():
        return served.gateway.metrics.render()

    samples = parse_samples(aio.run(render())[0])
    name = served.gateway.model_name
    hits = [value(samples, "pagedserve:prefix_cache_hits_total", model_name=name,
                  replica=label) for label in ("0", "1")]
    assert hits == [float(h) for h in prefix_hits(served)]


def test_a_drained_replica_finishes_its_request_then_goes_and_a_new_one_comes(
        aio, served, ray_cluster, earlier_groups):
    gateway = served.gateway
    long_prompt, short_prompt = make_prompts([7, 6], seed=43)

    async def main():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            call = stub.GenerateStream(ids_request(long_prompt, temperature=0.0,
                                                   max_tokens=1200, ignore_eos=True),
                                       timeout=120)
            await call.read()  # its first token: it runs on some replica
            victim = next(r for r in gateway.replicas if r.in_flight == 1)
            other = next(r for r in gateway.replicas if r is not victim)
            index = served.serving().index(victim)
            removal = asyncio.ensure_future(served.remove_replica(index))
            await asyncio.sleep(0.2)
            assert victim.draining and victim in gateway.replicas
            # New requests go to the other replica while the drained one finishes.
            reply = await stub.Generate(ids_request(short_prompt, temperature=0.0,
                                                    max_tokens=3, ignore_eos=True), timeout=60)
            assert other.in_flight == 0 and victim.in_flight == 1
            finals = []
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.WhichOneof("event") == "final":
                    finals.append(message.final)
            await asyncio.wait_for(removal, 60)
            return victim, other, finals, reply

    victim, other, (final,), reply = aio.run(main(), timeout=180)
    assert final.completions[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 1200
    assert len(reply.completions[0].token_ids) == 3
    assert gateway.replicas == [other] and len(served.coordinators) == 1
    assert gateway.model_info.num_replicas == 1
    assert len(replica_groups(ray_cluster, earlier_groups)) == 1
    assert len(coordinator_names(ray_cluster, served)) == 1

    added = aio.run(served.add_replica(), timeout=120)
    assert added.label == "2" and added.up
    assert gateway.replicas == [other, added] and len(served.coordinators) == 2
    assert len(replica_groups(ray_cluster, earlier_groups)) == 2
    assert coordinator_names(ray_cluster, served)[-1].endswith("-2")
    replies = aio.run(generate(served, make_prompts([5, 6], seed=44), max_tokens=4))
    assert [len(r.completions[0].token_ids) for r in replies] == [4, 4]
    # Nothing left counted against any replica.
    assert [(r.in_flight, r.in_flight_tokens) for r in gateway.replicas] == [(0, 0), (0, 0)]
