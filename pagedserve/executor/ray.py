"""One Ray actor per tensor-parallel rank, in the placement group its replica was given.

The ranks meet in a torch.distributed group (NCCL on GPU, gloo on CPU) and every step is one
broadcast: the same `SchedulerOutput` goes to all ranks and rank 0's `StepResult` comes back.
The actor body builds its `Worker` inside the actor process, so the caller need not import
torch (the coordinator actor never does).

Steps go out one of two ways (`EngineConfig.step_dispatch`): a Ray Compiled Graph, whose ranks
wait on shared-memory channels in a loop of their own (no task submission per step), or one
actor task per rank. The graph is compiled at the first step and torn down before any other
call to the ranks (a rank in a graph loop runs nothing else), then compiled again.

A rank that raises or dies fails the step at once; one that outlives
`EngineConfig.step_timeout_s` fails it then; either way every rank is stopped (ranks still
inside a collective would wait forever for the lost one).
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.errors import WorkerFailure
from pagedserve.scheduler.output import SchedulerOutput, StepResult

logger = logging.getLogger(__name__)


GIL_SWITCH_INTERVAL_S = 0.0002

GRAPH_STEPS_IN_FLIGHT = 1
"""Steps a compiled graph may hold at once: a caller waits for each step before the next
(`submit` then `wait`). Ray gives every channel this many shared-memory buffers (its default of
10 would be ten 1 MB buffers per channel) and, as of Ray 2.60, never frees a torn-down graph's
buffers (ray-project/ray#43836): each rebuild after a lost rank leaves them in the object store,
3 buffers (about 3 MiB) for two ranks at 1 instead of 30 (28 MiB) at Ray's default."""


def shorten_gil_switch_interval() -> None:
    """In a Ray actor, replies arrive on Ray's own threads and must take the GIL from the
    thread doing the step's Python work; at Python's default 5 ms switch interval that
    hand-over alone can cost a step milliseconds."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


class RankActor:
    """The body of one rank's Ray actor: a `Worker` made inside the actor process."""

    def __init__(self, config: EngineConfig, model_dir: str, device_type: str, rank: int,
                 world_size: int) -> None:
        from pagedserve.workers.worker import Worker

        shorten_gil_switch_interval()
        self.worker = Worker(config, model_dir, device_type, rank, world_size)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def execute(self, step: SchedulerOutput) -> list[StepResult]:
        return self.worker.execute(step)

    def gpu_telemetry(self) -> list:
        """NVML readings (`metrics.gpu.GpuReading`) of the GPUs Ray gave this rank; none on
        CPU. It touches no worker state, so it may run while a compiled graph's loop holds
        the actor's system thread."""
        import ray

        from pagedserve.metrics.gpu import read_gpus

        return read_gpus(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))


class RayExecutor:
    """The ranks of one replica as Ray actors, one per bundle of `placement`.

    `placement` (a `cluster.placement.ReplicaPlacement`) is owned from here on: it is released
    with the actors on shutdown, on failure, or when the executor is collected.
    """

    def __init__(self, config: EngineConfig, model_dir: str, device_type: str,
                 placement: Any) -> None:
        import ray

        self._ray = ray
        self.step_timeout_s = config.step_timeout_s
        self.use_compiled_graph = config.step_dispatch == "compiled_graph"
        self.failure: str | None = None
        self.workers: list = []
        self._graph: list = []  # [the compiled graph] while one exists
        size = config.tensor_parallel_size
        # Actors and the placement group go when the executor is collected, even without an
        # explicit shutdown(); otherwise a dropped engine would hold its GPUs until exit.
        self._finalizer = weakref.finalize(self, _release, ray, self.workers, placement,
                                           self._graph)
        try:
            actor = ray.remote(RankActor)
            self.workers.extend(
                actor.options(num_cpus=1, num_gpus=1 if device_type == "cuda" else 0,
                              scheduling_strategy=placement.strategy(rank),
                              ).remote(config, model_dir, device_type, rank, size)
                for rank in range(size))
            rendezvous = None
            if size > 1:
                rendezvous = self._get([self.workers[0].call.remote("open_rendezvous")],
                                       timeout=None)[0]
            self._get([w.call.remote("load", rendezvous) for w in self.workers], timeout=None)
        except BaseException:
            self.shutdown()
            raise
        logger.info("%d Ray worker ranks ready (%s)", size, device_type)

    # ---- calls to every rank ----------------------------------------------------------------

    def collective(self, method: str, *args: Any) -> list[Any]:
        self._check_alive()
        _teardown(self._graph)
        return self._get([w.call.remote(method, *args) for w in self.workers], timeout=None)

    def _compiled(self) -> Any:
        if not self._graph:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as step:
                dag = MultiOutputNode([w.execute.bind(step) for w in self.workers])
            self._graph.append(dag.experimental_compile(
                _max_inflight_executions=GRAPH_STEPS_IN_FLIGHT))
        return self._graph[0]

    def submit(self, step: SchedulerOutput) -> Any:
        """Send one step to every rank without waiting for it; `wait` takes its result (the
        caller can do other work while the ranks run)."""
        self._check_alive()
        if self.use_compiled_graph:
            try:
                return self._compiled().execute(step)
            except Exception as error:
                self._fail(error)
        return [w.execute.remote(step) for w in self.workers]

    def wait(self, submitted: Any) -> list[StepResult]:
        """Rank 0's results for a submitted step (every rank must finish it)."""
        if self.use_compiled_graph:
            try:
                return self._ray.get(submitted, timeout=self.step_timeout_s)[0]
            except Exception as error:
                self._fail(error)
        return self._get(submitted, timeout=self.step_timeout_s)[0]

    def execute(self, step: SchedulerOutput) -> list[StepResult]:
        return self.wait(self.submit(step))

    def _get(self, refs: list, timeout: float | None) -> list[Any]:
        """Results of `refs` in order; the first failure of any rank fails fast."""
        ray = self._ray
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                self._fail(TimeoutError(f"a step ran past step_timeout_s={timeout}"))
            try:
                ray.get(done[0])
            except Exception as error:
                self._fail(error)
        return ray.get(refs)

    def _fail(self, error: BaseException) -> None:
        self.failure = f"{type(error).__name__}: {error}"
        self._finalizer()
        raise WorkerFailure(f"a tensor-parallel worker failed ({self.failure}); this replica's "
                            "workers are stopped") from error

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise WorkerFailure(f"tensor-parallel workers are stopped after: {self.failure}")

    def shutdown(self) -> None:
        if self.failure is None:
            self.failure = "shut down"
        self._finalizer()


def _teardown(graph: list, kill_actors: bool = False) -> None:
    if graph:
        compiled = graph[0]
        graph.clear()
        try:
            compiled.teardown(kill_actors=kill_actors)
        except Exception as error:  # a dead rank's channels; the actors are killed next
            logger.warning("compiled graph teardown: %s", error)


def _release(ray: Any, workers: list, placement: Any, graph: list) -> None:
    # After ray.shutdown() the actors are gone with the cluster, and any Ray call here would
    # start a fresh cluster just to fail on handles from the old one.
    if ray.is_initialized():
        _teardown(graph, kill_actors=True)  # a hung rank must not hold the teardown up
        for worker in workers:
            ray.kill(worker)
        placement.release()
    workers.clear()
