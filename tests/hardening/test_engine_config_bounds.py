"""EngineConfig refuses NaN, infinities, bools and out-of-range integers with a ConfigError that
names the field and its valid range, instead of failing later (OverflowError, allocator)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pagedserve.config import MAX_CPU_THREADS, MAX_ENGINE_SEED, EngineConfig
from pagedserve.errors import ConfigError

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"swap_space_gib": INF}, "EngineConfig.swap_space_gib must be a finite number >= 0, got inf"),
    ({"swap_space_gib": NAN}, "EngineConfig.swap_space_gib must be a finite number >= 0, got nan"),
    ({"swap_space_gib": None}, "EngineConfig.swap_space_gib must be a finite number >= 0, "
                               "got None"),
    ({"swap_space_gib": True}, "EngineConfig.swap_space_gib must be a finite number >= 0, "
                               "got True"),
    ({"kv_cache_memory_gib": INF}, "EngineConfig.kv_cache_memory_gib must be None or a finite "
                                   "number >= 0, got inf"),
    ({"kv_cache_memory_gib": NAN}, "EngineConfig.kv_cache_memory_gib must be None or a finite "
                                   "number >= 0, got nan"),
    ({"kv_cache_memory_gib": "1"}, "EngineConfig.kv_cache_memory_gib must be None or a finite "
                                   "number >= 0, got '1'"),
    ({"gpu_memory_utilization": NAN}, "EngineConfig.gpu_memory_utilization must be a number in "
                                      "(0, 1], got nan"),
    ({"gpu_memory_utilization": INF}, "EngineConfig.gpu_memory_utilization must be a number in "
                                      "(0, 1], got inf"),
    ({"gpu_memory_utilization": True}, "EngineConfig.gpu_memory_utilization must be a number "
                                       "in (0, 1], got True"),
    ({"gpu_memory_utilization": "0.5"}, "EngineConfig.gpu_memory_utilization must be a number "
                                        "in (0, 1], got '0.5'"),
    ({"block_size": True}, "EngineConfig.block_size must be one of (1, 2, 4, 8, 16, 32, 64, "
                           "128), got True"),
    ({"block_size": 16.0}, "EngineConfig.block_size must be one of (1, 2, 4, 8, 16, 32, 64, "
                           "128), got 16.0"),
    ({"tensor_parallel_size": True}, "EngineConfig.tensor_parallel_size must be an integer "
                                     ">= 1, got True"),
    ({"max_num_seqs": True}, "EngineConfig.max_num_seqs must be an integer >= 1, got True"),
    ({"max_num_seqs": 8.0}, "EngineConfig.max_num_seqs must be an integer >= 1, got 8.0"),
    ({"max_graph_batch_size": True}, "EngineConfig.max_graph_batch_size must be an integer "
                                     ">= 1, got True"),
    ({"num_gpu_blocks_override": True}, "EngineConfig.num_gpu_blocks_override must be None or "
                                        "an integer >= 1, got True"),
    ({"max_model_len": True}, "EngineConfig.max_model_len must be None or an integer >= 1, "
                              "got True"),
    ({"max_num_batched_tokens": 2.0}, "EngineConfig.max_num_batched_tokens must be None or an "
                                      "integer >= 1, got 2.0"),
    ({"seed": True}, "EngineConfig.seed must be an integer, got True"),
    ({"seed": -1}, "EngineConfig.seed must be in [0, 4294967295], got -1"),
    ({"seed": 2**64}, "EngineConfig.seed must be in [0, 4294967295], got 18446744073709551616"),
    ({"model": 3}, "EngineConfig.model must be None or a directory path, got 3"),
    ({"tokenizer": ["tok"]}, "EngineConfig.tokenizer must be None or a directory path, "
                             "got ['tok']"),
    ({"cpu_threads": 0}, "EngineConfig.cpu_threads must be None or an integer in [1, 1024], "
                         "got 0"),
    ({"cpu_threads": 1025}, "EngineConfig.cpu_threads must be None or an integer in [1, 1024], "
                            "got 1025"),
    ({"cpu_threads": True}, "EngineConfig.cpu_threads must be None or an integer in [1, 1024], "
                            "got True"),
    ({"cpu_threads": 2.0}, "EngineConfig.cpu_threads must be None or an integer in [1, 1024], "
                           "got 2.0"),
    ({"step_dispatch": "compiled-graph"}, "EngineConfig.step_dispatch must be one of "
                                          "('compiled_graph', 'actor_call'), got 'compiled-graph'"),
    ({"step_timeout_s": INF}, "EngineConfig.step_timeout_s must be a finite number > 0, got inf"),
    ({"step_timeout_s": 0}, "EngineConfig.step_timeout_s must be a finite number > 0, got 0"),
    ({"step_timeout_s": NAN}, "EngineConfig.step_timeout_s must be a finite number > 0, got nan"),
])
def test_bad_engine_config_value_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"seed": MAX_ENGINE_SEED},
    {"seed": 0},
    {"cpu_threads": 1},
    {"cpu_threads": MAX_CPU_THREADS},
    {"swap_space_gib": 0},
    {"swap_space_gib": 1.5},
    {"kv_cache_memory_gib": 0.25},
    {"gpu_memory_utilization": 1},
    {"model": Path("/some/checkpoint"), "tokenizer": "/some/tokenizer"},
])
def test_values_in_range_are_kept(kwargs):
    config = EngineConfig(**kwargs)
    assert {name: getattr(config, name) for name in kwargs} == kwargs


def test_largest_engine_seed_makes_every_generator_seed():
    """The seed feeds torch.Generator directly (sampling) and as seed * 1_000_003 + rank (dummy
    weights); both must stay inside the generator's 64-bit range."""
    import torch

    for seed in (MAX_ENGINE_SEED, MAX_ENGINE_SEED * 1_000_003 + 7):
        torch.Generator().manual_seed(seed)
