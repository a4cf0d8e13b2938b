"""KV pool sizing and allocation."""

from __future__ import annotations

import pytest
import torch

from pagedserve.workers.kv_pool import (
    allocate_kv_cache_for_config,
    bytes_per_block,
    num_blocks_for_budget,
)
from pagedserve.workers.models.loader import llama_8b_config, llama_70b_config
from tests.helpers.tiny_models import tiny_config


def test_bytes_per_block_for_llama_8b():
    # 32 layers x 16 tokens x (K and V) x 8 KV heads x 128 dims x 2 bytes = 2 MiB.
    assert bytes_per_block(llama_8b_config(), 16, torch.bfloat16) == 2 * 1024 * 1024
    assert bytes_per_block(llama_8b_config(), 16, torch.bfloat16, tp_size=2) == 1024 * 1024
    # 70B at TP=8: one KV head per rank.
    per_rank = 80 * 16 * 2 * 1 * 128 * 4
    assert bytes_per_block(llama_70b_config(), 16, torch.float32, tp_size=8) == per_rank


def test_num_blocks_for_budget_rounds_down():
    config = llama_8b_config()
    assert num_blocks_for_budget(10 * 2**30 + 5, config, 16, torch.bfloat16) == 5120
    assert num_blocks_for_budget(2**20, config, 16, torch.bfloat16) == 0


def test_kv_heads_must_split_evenly():
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tensor "
                                         "parallel size 4"):
        bytes_per_block(tiny_config("llama"), 16, torch.float32, tp_size=4)


def test_allocation_shapes_and_independent_layers():
    config = tiny_config("qwen3")  # head_dim 32 from the config, not hidden / heads
    caches = allocate_kv_cache_for_config(config, num_blocks=5, block_size=4,
                                          dtype=torch.float16, device="cpu", tp_size=2)
    assert len(caches) == config.num_hidden_layers
    for key_cache, value_cache in caches:
        assert key_cache.shape == value_cache.shape == (5, 4, 1, 32)
        assert key_cache.dtype == torch.float16 and not key_cache.any()
    caches[0][0].fill_(1)
    assert not caches[0][1].any() and not caches[1][0].any()
