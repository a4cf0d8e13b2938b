"""Writing this step's keys and values into the paged KV cache.

KV cache layout (one pair of tensors per layer, shared by every kernel in this package):
``key_cache`` and ``value_cache`` are each ``[num_blocks, block_size, num_kv_heads, head_dim]``.

Why this layout: one token's keys for all heads are one contiguous ``num_kv_heads * head_dim``
run, so ``write_kv`` is one contiguous store per token, and a block is one contiguous
``block_size * num_kv_heads * head_dim`` run, so copy-on-write and swapping move whole blocks
with plain memcpy-like copies. The attention kernel reads, for one KV head, ``head_dim``
contiguous elements per token (128 or 256 bytes at bf16), which is a full number of 32-byte
sectors, so paging costs no wasted DRAM traffic. The caller may allocate both tensors as views
of one larger tensor: only the innermost dimension has to be contiguous here (the block copy
needs whole blocks contiguous, see ``block_ops``).

A *slot* is ``block_id * block_size + offset_in_block``; slot ``-1`` marks a padding token whose
key and value are not stored.
"""

from __future__ import annotations

import torch

from pagedserve.kernels.checks import HAS_TRITON, check_same_device, require_triton

if HAS_TRITON:  # optional (see checks.py): without it only the torch code here is defined
    import triton
    import triton.language as tl

__all__ = ["write_kv", "write_kv_reference"]


def _validate_write_kv_args(key, value, key_cache, value_cache, slot_mapping) -> None:
    if key.dim() != 3 or value.dim() != 3:
        raise ValueError(
            f"key and value must be [num_tokens, num_kv_heads, head_dim], got {tuple(key.shape)} "
            f"and {tuple(value.shape)}"
        )
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in shape")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, "
            f"head_dim], got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key.shape[1:] != key_cache.shape[2:]:
        raise ValueError(
            f"key heads/head_dim {tuple(key.shape[1:])} do not match the cache's "
            f"{tuple(key_cache.shape[2:])}"
        )
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping must be [num_tokens={key.shape[0]}], got {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int64 (or int32), got {slot_mapping.dtype}")
    dtypes = {key.dtype, value.dtype, key_cache.dtype, value_cache.dtype}
    if len(dtypes) != 1:
        raise TypeError(
            f"key, value and the caches must share one dtype, got {sorted(map(str, dtypes))}"
        )
    check_same_device((key, value, key_cache, value_cache, slot_mapping))


def write_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Pure-torch ``write_kv``: scatter each token's K/V into its slot, skipping slot -1."""
    _validate_write_kv_args(key, value, key_cache, value_cache, slot_mapping)
    num_blocks, block_size = key_cache.shape[:2]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep]
    value_cache[blocks, offsets] = value[keep]


if HAS_TRITON:

    @triton.jit
    def _write_kv_kernel(
        key_ptr,
        value_ptr,
        key_cache_ptr,
        value_cache_ptr,
        slot_mapping_ptr,
        stride_key_token,
        stride_key_head,
        stride_key_dim,
        stride_value_token,
        stride_value_head,
        stride_value_dim,
        stride_key_cache_block,
        stride_key_cache_offset,
        stride_key_cache_head,
        stride_key_cache_dim,
        stride_value_cache_block,
        stride_value_cache_offset,
        stride_value_cache_head,
        stride_value_cache_dim,
        head_dim,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
    ):
        # One program stores one (token, kv head) row of keys and of values.
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot < 0:  # padding token
            return
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        dims = tl.arange(0, HEAD_DIM_PAD)
        in_dim = dims < head_dim

        key = tl.load(
            key_ptr + token * stride_key_token + head * stride_key_head + dims * stride_key_dim,
            mask=in_dim,
        )
        tl.store(
            key_cache_ptr
            + block * stride_key_cache_block
            + offset * stride_key_cache_offset
            + head * stride_key_cache_head
            + dims * stride_key_cache_dim,
            key,
            mask=in_dim,
        )
        value = tl.load(
            value_ptr
            + token * stride_value_token
            + head * stride_value_head
            + dims * stride_value_dim,
            mask=in_dim,
        )
        tl.store(
            value_cache_ptr
            + block * stride_value_cache_block
            + offset * stride_value_cache_offset
            + head * stride_value_cache_head
            + dims * stride_value_cache_dim,
            value,
            mask=in_dim,
        )


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into their cache slots.

    ``key`` and ``value`` may be strided views (e.g. slices of a fused qkv projection).
    ``slot_mapping`` (int64 ``[num_tokens]``) holds ``block_id * block_size + offset``; ``-1``
    skips the token. Slots must be distinct (two tokens writing one slot is a race). No host
    synchronisation, so it can be captured in a CUDA graph.
    """
    require_triton("write_kv")
    _validate_write_kv_args(key, value, key_cache, value_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        *key.stride(),
        *value.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        head_dim,
        BLOCK_SIZE=key_cache.shape[1],
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )
