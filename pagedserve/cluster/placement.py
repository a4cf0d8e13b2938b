"""The placement of one replica's tensor-parallel ranks (Ray is joined or started in
`ray_startup.py`).

A replica's ranks share one node (STRICT_PACK: their all-reduces need NVLink-class links); each
rank is one bundle (a GPU and a CPU on GPU nodes, a CPU otherwise). Replicas spread across
nodes: a new replica's group is asked, softly, for the node holding the fewest replica groups
(`spread_target`); Ray puts it elsewhere when that node is full, and leaves it pending (which
makes the Ray autoscaler add a node) when no node can take it. `executor_for` builds the
executor a configuration asks for: one rank in this process, or Ray actors in a new placement
group.

Ray removes a group an actor made only once that actor is dead for good and the job that
started it has ended, so a coordinator that Ray restarts (its actor id survives) would hold the
group of every earlier incarnation beside its own. An actor's groups are therefore named after
it and its worker process (`_group_name`): a new incarnation removes the groups of the earlier
ones before making its own, and whoever stops an actor for good removes the rest
(`remove_actor_groups`).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from pagedserve.cluster.ray_startup import ensure_ray
from pagedserve.config import EngineConfig
from pagedserve.errors import InvalidArgument, ResourceExhausted

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0
REPLICA_GROUP_PREFIX = "pagedserve-replica-"
"""Name prefix of replica placement groups: how `spread_target` counts them per node. An
actor's groups go on with `<actor id>-<worker id>-`; a driver's with a random suffix only."""


def resolve_device(device: str, use_ray: bool) -> str:
    """'auto' -> 'cuda' when GPUs are there (in the Ray cluster, or visible to this process)."""
    if device != "auto":
        if device == "cuda" and not use_ray:
            import torch

            if not torch.cuda.is_available():
                raise InvalidArgument("EngineConfig.device='cuda' but no CUDA device is "
                                      "visible; use 'cpu'")
        return device
    if use_ray:
        return "cuda" if ensure_ray().cluster_resources().get("GPU", 0) > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def uses_ray(config: EngineConfig) -> bool:
    """Whether `config` runs its ranks as Ray actors ('auto': when TP > 1)."""
    backend = config.distributed_executor_backend
    if backend == "local" and config.tensor_parallel_size != 1:
        raise InvalidArgument(
            "EngineConfig.distributed_executor_backend='local' runs one rank; "
            f"tensor_parallel_size={config.tensor_parallel_size} needs 'ray' (or 'auto')")
    return backend == "ray" or (backend == "auto" and config.tensor_parallel_size > 1)


def spread_target(node_capacity: Mapping[str, float], group_nodes: Iterable[str],
                  size: int) -> str | None:
    """The node for a new replica of `size` ranks: among the nodes with at least `size` of the
    rank resource in all (`node_capacity`: node id -> that total), the one holding the fewest
    replica groups (`group_nodes`: the node of each existing group), ties to the smallest id;
    None when no node is big enough (the group then waits for one: the Ray autoscaler's
    cue)."""
    groups = Counter(group_nodes)
    fitting = sorted(node for node, total in node_capacity.items() if total >= size)
    if not fitting:
        return None
    return min(fitting, key=lambda node: groups[node])


def _live_replica_groups(ray: Any) -> dict[str, dict]:
    """Group id -> table entry of every replica group Ray has not removed (any server's)."""
    return {group_id: group for group_id, group in ray.util.placement_group_table().items()
            if group.get("name", "").startswith(REPLICA_GROUP_PREFIX)
            and group.get("state") != "REMOVED"}


def _replica_group_nodes(groups: Iterable[dict]) -> list[str]:
    """The node of every placed group among `groups` (table entries)."""
    return [group["bundles_to_node_id"][0] for group in groups
            if group.get("state") == "CREATED" and group.get("bundles_to_node_id")]


def _actor_prefix(actor_id: str) -> str:
    return f"{REPLICA_GROUP_PREFIX}{actor_id}-"


def _group_name(ray: Any) -> str:
    """A new group's name: after the actor and the process making it (see the module
    docstring), random within them."""
    context = ray.get_runtime_context()
    actor_id = context.get_actor_id()
    owner = "" if actor_id is None else f"{actor_id}-{context.get_worker_id()}-"
    return f"{REPLICA_GROUP_PREFIX}{owner}{uuid.uuid4().hex[:12]}"


def _remove_groups(ray: Any, groups: dict[str, dict], name_prefix: str,
                   keep_prefix: str | None = None) -> list[str]:
    """Remove the groups (id -> table entry) named with `name_prefix`, except those named with
    `keep_prefix`; their ids."""
    from ray.util.placement_group import PlacementGroup

    removed = [group_id for group_id, group in groups.items()
               if group["name"].startswith(name_prefix)
               and not (keep_prefix and group["name"].startswith(keep_prefix))]
    for group_id in removed:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
    return removed


def _remove_earlier_incarnations_groups(ray: Any, groups: dict[str, dict]) -> list[str]:
    """In an actor: remove the groups its earlier incarnations (other worker processes under
    the same actor id) left; their ids. Nothing in a driver or a task."""
    context = ray.get_runtime_context()
    actor_id = context.get_actor_id()
    if actor_id is None:
        return []
    removed = _remove_groups(ray, groups, _actor_prefix(actor_id),
                             keep_prefix=f"{_actor_prefix(actor_id)}{context.get_worker_id()}-")
    if removed:
        logger.warning("removed %d placement group(s) left by an earlier incarnation of actor "
                       "%s", len(removed), actor_id)
    return removed


def remove_actor_groups(actor_id: str) -> int:
    """Remove every replica group the actor `actor_id` (hex) made, in any incarnation: for an
    actor stopped for good, whose groups Ray keeps while the job that started it runs. How
    many there were."""
    ray = ensure_ray()
    return len(_remove_groups(ray, _live_replica_groups(ray), _actor_prefix(actor_id)))


class ReplicaPlacement:
    """A STRICT_PACK placement group with one bundle per rank, ready when constructed.

    `wait_s` None: a cluster with fewer of the rank resource than `size` in all is refused at
    once (nothing will add nodes), else the group waits PLACEMENT_TIMEOUT_S for them to free
    up. A number: the group waits that long whatever the cluster has now, for the Ray
    autoscaler (which the pending group asks for a node)."""

    def __init__(self, size: int, device_type: str, wait_s: float | None = None) -> None:
        ray = ensure_ray()
        from ray.util.placement_group import placement_group

        self._ray = ray
        resource = "GPU" if device_type == "cuda" else "CPU"
        available = ray.cluster_resources().get(resource, 0)
        if available < size and wait_s is None:
            raise InvalidArgument(
                f"EngineConfig.tensor_parallel_size={size} needs {size} {resource}s in the Ray "
                f"cluster, which has {available:g}; lower tensor_parallel_size, add nodes, or "
                "set placement_wait_s (--placement-wait-s) where an autoscaler adds them")
        timeout_s = PLACEMENT_TIMEOUT_S if wait_s is None else wait_s
        if available < size:
            logger.warning("the Ray cluster has %g %ss, a replica needs %d on one node: waiting "
                           "up to %.0f s for the autoscaler to add one", available, resource,
                           size, timeout_s)
        bundle = {"GPU": 1, "CPU": 1} if device_type == "cuda" else {"CPU": 1}
        capacity = {node["NodeID"]: node["Resources"].get(resource, 0)
                    for node in ray.nodes() if node["Alive"]}
        groups = _live_replica_groups(ray)
        for group_id in _remove_earlier_incarnations_groups(ray, groups):
            del groups[group_id]
        target = spread_target(capacity, _replica_group_nodes(groups.values()), size)
        self.group = placement_group([bundle] * size, strategy="STRICT_PACK",
                                     name=_group_name(ray), _soft_target_node_id=target)
        ready, _ = ray.wait([self.group.ready()], timeout=timeout_s)
        if not ready:
            self.release()
            raise ResourceExhausted(
                f"EngineConfig.tensor_parallel_size={size}: no single Ray node has {size} free "
                f"{resource}s (waited {timeout_s:.0f} s); tensor-parallel ranks must share a "
                "node")

    def strategy(self, rank: int) -> Any:
        """The scheduling strategy that puts rank `rank` on its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank)

    def release(self) -> None:
        if self.group is not None and self._ray.is_initialized():
            self._ray.util.remove_placement_group(self.group)
        self.group = None


def executor_for(config: EngineConfig, model_dir: str):
    """The executor `config` asks for, with its ranks loaded; and the device type they use."""
    use_ray = uses_ray(config)
    device_type = resolve_device(config.device, use_ray)
    if not use_ray:
        from pagedserve.executor.local import LocalExecutor

        return LocalExecutor(config, model_dir, device_type)
    from pagedserve.executor.ray import RayExecutor

    placement = ReplicaPlacement(config.tensor_parallel_size, device_type,
                                 config.placement_wait_s)
    return RayExecutor(config, model_dir, device_type, placement)
