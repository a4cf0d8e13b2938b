"""Routing policies over crafted loads and prefixes (exact choices, the guard, ties), the
gateway's prefix index (the scheduler's own hashes, LRU bound) and the Router that feeds them.
Plain data: no Ray, no servers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedserve.cluster.prefix_index import PrefixIndex, prompt_block_hashes
from pagedserve.cluster.router import (
    ReplicaLoad,
    Router,
    RoutingConfig,
    least_loaded,
    prefix_affinity,
    request_cost,
    round_robin,
)
from pagedserve.engine.core import EngineCoreRequest
from pagedserve.errors import InvalidArgument
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.scheduler.request import Request

CONFIG = RoutingConfig()


@pytest.fixture(scope="module", autouse=True)
def local_ray_cluster():
    """Plain data here: no Ray cluster (overrides the folder's autouse one)."""
    yield


def test_round_robin_takes_the_replicas_in_turn_whatever_their_load():
    loads = [ReplicaLoad(queue_depth=50), ReplicaLoad(), ReplicaLoad(kv_usage=0.9)]
    assert [round_robin(loads, turn, CONFIG) for turn in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_loaded_orders_by_tokens_then_queue_then_kv():
    loads = [ReplicaLoad(in_flight_tokens=900, queue_depth=0, kv_usage=0.0),
             ReplicaLoad(in_flight_tokens=800, queue_depth=3, kv_usage=0.1),
             ReplicaLoad(in_flight_tokens=800, queue_depth=2, kv_usage=0.9),
             ReplicaLoad(in_flight_tokens=800, queue_depth=2, kv_usage=0.5)]
    assert least_loaded(loads, 0, CONFIG) == 3
    assert least_loaded(loads[:3], 0, CONFIG) == 2
    assert least_loaded(loads[:2], 0, CONFIG) == 1
    assert least_loaded(loads[:1], 0, CONFIG) == 0


def test_least_loaded_breaks_ties_in_turn():
    loads = [ReplicaLoad(in_flight_tokens=5), ReplicaLoad(in_flight_tokens=3),
             ReplicaLoad(in_flight_tokens=5), ReplicaLoad(in_flight_tokens=3)]
    assert [least_loaded(loads, turn, CONFIG) for turn in range(4)] == [1, 3, 1, 3]


def held(blocks: int, prompt: int = 1000, output: int = 10, block_size: int = 16) -> dict:
    """A 1000-token prompt with 10 to generate, `blocks` of it cached at the replica."""
    return {"cached_blocks": blocks, "new_tokens": prompt - blocks * block_size + output}


def test_affinity_leaves_the_least_work_queued_counting_the_hit():
    # Work after the request: 0 + 850, 300 + 370, 0 + 1010.
    loads = [ReplicaLoad(**held(10)), ReplicaLoad(in_flight_tokens=300, **held(40)),
             ReplicaLoad(**held(0))]
    assert prefix_affinity(loads, 0, CONFIG) == 1


def test_affinity_gives_up_a_holder_busier_by_more_than_the_hit_saves():
    # 700 + 370 = 1070 > 0 + 850: the shorter hit wins; at 480 + 370 = 850 the tie goes to the
    # longer cached run.
    busy = [ReplicaLoad(**held(10)), ReplicaLoad(in_flight_tokens=700, **held(40))]
    assert prefix_affinity(busy, 0, CONFIG) == 0
    even = [ReplicaLoad(**held(10)), ReplicaLoad(in_flight_tokens=480, **held(40))]
    assert prefix_affinity(even, 0, CONFIG) == 1


def test_affinity_without_any_cached_block_is_least_loaded():
    loads = [ReplicaLoad(in_flight_tokens=30), ReplicaLoad(in_flight_tokens=10),
             ReplicaLoad(in_flight_tokens=20)]
    assert [prefix_affinity(loads, turn, CONFIG) for turn in range(3)] == [1, 1, 1]


def test_affinity_ties_on_work_go_to_the_longest_run_then_in_turn():
    # Work: 100 + 946, 50 + 946 and 2 + 994: the last two tie; the longer run wins.
    loads = [ReplicaLoad(in_flight_tokens=100, **held(4)),
             ReplicaLoad(in_flight_tokens=50, **held(4)),
             ReplicaLoad(in_flight_tokens=2, **held(1))]
    assert prefix_affinity(loads, 0, CONFIG) == 1
    even = [ReplicaLoad(**held(4)), ReplicaLoad(**held(4)), ReplicaLoad(**held(0))]
    assert [prefix_affinity(even, turn, CONFIG) for turn in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize(("preferred_queue", "least_queue", "expected"), [
    (24, 10, 0),   # 24 <= 2 * 10 + 4: affinity holds
    (25, 10, 1),   # 25 > 24: the guard sends it to the least loaded
    (4, 0, 0),     # an idle peer: up to the slack is still fine
    (5, 0, 1),
])
def test_the_guard_overrides_affinity_when_the_holder_is_much_busier(
        preferred_queue, least_queue, expected):
    # Equal tokens in flight: the hit makes replica 0 the cheaper one; only the queues differ.
    loads = [ReplicaLoad(queue_depth=preferred_queue, **held(8)),
             ReplicaLoad(queue_depth=least_queue, **held(0))]
    assert prefix_affinity(loads, 0, RoutingConfig(guard_ratio=2.0, guard_slack=4)) == expected


@pytest.mark.parametrize(("field", "value"), [
    ("policy", "random"), ("guard_ratio", 0.5), ("guard_ratio", float("nan")),
    ("guard_slack", -1), ("guard_slack", True), ("max_prefix_blocks", 0),
])
def test_routing_config_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(InvalidArgument, match=f"RoutingConfig.{field}"):
        RoutingConfig(**{field: value})


@pytest.mark.parametrize("salt", [None, "tenant-a"])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 33, 64, 65])
def test_prompt_hashes_are_the_schedulers_own(salt, length):
    prompt = [(7 * i + 3) % 101 for i in range(length)]
    request = Request("r", prompt, SamplingParams(), cache_salt=salt)
    KVCacheManager(16, 64).find_cached_prefix(request)  # hashes the blocks it could reuse
    assert prompt_block_hashes(prompt, 16, salt, max_blocks=100) == request.block_hashes
    assert len(request.block_hashes) == (length - 1) // 16


def test_prompt_hashes_depend_on_salt_block_size_and_cap():
    prompt = list(range(70))
    plain = prompt_block_hashes(prompt, 16, None, 100)
    assert len(plain) == 4
    assert prompt_block_hashes(prompt, 16, None, 2) == plain[:2]
    assert prompt_block_hashes(prompt, 16, "s", 100)[0] != plain[0]
    assert prompt_block_hashes(prompt, 8, None, 100)[0] != plain[0]
    assert prompt_block_hashes([], 16, None, 100) == []


def test_prefix_index_matches_leading_blocks_only():
    index = PrefixIndex()
    index.record("a", [b"1", b"2", b"3"], capacity=10)
    assert index.matched("a", [b"1", b"2", b"9", b"3"]) == 2
    assert index.matched("a", [b"9", b"1", b"2"]) == 0
    assert index.matched("b", [b"1"]) == 0
    index.forget("a")
    assert index.matched("a", [b"1"]) == 0


def test_prefix_index_evicts_least_recent_tails_first():
    index = PrefixIndex()
    index.record("a", [b"p", b"x1", b"x2"], capacity=4)
    index.record("a", [b"p", b"y1", b"y2"], capacity=4)
    # p was touched last: the older chain loses its tail, never the shared parent.
    assert index.size("a") == 4
    assert index.matched("a", [b"p", b"y1", b"y2"]) == 3
    assert index.matched("a", [b"p", b"x1", b"x2"]) == 2  # x2, the oldest tail, went


@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=6), max_size=30),
       st.integers(1, 8))
def test_prefix_index_never_holds_more_than_its_capacity(chains, capacity):
    index = PrefixIndex()
    for chain in chains:
        index.record("r", [bytes([c]) for c in chain], capacity)
        assert index.size("r") <= capacity
        assert index.matched("r", [bytes([c]) for c in chain]) <= len(chain)


class FakeReplica:
    """What Router reads of a ReplicaClient (hashable by identity, as a ReplicaClient)."""

    def __init__(self, in_flight=0, tokens=0, used=0, total=100, blocks=1000):
        self.stats = SimpleNamespace(kv_blocks_used=used, kv_blocks_total=total)
        self.in_flight = in_flight
        self.in_flight_tokens = tokens
        self.model_info = SimpleNamespace(num_kv_blocks=blocks)


_replica = FakeReplica


def _request(prompt, salt=None, max_tokens=8):
    return EngineCoreRequest("r", list(prompt), SamplingParams(max_tokens=max_tokens),
                             cache_salt=salt)


def test_router_sends_a_shared_prefix_back_to_its_replica():
    router = Router()
    replicas = [_replica(tokens=10), _replica(tokens=0), _replica(tokens=5)]
    system = list(range(64))
    first, cost = router.pick(replicas, _request(system + [1000, 1001]))
    assert (first, cost) == (replicas[1], 66 + 8)
    # The busiest now, but its 4 cached blocks (64 tokens) save more than the 55 tokens it has
    # beyond replica 2: 60 + (67 - 64 + 8) = 71 < 5 + 75.
    first.in_flight, first.in_flight_tokens = 1, 60
    assert router.pick(replicas, _request(system + [2000, 2001, 2002])) == (replicas[1], 11)
    # Another salt shares nothing: least-loaded.
    assert router.pick(replicas, _request(system + [1000], salt="other")) == (replicas[2], 73)
    router.forget(replicas[1])
    assert router.pick(replicas, _request(system + [3000]))[0] is replicas[2]


def test_router_round_robin_records_no_prefix():
    router = Router(RoutingConfig(policy="round_robin"))
    replicas = [_replica(), _replica()]
    picks = [router.pick(replicas, _request(range(40))) for _ in range(4)]
    assert picks == [(replicas[0], 48), (replicas[1], 48)] * 2
    assert router.prefixes.size(replicas[0]) == 0


def test_router_least_loaded_reads_the_gateway_counts_and_the_coordinator_kv():
    router = Router(RoutingConfig(policy="least_loaded"))
    replicas = [_replica(in_flight=2, tokens=10), _replica(tokens=10, used=90),
                _replica(tokens=10, used=10)]
    assert router.pick(replicas, _request(range(3))) == (replicas[2], 11)


def test_request_cost_counts_prompt_and_every_sequence_budget():
    assert request_cost(_request(range(10), max_tokens=6)) == 16
    assert request_cost(_request(range(40), max_tokens=6), cached_tokens=32) == 14
    assert request_cost(EngineCoreRequest("r", [1, 2], SamplingParams(n=3, max_tokens=4))) == 14
    assert request_cost(EngineCoreRequest("r", [1, 2], BeamSearchParams(
        beam_width=2, max_tokens=5))) == 12
