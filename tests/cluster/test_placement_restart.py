"""A coordinator that Ray restarts (max_restarts) after an abnormal death holds one placement
group, not two: Ray keeps a group while its creating actor may still restart, so the new
incarnation removes the groups its earlier incarnations made, and only those (another
replica's group and a driver's stay). A rank rebuild inside one live coordinator also leaves
exactly one group. Local Ray on CPU."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

from pagedserve.cluster.coordinator import start_coordinator, stop_coordinator
from pagedserve.cluster.placement import (
    REPLICA_GROUP_PREFIX,
    ReplicaPlacement,
    remove_actor_groups,
)
from pagedserve.engine.core import EngineCoreRequest
from tests.cluster.test_coordinator import (
    PROMPTS,
    Result,
    _pid_ref,
    _workers,
    coordinator_config,
    open_stream,
)
from tests.engine.engine_utils import greedy

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slow

RESTART_TIMEOUT_S = 90.0
MAX_TOKENS = 12


class ReplicaLike:
    """An actor that, like a coordinator, makes its replica's group when it starts."""

    def __init__(self) -> None:
        self.placements = [ReplicaPlacement(1, "cpu")]

    def identity(self) -> tuple[int, str]:
        """This incarnation's pid and its first group's id."""
        return os.getpid(), self.placements[0].group.id.hex()

    def place_another(self) -> str:
        """A second group in this incarnation (the first must stay); its id."""
        self.placements.append(ReplicaPlacement(1, "cpu"))
        return self.placements[-1].group.id.hex()


def live_replica_groups() -> dict[str, str]:
    """Group id -> state of every replica group Ray has not removed."""
    return {group_id: group["state"]
            for group_id, group in ray.util.placement_group_table().items()
            if group["name"].startswith(REPLICA_GROUP_PREFIX) and group["state"] != "REMOVED"}


def wait_for_no_replica_groups(timeout_s: float = 30.0) -> None:
    """Ray removes the groups of an actor that died for good a moment after it did."""
    deadline = time.monotonic() + timeout_s
    while live_replica_groups() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_replica_groups() == {}


def group_state(group_id: str) -> str:
    return ray.util.placement_group_table()[group_id]["state"]


def wait_for_new_incarnation(call, old_pid: int):
    """What `call()` (a ref to the actor's pid, or to a tuple that starts with it) answers once
    it comes from a process other than `old_pid`; calls that fail while Ray restarts the actor
    are made again."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while True:
        assert time.monotonic() < deadline, "the actor did not come back"
        try:
            answer = ray.get(call(), timeout=RESTART_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            time.sleep(0.2)
            continue
        if (answer if isinstance(answer, int) else answer[0]) != old_pid:
            return answer
        time.sleep(0.2)


def kill(actor, pid: int, how: str) -> None:
    if how == "sigkill":
        os.kill(pid, signal.SIGKILL)
    else:
        ray.kill(actor, no_restart=False)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["sigkill", "ray_kill"])
def test_a_restarted_actor_removes_only_the_group_of_its_earlier_incarnation(how):
    wait_for_no_replica_groups()
    actor_class = ray.remote(ReplicaLike).options(num_cpus=0, max_restarts=2)
    victim, bystander = actor_class.remote(), actor_class.remote()
    driver_placement = ReplicaPlacement(1, "cpu")
    try:
        old_pid, old_group = ray.get(victim.identity.remote())
        _, bystander_group = ray.get(bystander.identity.remote())
        driver_group = driver_placement.group.id.hex()
        assert live_replica_groups() == {old_group: "CREATED", bystander_group: "CREATED",
                                         driver_group: "CREATED"}

        kill(victim, old_pid, how)
        new_pid, new_group = wait_for_new_incarnation(victim.identity.remote, old_pid)

        assert new_group != old_group
        assert group_state(old_group) == "REMOVED"
        assert live_replica_groups() == {new_group: "CREATED", bystander_group: "CREATED",
                                         driver_group: "CREATED"}
        # Groups of the incarnation that makes a new one stay.
        second_group = ray.get(victim.place_another.remote())
        assert live_replica_groups() == {new_group: "CREATED", second_group: "CREATED",
                                         bystander_group: "CREATED", driver_group: "CREATED"}
        # A second restart removes both.
        kill(victim, new_pid, how)
        _, third_group = wait_for_new_incarnation(victim.identity.remote, new_pid)
        assert group_state(new_group) == group_state(second_group) == "REMOVED"
        assert live_replica_groups() == {third_group: "CREATED", bystander_group: "CREATED",
                                         driver_group: "CREATED"}
        for actor in (victim, bystander):
            ray.kill(actor)
        driver_placement.release()
        # Ray keeps the groups of an actor killed for good while this job runs: removed here,
        # as stop_coordinator does.
        assert live_replica_groups() == {third_group: "CREATED", bystander_group: "CREATED"}
        assert remove_actor_groups(victim._actor_id.hex()) == 1
        assert remove_actor_groups(bystander._actor_id.hex()) == 1
    finally:
        for actor in (victim, bystander):
            ray.kill(actor)
            remove_actor_groups(actor._actor_id.hex())  # whatever a failed check left
        driver_placement.release()
    wait_for_no_replica_groups()


def rank_group(handle) -> str:
    """The id of the group that the coordinator's rank 0 runs in."""
    return ray.get(_workers(handle)[0].__ray_call__.remote(
        lambda self: ray.get_runtime_context().get_placement_group_id()))


def stream_one(handle, request_id: str) -> Result:
    async def main():
        result = Result()
        async for ref in open_stream(handle, EngineCoreRequest(request_id, PROMPTS[3],
                                                               greedy(MAX_TOKENS))):
            result.add(await ref)
        return result

    return asyncio.run(asyncio.wait_for(main(), 120))


@pytest.mark.timeout(240)
def test_a_restarted_coordinator_holds_one_group_and_a_rank_rebuild_keeps_one(checkpoint):
    wait_for_no_replica_groups()
    handle = start_coordinator(coordinator_config(checkpoint("llama"), 1, max_worker_restarts=1),
                               max_restarts=1)
    try:
        old_pid, old_group = ray.get(_pid_ref(handle)), rank_group(handle)
        assert live_replica_groups() == {old_group: "CREATED"}
        expected = stream_one(handle, "before").tokens[0]
        assert len(expected) == MAX_TOKENS

        os.kill(old_pid, signal.SIGKILL)
        new_pid = wait_for_new_incarnation(lambda: _pid_ref(handle), old_pid)
        new_group = rank_group(handle)
        assert group_state(old_group) == "REMOVED"
        assert live_replica_groups() == {new_group: "CREATED"}
        assert stream_one(handle, "after-restart").tokens[0] == expected

        # A rank dies inside the live coordinator: the failed step releases its group and the
        # new ranks get one of their own.
        rank_pid = ray.get(_pid_ref(_workers(handle)[0]))
        os.kill(rank_pid, signal.SIGKILL)
        assert stream_one(handle, "after-rank-loss").tokens[0] == expected
        assert ray.get(handle.health.remote())["worker_restarts"] == 1
        rebuilt_group = rank_group(handle)
        assert ray.get(_pid_ref(handle)) == new_pid and rebuilt_group != new_group
        assert group_state(new_group) == "REMOVED"
        assert live_replica_groups() == {rebuilt_group: "CREATED"}

        # Killed again, with its restarts spent, the coordinator is gone for good; Ray keeps
        # its group (this job still runs) until stop_coordinator removes it.
        os.kill(new_pid, signal.SIGKILL)
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        with pytest.raises(ray.exceptions.RayActorError):
            while time.monotonic() < deadline:
                ray.get(handle.health.remote(), timeout=RESTART_TIMEOUT_S)
                time.sleep(0.2)
        assert live_replica_groups() == {rebuilt_group: "CREATED"}
    finally:
        stop_coordinator(handle)
    assert live_replica_groups() == {}
