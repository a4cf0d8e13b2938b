"""Validated configuration of the KV cache and the scheduler (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pagedserve.errors import ConfigError
from pagedserve.validation import check_field as check_valid


def check_field(owner: str, name: str, ok: bool, rule: str, value: Any) -> None:
    """`validation.check_field` raising ConfigError (configs have their own class)."""
    check_valid(owner, name, ok, rule, value, ConfigError)


VALID_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class CacheConfig:
    """Shape of the paged KV cache as the block manager sees it (counts, not bytes)."""

    block_size: int = 16
    """Tokens per KV block; a power of two in 1..128."""
    num_gpu_blocks: int = 1024
    """Physical KV blocks on the device (each rank holds its heads of every block); >= 1."""
    num_cpu_blocks: int = 0
    """Blocks in the CPU swap pool; 0 disables swapping (preemption then recomputes)."""
    enable_prefix_caching: bool = True
    """Reuse blocks whose chained hash matches an earlier request's full block."""

    def __post_init__(self) -> None:
        check_field("CacheConfig", "block_size",
                    type(self.block_size) is int and self.block_size in VALID_BLOCK_SIZES,
                    f"one of {VALID_BLOCK_SIZES}", self.block_size)
        check_field("CacheConfig", "num_gpu_blocks",
                    isinstance(self.num_gpu_blocks, int) and self.num_gpu_blocks >= 1,
                    "an integer >= 1", self.num_gpu_blocks)
        check_field("CacheConfig", "num_cpu_blocks",
                    isinstance(self.num_cpu_blocks, int) and self.num_cpu_blocks >= 0,
                    "an integer >= 0", self.num_cpu_blocks)


PREEMPTION_MODES = ("recompute", "swap")
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass
class SchedulerConfig:
    """Budgets and policies of the iteration-level scheduler."""

    max_num_batched_tokens: int = 8192
    """Token budget of one step (prefill chunks plus decode tokens); >= 1."""
    max_num_seqs: int = 256
    """Most requests in one step; >= 1."""
    max_model_len: int = 8192
    """Longest sequence (prompt + output) accepted; >= 2."""
    enable_chunked_prefill: bool = True
    """Split prompts longer than the remaining budget across steps."""
    long_prefill_token_threshold: int = 0
    """Cap on one request's prefill tokens per step so decodes keep flowing; 0 = no cap."""
    preemption_mode: str = "recompute"
    """How a victim gives back its blocks: 'recompute' or 'swap' (needs CPU blocks)."""
    policy: str = "fcfs"
    """Waiting-queue order: 'fcfs' (arrival) or 'priority' (lower value first, then arrival)."""
    watermark: float = 0.01
    """Fraction of GPU blocks kept free when admitting new requests, in [0, 0.5]."""

    def __post_init__(self) -> None:
        owner = "SchedulerConfig"
        for name, low in (("max_num_batched_tokens", 1), ("max_num_seqs", 1),
                          ("max_model_len", 2), ("long_prefill_token_threshold", 0)):
            value = getattr(self, name)
            check_field(owner, name, isinstance(value, int) and value >= low,
                        f"an integer >= {low}", value)
        check_field(owner, "preemption_mode", self.preemption_mode in PREEMPTION_MODES,
                    f"one of {PREEMPTION_MODES}", self.preemption_mode)
        check_field(owner, "policy", self.policy in SCHEDULING_POLICIES,
                    f"one of {SCHEDULING_POLICIES}", self.policy)
        check_field(owner, "watermark", 0.0 <= self.watermark <= 0.5, "in [0, 0.5]",
                    self.watermark)
        if not self.enable_chunked_prefill:
            check_field(owner, "max_num_batched_tokens",
                        self.max_num_batched_tokens >= self.max_model_len,
                        f">= max_model_len ({self.max_model_len}) when chunked prefill is off",
                        self.max_num_batched_tokens)


def describe(config: Any) -> str:
    """One line listing a config's fields, for logs."""
    return ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in fields(config))
