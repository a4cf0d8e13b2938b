"""GPU memory profiling: how many bytes the KV pool may take after weights and activations."""

from __future__ import annotations

import logging
from typing import Any

import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.output import NewRequestData, ScheduledRequest, SchedulerOutput
from pagedserve.workers.kv_pool import allocate_kv_cache_for_config
from pagedserve.workers.model_runner import ModelRunner

logger = logging.getLogger(__name__)
GIB = 1 << 30


def _profile_step(num_tokens: int, num_seqs: int, block_size: int) -> SchedulerOutput:
    """A step of `num_tokens` prefill tokens over `num_seqs` sequences whose tables all name
    block 0."""
    step = SchedulerOutput()
    per_seq = max(1, num_tokens // num_seqs)
    for index in range(num_seqs):
        count = per_seq if index < num_seqs - 1 else max(1, num_tokens - per_seq * index)
        step.scheduled.append(ScheduledRequest(
            request_id=f"profile-{index}", token_ids=[0] * count, start_position=0,
            table_start=0, table_blocks=[0] * (-(-count // block_size)), sample=True,
            new_request=NewRequestData([0] * count, [], SamplingParams(temperature=1.0,
                                                                        top_p=0.9, top_k=50))))
    return step


def profile_kv_cache_bytes(model: torch.nn.Module, hf_config: Any, dtype: torch.dtype,
                           device: torch.device, max_num_batched_tokens: int, max_num_seqs: int,
                           block_size: int, memory_utilization: float,
                           tp_size: int = 1) -> int:
    """Run the largest step once and return utilization x total - (everything else in use)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device)
    # One block in all is enough: every table points at it, so the profile step reads and
    # writes only that block (its contents are thrown away with it).
    caches = allocate_kv_cache_for_config(hf_config, 1, block_size, dtype, device, tp_size)
    runner = ModelRunner(model, caches, block_size, max_num_batched_tokens)
    runner.execute(_profile_step(max_num_batched_tokens, min(max_num_seqs,
                                                             max_num_batched_tokens), block_size))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del runner, caches
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = total - free - torch.cuda.memory_reserved(device)
    available = int(total * memory_utilization) - peak - outside_torch
    logger.info("GPU memory: total %.2f GiB x %.2f; weights %.2f GiB, peak activations %.2f GiB, "
                "outside PyTorch %.2f GiB -> KV cache %.2f GiB", total / GIB, memory_utilization,
                weights / GIB, (peak - weights) / GIB, outside_torch / GIB, available / GIB)
    return max(available, 0)
