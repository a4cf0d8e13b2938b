"""What the engine core needs from the ranks of one replica, whatever runs them.

An executor reaches every tensor-parallel rank of a replica: `collective` calls a worker method
on all ranks (results in rank order), `execute` runs one step on all of them (rank 0's results
of the steps it finished: see `ModelRunner.execute`). A rank that fails, dies or outlives the
step timeout fails the step with `WorkerFailure`, and the executor then refuses further work
(`failure` says why).
"""

from __future__ import annotations

from typing import Any, Protocol

from pagedserve.scheduler.output import SchedulerOutput, StepResult


class Executor(Protocol):
    failure: str | None
    """Why the ranks are stopped (None while they serve)."""

    def collective(self, method: str, *args: Any) -> list[Any]:
        """Call `Worker.<method>(*args)` on every rank; results in rank order."""

    def execute(self, step: SchedulerOutput) -> list[StepResult]:
        """Run one step on every rank; rank 0's results of the steps it finished."""

    def shutdown(self) -> None:
        """Stop the ranks and free their devices; the executor is unusable afterwards."""
