"""The paged KV pool of one rank: per-layer key/value caches and how many blocks fit.

Every layer's cache is `[num_blocks, block_size, local_kv_heads, head_dim]` for keys and the same
for values (the layout the kernels expect). All layers live in one allocation so the pool is
reserved (and freed) at once, and block ids mean the same thing in every layer and every rank.

The pool's dtype is `EngineConfig.kv_cache_dtype`: the model dtype ('auto') or e4m3 ('fp8', one
byte per element), so at the same memory an fp8 pool holds twice the blocks of a bf16 one (four
times fp32's), on every rank alike.
"""

from __future__ import annotations

from typing import Any

import torch

from pagedserve.kernels.kv_quant import FP8_KV_DTYPE, has_fp8
from pagedserve.scheduler.config import ConfigError
from pagedserve.workers.layers.attention import KVCache
from pagedserve.workers.layers.parallel import divide_exactly
from pagedserve.workers.models.llama import head_dim_of, num_kv_heads_of


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's element type for `EngineConfig.kv_cache_dtype` ('auto' or 'fp8')."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype != "fp8":
        raise ConfigError(f"EngineConfig.kv_cache_dtype must be one of ('auto', 'fp8'), got "
                          f"{kv_cache_dtype!r}")
    if not has_fp8():
        raise ConfigError(f"EngineConfig.kv_cache_dtype='fp8' needs torch.float8_e4m3fn, which "
                          f"torch {torch.__version__} lacks; use 'auto' or torch >= 2.1")
    return FP8_KV_DTYPE


def kv_dtype_name(dtype: torch.dtype) -> str:
    """How model info names a pool dtype: 'bfloat16', 'float8_e4m3fn', ..."""
    return str(dtype).removeprefix("torch.")


def local_kv_heads(config: Any, tp_size: int = 1) -> int:
    """KV heads this rank stores (KV heads are split across ranks, never replicated)."""
    return divide_exactly(num_kv_heads_of(config), tp_size, "num_key_value_heads")


def bytes_per_block(config: Any, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes one block takes on one rank, keys and values of every layer."""
    element_size = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * local_kv_heads(config, tp_size) * head_dim_of(config) * element_size
    return config.num_hidden_layers * block_size * per_token


def num_blocks_for_budget(budget_bytes: int, config: Any, block_size: int, dtype: torch.dtype,
                          tp_size: int = 1) -> int:
    """How many whole blocks fit in `budget_bytes` on one rank."""
    return max(0, int(budget_bytes) // bytes_per_block(config, block_size, dtype, tp_size))


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype,
                      device: torch.device | str) -> list[KVCache]:
    """Zeroed (key_cache, value_cache) views per layer into one [layers, 2, ...] allocation.

    Zeroed rather than empty so reading a never-written slot (a kernel bug) gives finite values
    instead of NaN garbage that would be harder to trace.
    """
    pool = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                       dtype=dtype, device=device)
    return [(pool[layer, 0], pool[layer, 1]) for layer in range(num_layers)]


def allocate_kv_cache_for_config(config: Any, num_blocks: int, block_size: int,
                                 dtype: torch.dtype, device: torch.device | str,
                                 tp_size: int = 1) -> list[KVCache]:
    return allocate_kv_cache(config.num_hidden_layers, num_blocks, block_size,
                             local_kv_heads(config, tp_size), head_dim_of(config), dtype, device)


