"""Replica placement groups on a multi-node Ray cluster (Ray's fake multinode provider, fake GPU
nodes): replicas spread over the nodes (one group per node while there is room), a replica's
ranks stay on one node (STRICT_PACK), and a group no node can take waits, which makes the Ray
autoscaler add a node for it."""

from __future__ import annotations

import pytest

from pagedserve.cluster.placement import ReplicaPlacement
from tests.helpers.fake_cluster import fake_cluster

pytestmark = pytest.mark.timeout(240)

GPU_NODE = {"resources": {"CPU": 2, "GPU": 2}, "min_workers": 2, "max_workers": 3}


@pytest.fixture(scope="module", autouse=True)
def local_ray_cluster():
    """This module connects to a fake multinode cluster instead (overrides the folder's local
    one); a connection another module left is closed first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield


def group_nodes(ray, placement: ReplicaPlacement) -> set[str]:
    table = ray.util.placement_group_table(placement.group)
    return set(table["bundles_to_node_id"].values())


def test_replicas_spread_over_nodes_and_a_full_cluster_grows():
    with fake_cluster(worker_types={"gpu": GPU_NODE}, idle_timeout_s=60) as cluster, \
            cluster.connect() as ray:
        cluster.wait_for_workers(ray, 2, timeout_s=120)
        placements = []
        try:
            placements = [ReplicaPlacement(1, "cuda", wait_s=60) for _ in range(2)]
            first, second = (group_nodes(ray, p) for p in placements)
            assert len(first) == len(second) == 1 and first != second
            # Each node has one GPU left: a TP=2 replica fits on neither, so its group waits
            # until the autoscaler brings up a third node, where both ranks go.
            placements.append(ReplicaPlacement(2, "cuda", wait_s=150))
            (third,) = [group_nodes(ray, placements[-1])]
            assert len(third) == 1 and third.isdisjoint(first | second)
            assert len(cluster.worker_nodes(ray)) == 3
        finally:
            for placement in placements:
                placement.release()
