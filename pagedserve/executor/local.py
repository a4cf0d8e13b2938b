"""The single rank of a TP=1 replica, in the caller's process (no Ray, no copies)."""

from __future__ import annotations

from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.errors import WorkerFailure
from pagedserve.scheduler.output import SchedulerOutput, StepResult
from pagedserve.workers.worker import Worker


class LocalExecutor:
    """Rank 0 of a one-rank replica, in this process."""

    def __init__(self, config: EngineConfig, model_dir: str, device_type: str) -> None:
        self.worker = Worker(config, model_dir, device_type)
        self.worker.load(None)
        self.failure: str | None = None

    def collective(self, method: str, *args: Any) -> list[Any]:
        self._check_alive()
        return [getattr(self.worker, method)(*args)]

    def execute(self, step: SchedulerOutput) -> list[StepResult]:
        self._check_alive()
        return self.worker.execute(step)

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise WorkerFailure(f"the worker is stopped ({self.failure}); start a new engine")

    def shutdown(self) -> None:
        if self.failure is None:
            self.failure = "shut down"
            self.worker.shutdown()
