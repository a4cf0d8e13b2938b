"""Configuration validation: ConfigError names the field and the valid range."""

from __future__ import annotations

import re

import pytest

from pagedserve.scheduler.config import (
    CacheConfig,
    ConfigError,
    SchedulerConfig,
    describe,
)
from pagedserve.scheduler.scheduler import Scheduler


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(block_size=3), "CacheConfig.block_size must be one of (1, 2, 4, 8, 16, 32, 64, 128), "
                         "got 3"),
    (dict(block_size=256), "CacheConfig.block_size must be one of"),
    (dict(block_size=0), "CacheConfig.block_size must be one of"),
    (dict(block_size=16.0), "CacheConfig.block_size must be one of"),
    (dict(num_gpu_blocks=0), "CacheConfig.num_gpu_blocks must be an integer >= 1, got 0"),
    (dict(num_gpu_blocks=2.5), "CacheConfig.num_gpu_blocks must be an integer >= 1, got 2.5"),
    (dict(num_cpu_blocks=-1), "CacheConfig.num_cpu_blocks must be an integer >= 0, got -1"),
])
def test_cache_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CacheConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(max_num_batched_tokens=0),
     "SchedulerConfig.max_num_batched_tokens must be an integer >= 1, got 0"),
    (dict(max_num_seqs=0), "SchedulerConfig.max_num_seqs must be an integer >= 1, got 0"),
    (dict(max_num_seqs=1.5), "SchedulerConfig.max_num_seqs must be an integer >= 1, got 1.5"),
    (dict(max_model_len=1), "SchedulerConfig.max_model_len must be an integer >= 2, got 1"),
    (dict(long_prefill_token_threshold=-1),
     "SchedulerConfig.long_prefill_token_threshold must be an integer >= 0, got -1"),
    (dict(preemption_mode="drop"),
     "SchedulerConfig.preemption_mode must be one of ('recompute', 'swap'), got 'drop'"),
    (dict(policy="lifo"), "SchedulerConfig.policy must be one of ('fcfs', 'priority'), got 'lifo'"),
    (dict(watermark=-0.1), "SchedulerConfig.watermark must be in [0, 0.5], got -0.1"),
    (dict(watermark=0.6), "SchedulerConfig.watermark must be in [0, 0.5], got 0.6"),
    (dict(watermark=float("nan")), "SchedulerConfig.watermark must be in [0, 0.5], got nan"),
    (dict(enable_chunked_prefill=False, max_num_batched_tokens=100, max_model_len=200),
     "SchedulerConfig.max_num_batched_tokens must be >= max_model_len (200) when chunked "
     "prefill is off, got 100"),
])
def test_scheduler_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        SchedulerConfig(**kwargs)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_boundary_values_are_accepted():
    CacheConfig(block_size=1, num_gpu_blocks=1, num_cpu_blocks=0)
    CacheConfig(block_size=128)
    SchedulerConfig(max_num_batched_tokens=1, max_num_seqs=1, max_model_len=2,
                    long_prefill_token_threshold=0, watermark=0.0)
    SchedulerConfig(watermark=0.5, enable_chunked_prefill=False, max_num_batched_tokens=8192,
                    max_model_len=8192)


def test_swap_without_cpu_blocks_is_a_config_error():
    with pytest.raises(ConfigError, match=r"preemption_mode='swap' needs "
                                          r"CacheConfig\.num_cpu_blocks >= 1"):
        Scheduler(SchedulerConfig(preemption_mode="swap"), CacheConfig(num_cpu_blocks=0))


def test_watermark_blocks_rounds_down():
    s = Scheduler(SchedulerConfig(watermark=0.01), CacheConfig(num_gpu_blocks=250))
    assert s.watermark_blocks == 2


def test_describe_lists_fields():
    assert describe(CacheConfig()) == ("block_size=16, num_gpu_blocks=1024, num_cpu_blocks=0, "
                                       "enable_prefix_caching=True")
