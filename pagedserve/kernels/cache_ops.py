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

FP8 caches (``torch.float8_e4m3fn``, see ``kv_quant``): the write divides by the layer's
``k_scale``/``v_scale``, saturates to +-448 and rounds to e4m3, in registers; the caches hold a
byte per element, so the same store pattern moves half the bytes of bf16.
"""

from __future__ import annotations

import torch

from pagedserve.kernels.checks import HAS_TRITON, check_same_device, require_triton
from pagedserve.kernels.kv_quant import (
    FP8_E4M3_MAX,
    check_kv_scales,
    is_fp8_cache,
    quantize_kv,
)

if HAS_TRITON:  # optional (see checks.py): without it only the torch code here is defined
    import triton
    import triton.language as tl

__all__ = ["write_kv", "write_kv_reference"]


def _validate_write_kv_args(key, value, key_cache, value_cache, slot_mapping, k_scale,
                            v_scale) -> None:
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
    if is_fp8_cache(key_cache) and value_cache.dtype == key_cache.dtype:
        if key.dtype != value.dtype or key.dtype not in (
            torch.float16, torch.bfloat16, torch.float32
        ):
            raise TypeError(
                "an fp8 cache stores float16, bfloat16 or float32 keys and values of one dtype, "
                f"got {key.dtype} and {value.dtype}"
            )
        check_kv_scales(key_cache, k_scale, v_scale)
    else:
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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Pure-torch ``write_kv``: scatter each token's K/V into its slot, skipping slot -1
    (quantized with the scales for an fp8 cache)."""
    _validate_write_kv_args(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    num_blocks, block_size = key_cache.shape[:2]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    blocks, offsets = slots // block_size, slots % block_size
    key, value = key[keep], value[keep]
    if is_fp8_cache(key_cache):
        key, value = quantize_kv(key, k_scale), quantize_kv(value, v_scale)
    key_cache[blocks, offsets] = key
    value_cache[blocks, offsets] = value


if HAS_TRITON:
    _FP8_MAX: tl.constexpr = tl.constexpr(FP8_E4M3_MAX)

    @triton.jit
    def _quantize(x, scale):
        """``x / scale`` saturated to e4m3's range and rounded to e4m3 (``kv_quant``'s contract:
        IEEE division, and NaN kept NaN, so the bytes equal the torch reference's)."""
        scaled = tl.math.div_rn(x.to(tl.float32), scale)
        scaled = tl.maximum(scaled, -_FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        scaled = tl.minimum(scaled, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        return scaled.to(tl.float8e4nv)

    @triton.jit
    def _write_kv_kernel(
        key_ptr,
        value_ptr,
        key_cache_ptr,
        value_cache_ptr,
        slot_mapping_ptr,
        k_scale_ptr,  # float32 [1] (fp8 caches only)
        v_scale_ptr,
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
        QUANTIZE: tl.constexpr,
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
        if QUANTIZE:
            key = _quantize(key, tl.load(k_scale_ptr))
        tl.store(
            key_cache_ptr
            + block * stride_key_cache_block
            + offset * stride_key_cache_offset
            + head * stride_key_cache_head
            + dims * stride_key_cache_dim,
            key.to(key_cache_ptr.dtype.element_ty),
            mask=in_dim,
        )
        value = tl.load(
            value_ptr
            + token * stride_value_token
            + head * stride_value_head
            + dims * stride_value_dim,
            mask=in_dim,
        )
        if QUANTIZE:
            value = _quantize(value, tl.load(v_scale_ptr))
        tl.store(
            value_cache_ptr
            + block * stride_value_cache_block
            + offset * stride_value_cache_offset
            + head * stride_value_cache_head
            + dims * stride_value_cache_dim,
            value.to(value_cache_ptr.dtype.element_ty),
            mask=in_dim,
        )


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into their cache slots.

    ``key`` and ``value`` may be strided views (e.g. slices of a fused qkv projection).
    ``slot_mapping`` (int64 ``[num_tokens]``) holds ``block_id * block_size + offset``; ``-1``
    skips the token. Slots must be distinct (two tokens writing one slot is a race). For fp8
    caches ``k_scale``/``v_scale`` (float32, one element, on the device) are required; other
    caches ignore them. No host synchronisation, so it can be captured in a CUDA graph.
    """
    require_triton("write_kv")
    _validate_write_kv_args(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    quantize = is_fp8_cache(key_cache)
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        k_scale if quantize else slot_mapping,
        v_scale if quantize else slot_mapping,
        *key.stride(),
        *value.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        head_dim,
        BLOCK_SIZE=key_cache.shape[1],
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        QUANTIZE=quantize,
    )
