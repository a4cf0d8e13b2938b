"""The fleet's naming, the gateway's diff of replicas and how a poll acts on it, and the
coordinator load source of the autoscaler: no Ray (its looks are scripted)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedserve.cluster.autoscaler import AutoscaleController, AutoscalerConfig, LoadSample
from pagedserve.cluster.fleet import load_sample_from
from pagedserve.cluster.fleet_discovery import (
    FLEET_NAMESPACE,
    FleetChange,
    FleetDiscovery,
    diff_replicas,
    fleet_replica_names,
    is_draining,
    replica_actor_name,
    replica_number,
)
from pagedserve.errors import InvalidArgument, Unavailable
from pagedserve.protos.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(60)


def test_a_replica_name_gives_back_its_number_only_for_its_own_model():
    assert replica_actor_name("tiny", 7) == "replica-tiny-7"
    assert replica_number("replica-tiny-7", "tiny") == 7
    assert replica_number("replica-tiny-bar-3", "tiny") is None  # model "tiny-bar"
    assert replica_number("replica-tiny-bar-3", "tiny-bar") == 3
    assert replica_number("replica-tiny-", "tiny") is None
    assert replica_number("replica-tiny-x1", "tiny") is None
    assert replica_number("replica-tiny--1", "tiny") is None
    assert replica_number("tiny-1", "tiny") is None
    assert replica_number("replica-tiny-1", "") is None


def test_only_this_model_s_replicas_in_the_fleet_namespace_are_listed_in_start_order():
    listed = [{"name": "replica-m-10", "namespace": FLEET_NAMESPACE},
              {"name": "replica-m-2", "namespace": FLEET_NAMESPACE},
              {"name": "replica-m-3", "namespace": "someone-else"},
              {"name": "replica-m2-4", "namespace": FLEET_NAMESPACE},
              {"name": "pagedserve-coordinator-ab-0", "namespace": FLEET_NAMESPACE},
              {"name": "replica-m-2", "namespace": FLEET_NAMESPACE}]
    assert fleet_replica_names(listed, "m") == ["replica-m-2", "replica-m-10"]
    assert fleet_replica_names(listed, "m", namespace="someone-else") == ["replica-m-3"]
    assert fleet_replica_names([], "m") == []


def test_the_diff_adds_new_names_and_removes_gone_ones_in_fleet_order():
    change = diff_replicas(["replica-m-0", "replica-m-1"],
                           ["replica-m-1", "replica-m-12", "replica-m-3"], "m")
    assert change == FleetChange(added=("replica-m-3", "replica-m-12"),
                                 removed=("replica-m-0",))
    assert diff_replicas([], [], "m") == FleetChange((), ())
    assert diff_replicas(["replica-m-0"], ["replica-m-0"], "m") == FleetChange((), ())


names = st.sets(st.integers(0, 40).map(lambda n: replica_actor_name("m", n)), max_size=12)


@given(known=names, serving=names)
def test_applying_the_diff_gives_exactly_the_serving_set(known, serving):
    change = diff_replicas(known, serving, "m")
    assert (known - set(change.removed)) | set(change.added) == serving
    assert not set(change.added) & known and set(change.removed) <= known
    for part in (change.added, change.removed):
        assert [replica_number(n, "m") for n in part] == sorted(replica_number(n, "m")
                                                                for n in part)


@pytest.mark.parametrize(("health", "draining"), [
    ({"healthy": True, "failure": None, "restarting_workers": False}, False),
    ({"healthy": False, "failure": None, "restarting_workers": False}, True),
    ({"healthy": False, "failure": "rank 0 died", "restarting_workers": False}, False),
    ({"healthy": False, "failure": None, "restarting_workers": True}, False),
])
def test_only_a_refusing_coordinator_that_did_not_fail_counts_as_draining(health, draining):
    assert is_draining(health) is draining


def test_the_coordinator_load_source_counts_running_and_waiting_and_kv_use():
    loads = [pb.ServerLoad(num_running=3, num_waiting=2, kv_blocks_used=30, kv_blocks_total=120),
             None, pb.ServerLoad(num_running=0, num_waiting=1, kv_blocks_total=0)]
    assert load_sample_from(loads, 5.0) == LoadSample(5.0, (5, 0, 1), (0.25, 0.0, 0.0))
    assert load_sample_from([], 1.0) == LoadSample(1.0, (), ())


def test_the_controller_takes_an_async_load_source():
    config = AutoscalerConfig(min_replicas=1, max_replicas=3, target_queue_depth=2.0,
                              upscale_delay_s=0.0, downscale_delay_s=100.0)
    replicas = [0]

    async def sample() -> LoadSample:
        await asyncio.sleep(0)
        return LoadSample(1.0, tuple(3 for _ in replicas), tuple(0.0 for _ in replicas))

    async def scale_up() -> None:
        replicas.append(0)

    async def scale_down(index: int) -> None:
        raise AssertionError("no scale-down wanted")

    controller = AutoscaleController(config, sample, scale_up, scale_down)
    asyncio.run(controller.step())
    assert controller.decisions == [(1, 2)] and len(replicas) == 2


class ScriptedDiscovery(FleetDiscovery):
    """FleetDiscovery whose looks at Ray return what the test says, in turn."""

    def __init__(self, looks: list[dict[str, str]]) -> None:
        async def resolve(handle: str) -> str:
            return f"address-of-{handle}"

        super().__init__("m", resolve, interval_s=0.01, drain_timeout_s=1.0)
        self.looks = looks

    async def _serving(self) -> dict[str, str]:
        return self.looks.pop(0)


class RecordingGateway:
    def __init__(self, names: list[str]) -> None:
        self.replicas = [f"client-{name}" for name in names]
        self.calls: list[tuple[str, str]] = []

    async def add_replica(self, address: str, resolve) -> str:
        assert await resolve() == address
        self.calls.append(("add", address))
        self.replicas.append(f"client-{address}")
        return self.replicas[-1]

    async def drain(self, replica: str, timeout_s: float) -> bool:
        self.calls.append(("drain", replica))
        await asyncio.sleep(0)
        return True

    async def remove_replica(self, replica: str) -> None:
        self.calls.append(("remove", replica))
        self.replicas.remove(replica)


def test_refresh_adds_new_replicas_and_drains_then_removes_gone_ones():
    zero, one, two = (replica_actor_name("m", n) for n in range(3))

    async def scenario() -> tuple[list, dict, list]:
        discovery = ScriptedDiscovery([{one: "h1", two: "h2"}, {one: "h1", two: "h2"}])
        gateway = RecordingGateway([zero, one])
        discovery.attach(gateway, [zero, one])
        changes = [await discovery.refresh()]
        await asyncio.gather(*discovery._removing.values())
        changes.append(await discovery.refresh())  # nothing new: nothing done
        return changes, dict(discovery.clients), gateway.calls

    changes, clients, calls = asyncio.run(scenario())
    assert changes == [FleetChange(added=(two,), removed=(zero,)), FleetChange((), ())]
    assert clients == {one: f"client-{one}", two: "client-address-of-h2"}
    assert calls == [("add", "address-of-h2"), ("drain", f"client-{zero}"),
                     ("remove", f"client-{zero}")]


def test_no_replica_within_the_timeout_is_unavailable_naming_the_fleet():
    async def scenario() -> None:
        discovery = ScriptedDiscovery([{}] * 1000)
        await discovery.wait_for_replicas(0.05)

    with pytest.raises(Unavailable, match=r"no fleet replica of 'm' in Ray namespace "
                                          r"'pagedserve' within 0 s"):
        asyncio.run(scenario())


def test_the_cli_offers_exactly_the_launcher_s_roles():
    from pagedserve.cli_serve import ROLES
    from pagedserve.cluster.launcher import SERVE_ROLES, ServeOptions

    assert ROLES == SERVE_ROLES == ("all", "fleet", "gateway")
    with pytest.raises(InvalidArgument, match="ServeOptions.role must be one of"):
        ServeOptions(role="both")
    with pytest.raises(InvalidArgument, match="ServeOptions.ray_address must be the fleet's"):
        ServeOptions(role="gateway")
    for name in ("discovery_interval_s", "discovery_timeout_s"):
        for bad in (0, -1.0, float("nan"), float("inf"), "2"):
            with pytest.raises(InvalidArgument, match=f"ServeOptions.{name} must be"):
                ServeOptions(role="gateway", ray_address="auto", **{name: bad})
    assert ServeOptions(role="gateway", ray_address="auto").discovery_timeout_s == 120.0
