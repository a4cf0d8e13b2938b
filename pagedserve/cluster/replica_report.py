"""What a coordinator reports about its replica: health, stats, step log, model, GPUs, KV blocks.

Read on the actor's event loop (the `Coordinator` methods of the same names, and the gRPC
service over them: GetLoad, GetModelInfo, GetStats, GetGpuTelemetry) from what the step thread
keeps, the core (under its lock) and the ranks. Once the replica is lost the core is no longer
read: stats are the last step's, and there are no GPUs to report.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from pagedserve.cluster.output_streams import OutputStreams
from pagedserve.cluster.step_loop import StepLoop
from pagedserve.config import EngineConfig
from pagedserve.engine.core import EngineCore, EngineStats
from pagedserve.metrics.coordinator_metrics import EngineSnapshot
from pagedserve.metrics.gpu import GpuReading

# The coordinator's logger: these lines were the coordinator's before it was split into modules.
logger = logging.getLogger("pagedserve.cluster.coordinator")

GPU_TELEMETRY_TTL_S = 2.0
"""How long one reading of the ranks' GPUs answers gpu_telemetry (several gateways ask)."""
GPU_TELEMETRY_TIMEOUT_S = 5.0


class ReplicaReport:
    """The state of one coordinator's replica, as its callers ask for it."""

    def __init__(self, core: EngineCore, config: EngineConfig, lock: threading.Lock,
                 steps: StepLoop, outputs: OutputStreams) -> None:
        self.core = core
        self.config = config
        self._lock = lock
        self._steps = steps
        self._outputs = outputs
        self._gpu_readings: list[tuple[int, GpuReading]] = []
        self._gpu_read_at = float("-inf")

    def health(self, accepting: bool) -> dict[str, Any]:
        """Whether the replica serves (it accepts requests: not draining, not shut down), why
        not, and its counters."""
        steps = self._steps
        return {"healthy": steps.failure is None and accepting and not steps.needs_ranks,
                "failure": None if steps.failure is None else str(steps.failure),
                "restarting_workers": steps.needs_ranks,
                "worker_restarts": steps.num_worker_restarts,
                "num_requests": len(self._outputs.streams), "num_steps": steps.num_steps}

    def step_log(self) -> list[tuple[float, ...]]:
        return list(self._steps.recent_steps)

    def stats(self) -> EngineStats:
        """The core's, or once the replica is lost the last step's (its core is not read)."""
        if self._steps.failure is not None:
            return self._steps.last_stats
        with self._lock:
            return self.core.stats()

    def engine_snapshot(self) -> EngineSnapshot:
        return self._steps.step_recorder.snapshot()

    async def gpu_telemetry(self) -> list[tuple[int, GpuReading]]:
        now = time.monotonic()
        if now - self._gpu_read_at >= GPU_TELEMETRY_TTL_S:
            self._gpu_read_at = now
            self._gpu_readings = await self._read_gpus()
        return self._gpu_readings

    async def _read_gpus(self) -> list[tuple[int, GpuReading]]:
        workers = self.core.executor.workers if self._steps.failure is None else []
        try:
            per_rank = await asyncio.wait_for(
                asyncio.gather(*(w.gpu_telemetry.remote() for w in workers)),
                GPU_TELEMETRY_TIMEOUT_S)
        except Exception as error:  # a rank died or hangs: report no GPUs, not an error
            logger.warning("GPU telemetry from the ranks failed: %r", error)
            return []
        return [(rank, reading) for rank, readings in enumerate(per_rank)
                for reading in readings]

    def model_info(self) -> dict[str, Any]:
        core = self.core
        return {"model": self.config.model, "max_model_len": core.max_model_len,
                "vocab_size": core.vocab_size, "dtype": core.dtype, "device": core.device,
                "block_size": core.block_size, "eos_token_ids": list(core.eos_token_ids),
                "tensor_parallel_size": self.config.tensor_parallel_size,
                "max_num_seqs": self.config.max_num_seqs,
                "num_gpu_blocks": core.scheduler.kv.pool.num_blocks,
                "kv_cache_dtype": core.kv_cache_dtype,
                "kv_cache_capacity_tokens": core.scheduler.kv.pool.num_blocks * core.block_size}

    def free_blocks(self) -> int:
        with self._lock:
            return self.core.scheduler.kv.pool.num_free_blocks
