"""How a gateway of the `gateway` role finds the replicas a `fleet` process runs.

The fleet names each coordinator `replica-<served model name>-<n>` (n counts up and is never
reused) as a detached actor in the Ray namespace FLEET_NAMESPACE. A gateway lists the named
actors there at start (`wait_for_replicas`: none within its timeout is an error) and then every
`interval_s` (`run`): a new name is connected (its address is asked of the actor) and routed
to; a name gone, or a coordinator that says it is draining (the fleet scales it down), is
drained at the gateway (nothing new routed, its requests finish or move) and then removed.
The naming and the diff are plain functions; only `FleetDiscovery` talks to Ray.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pagedserve.errors import Unavailable

logger = logging.getLogger(__name__)

FLEET_NAMESPACE = "pagedserve"
"""The Ray namespace of the fleet's named coordinators."""
REPLICA_PREFIX = "replica-"
HEALTH_TIMEOUT_S = 5.0
"""How long one discovery poll waits for a coordinator's health answer."""


def list_named_actors() -> list[dict]:
    """`ray.util.list_named_actors(all_namespaces=True)`, also through Ray Client (ray://),
    which does not offer it: there a zero-CPU task on the cluster lists them."""
    import ray
    from ray.util.client import ray as client_ray

    if not client_ray.is_connected():
        return ray.util.list_named_actors(all_namespaces=True)
    return ray.get(_remote_listing().remote(), timeout=HEALTH_TIMEOUT_S)


@functools.cache
def _remote_listing() -> Any:
    import ray

    return ray.remote(num_cpus=0)(_list_on_cluster)


def _list_on_cluster() -> list[dict]:
    import ray

    return ray.util.list_named_actors(all_namespaces=True)


def replica_actor_name(model_name: str, number: int) -> str:
    """The Ray actor name of the fleet's replica `number` of `model_name`."""
    return f"{REPLICA_PREFIX}{model_name}-{number}"


def replica_number(name: str, model_name: str) -> int | None:
    """n of a `replica-<model_name>-<n>` actor name; None for any other name (another model's
    replica included, even one whose name starts with this model's)."""
    head, _, number = name.rpartition("-")
    if head != f"{REPLICA_PREFIX}{model_name}" or not number.isdigit():
        return None
    return int(number)


def fleet_replica_names(listed: Iterable[dict], model_name: str,
                        namespace: str = FLEET_NAMESPACE) -> list[str]:
    """The replicas of `model_name` among `ray.util.list_named_actors(all_namespaces=True)`,
    in the order the fleet started them."""
    names = {entry["name"] for entry in listed if entry.get("namespace") == namespace
             and replica_number(entry["name"], model_name) is not None}
    return sorted(names, key=lambda name: replica_number(name, model_name))


@dataclass(frozen=True)
class FleetChange:
    """What one poll found against the replicas a gateway routes to."""

    added: tuple[str, ...]
    """Names to connect, in the fleet's order."""
    removed: tuple[str, ...]
    """Names to drain and remove, in the fleet's order."""


def diff_replicas(known: Iterable[str], serving: Iterable[str], model_name: str
                  ) -> FleetChange:
    """From the names routed to (`known`) and those serving now: what to add and remove."""
    known, serving = set(known), set(serving)

    def order(names: set[str]) -> tuple[str, ...]:
        return tuple(sorted(names, key=lambda name: (replica_number(name, model_name), name)))

    return FleetChange(added=order(serving - known), removed=order(known - serving))


def is_draining(health: dict[str, Any]) -> bool:
    """A coordinator's `health()` of one that refuses new requests on purpose (drained by the
    fleet), not one that failed or is replacing its workers (those come back)."""
    return (not health["healthy"] and health["failure"] is None
            and not health["restarting_workers"])


class FleetDiscovery:
    """The fleet's replicas of `model_name` as this gateway routes to them. `resolve(handle)`
    gives a coordinator's gRPC address (starting its server if a restart left it off)."""

    def __init__(self, model_name: str, resolve: Callable[[Any], Awaitable[str]],
                 interval_s: float = 2.0, drain_timeout_s: float = 600.0,
                 namespace: str = FLEET_NAMESPACE) -> None:
        self.model_name = model_name
        self.namespace = namespace
        self.interval_s = interval_s
        self.drain_timeout_s = drain_timeout_s
        self._resolve = resolve
        self.gateway = None
        self.clients: dict[str, Any] = {}
        """Name -> the gateway's ReplicaClient of each replica routed to (or being drained)."""
        self._removing: dict[str, asyncio.Task] = {}
        self._ready_before: set[str] = set()

    async def _serving(self) -> dict[str, Any]:
        """Name -> actor handle of each replica listed and not draining. A new one counts once
        it answered two looks in a row: the fleet starts its gRPC server right after its first
        answer, and asking for the address first would race it for the choice of address."""
        import ray

        listed = await asyncio.to_thread(list_named_actors)
        handles, ready = {}, set()
        for name in fleet_replica_names(listed, self.model_name, self.namespace):
            try:
                handle = await asyncio.to_thread(ray.get_actor, name, self.namespace)
                health = await asyncio.wait_for(handle.health.remote(), HEALTH_TIMEOUT_S)
            except (ValueError, TimeoutError, ray.exceptions.RayError) as error:
                logger.info("fleet replica %s not usable now: %r", name, error)
                if name in self.clients:  # starting again after a crash: keep routing
                    handles[name] = None
                continue
            if not is_draining(health):
                ready.add(name)
                if name in self._ready_before or name in self.clients:
                    handles[name] = handle
        self._ready_before = ready
        return handles

    def _resolver(self, handle: Any) -> Callable[[], Awaitable[str]]:
        return lambda: self._resolve(handle)

    async def wait_for_replicas(self, timeout_s: float
                                ) -> tuple[list[str], list[str], list[Callable]]:
        """(names, addresses, resolvers) of the replicas serving once at least one does;
        Unavailable if none does within `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            handles = {name: h for name, h in (await self._serving()).items() if h is not None}
            if handles:
                names = list(handles)
                addresses = [await self._resolve(handles[name]) for name in names]
                return names, addresses, [self._resolver(handles[name]) for name in names]
            if loop.time() >= deadline:
                raise Unavailable(
                    f"no fleet replica of {self.model_name!r} in Ray namespace "
                    f"{self.namespace!r} within {timeout_s:.0f} s: start `pagedserve serve "
                    f"--role fleet` with the same --model/--served-model-name on the cluster "
                    f"this gateway joins (--address), or raise --discovery-timeout-s")
            await asyncio.sleep(min(self.interval_s, max(0.0, deadline - loop.time())))

    def attach(self, gateway: Any, names: list[str]) -> None:
        """Route through `gateway`, whose replicas are those of `names`, in order."""
        self.gateway = gateway
        self.clients = dict(zip(names, gateway.replicas, strict=True))

    async def refresh(self) -> FleetChange:
        """One poll: connect the new replicas, start draining the gone ones."""
        handles = await self._serving()
        known = [name for name in self.clients if name not in self._removing]
        serving = [name for name in handles if name not in self._removing]
        change = diff_replicas(known, serving, self.model_name)
        for name in change.added:
            handle = handles[name]
            address = await self._resolve(handle)
            self.clients[name] = await self.gateway.add_replica(address, self._resolver(handle))
            logger.info("fleet replica %s joined at %s", name, address)
        for name in change.removed:
            self._removing[name] = asyncio.get_running_loop().create_task(self._remove(name))
        return change

    async def _remove(self, name: str) -> None:
        replica = self.clients[name]
        try:
            if not await self.gateway.drain(replica, self.drain_timeout_s):
                logger.warning("fleet replica %s still had %d requests after %.0f s; removing",
                               name, replica.in_flight, self.drain_timeout_s)
            await self.gateway.remove_replica(replica)
            logger.info("fleet replica %s left", name)
        finally:
            del self.clients[name]
            del self._removing[name]

    async def run(self) -> None:
        """Poll every interval until cancelled; a failed poll is logged and tried again."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("fleet discovery poll failed")

    async def close(self) -> None:
        removing = list(self._removing.values())
        for task in removing:
            task.cancel()
        await asyncio.gather(*removing, return_exceptions=True)
