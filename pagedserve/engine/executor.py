"""Executors: how the engine reaches its workers (one per tensor-parallel rank).

`LocalExecutor` runs the single rank of a TP=1 replica in this process. `RayExecutor` runs one
Ray actor per rank inside a placement group (one GPU each, all on one node: the all-reduces
need NVLink-class links), has them meet in a torch.distributed group (NCCL on GPU, gloo on CPU),
and broadcasts each step to all of them. Both expose the same three calls: `collective` (a
worker method on every rank, results in rank order), `execute` (one step, rank 0's result) and
`shutdown`.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.scheduler.output import SchedulerOutput
from pagedserve.workers.step_result import StepResult
from pagedserve.workers.worker import Worker

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0


class WorkerFailure(RuntimeError):
    """A worker rank failed or died; the executor cannot run further steps."""


class LocalExecutor:
    """Rank 0 of a one-rank replica, in this process."""

    def __init__(self, config: EngineConfig, model_dir: str, device_type: str) -> None:
        self.worker = Worker(config, model_dir, device_type)
        self.worker.load(None)

    def collective(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def execute(self, step: SchedulerOutput) -> StepResult:
        return self.worker.execute(step)

    def shutdown(self) -> None:
        self.worker.shutdown()


class RayExecutor:
    """One Ray actor per tensor-parallel rank, placed together on one node."""

    def __init__(self, config: EngineConfig, model_dir: str, device_type: str) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(logging_level=logging.WARNING)  # RAY_ADDRESS picks an existing cluster
        self._ray = ray
        size = config.tensor_parallel_size
        resource = "GPU" if device_type == "cuda" else "CPU"
        available = ray.cluster_resources().get(resource, 0)
        if available < size:
            raise ValueError(
                f"EngineConfig.tensor_parallel_size={size} needs {size} {resource}s in the Ray "
                f"cluster, which has {available:g}; lower tensor_parallel_size or add nodes"
            )
        bundle = {"GPU": 1, "CPU": 1} if device_type == "cuda" else {"CPU": 1}
        self.placement_group = placement_group([bundle] * size, strategy="STRICT_PACK")
        self.workers: list = []
        self.failure: str | None = None
        # Actors and the placement group go when the executor is collected, even without an
        # explicit shutdown(); otherwise a dropped engine would hold its GPUs until exit.
        self._finalizer = weakref.finalize(self, _release, ray, self.workers,
                                           self.placement_group)
        try:
            ready, _ = ray.wait([self.placement_group.ready()], timeout=PLACEMENT_TIMEOUT_S)
            if not ready:
                raise ValueError(
                    f"EngineConfig.tensor_parallel_size={size}: no single Ray node has {size} "
                    f"free {resource}s (waited {PLACEMENT_TIMEOUT_S:.0f} s); tensor-parallel "
                    "ranks must share a node"
                )
            actor = ray.remote(Worker)
            self.workers.extend(
                actor.options(
                    num_cpus=1,
                    num_gpus=1 if device_type == "cuda" else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.placement_group, placement_group_bundle_index=rank
                    ),
                ).remote(config, model_dir, device_type, rank, size)
                for rank in range(size)
            )
            rendezvous = None
            if size > 1:
                rendezvous = self._get([self.workers[0].open_rendezvous.remote()])[0]
            self.collective("load", rendezvous)
        except BaseException:
            self.shutdown()
            raise
        logger.info("%d Ray worker ranks ready (%s)", size, resource)

    def _get(self, refs: list) -> list[Any]:
        """Results of `refs` in order; the first failure of any rank fails fast, since ranks
        still waiting in a collective for the failed one would otherwise wait forever."""
        ray = self._ray
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except Exception as error:
                # Ranks still inside a collective would wait forever for the failed one, so
                # every rank goes and the engine stops (its requests are aborted).
                self.failure = f"{type(error).__name__}: {error}"
                self._finalizer()
                raise WorkerFailure(
                    f"a tensor-parallel worker failed ({self.failure}); this engine is stopped"
                ) from error
        return ray.get(refs)

    def collective(self, method: str, *args: Any) -> list[Any]:
        self._check_alive()
        return self._get([getattr(worker, method).remote(*args) for worker in self.workers])

    def execute(self, step: SchedulerOutput) -> StepResult:
        self._check_alive()
        step_ref = self._ray.put(step)  # serialised once, read by every rank
        return self._get([worker.execute.remote(step_ref) for worker in self.workers])[0]

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise WorkerFailure(f"tensor-parallel workers are stopped after: {self.failure}")

    def shutdown(self) -> None:
        if self.failure is None:
            self.failure = "shut down"
        self._finalizer()


def _release(ray: Any, workers: list, placement_group: Any) -> None:
    # After ray.shutdown() the actors are gone with the cluster, and any Ray call here would
    # start a fresh cluster just to fail on handles from the old one.
    if ray.is_initialized():
        for worker in workers:
            ray.kill(worker)
        ray.util.remove_placement_group(placement_group)
    workers.clear()


def make_executor(config: EngineConfig, model_dir: str, device_type: str):
    """The executor `config.distributed_executor_backend` asks for ('auto': Ray when TP > 1)."""
    backend = config.distributed_executor_backend
    if backend == "auto":
        backend = "ray" if config.tensor_parallel_size > 1 else "local"
    if backend == "local":
        if config.tensor_parallel_size != 1:
            raise ValueError(
                "EngineConfig.distributed_executor_backend='local' runs one rank; "
                f"tensor_parallel_size={config.tensor_parallel_size} needs 'ray' (or 'auto')"
            )
        return LocalExecutor(config, model_dir, device_type)
    return RayExecutor(config, model_dir, device_type)
