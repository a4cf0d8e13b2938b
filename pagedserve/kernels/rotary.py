"""Rotary position embedding (rotate-half / GPT-NeoX layout), applied in place to q and k.

Why a kernel: the torch version (``pagedserve.workers.layers.rotary``) gathers the cos|sin rows,
upcasts q and k, splits, multiplies, concatenates and downcasts: about ten passes over q and k,
plus two fresh output tensors. Here each program loads one token's cos|sin row once and rotates
a block of that token's heads in registers, so q and k are read once and written once, in place.
In place also means the rotated q and k stay in the fused qkv projection output they are views
of: no new allocation, and ``write_kv`` can read k straight from there.

Layout: ``cos_sin_cache`` is fp32 ``[max_position, head_dim]`` = ``cat(cos, sin)`` (each
``head_dim / 2`` wide), indexed by each token's absolute position. For a head ``x`` split into
halves ``x1 | x2``: ``out = (x1 * cos - x2 * sin) | (x2 * cos + x1 * sin)``, computed in fp32 and
rounded once to the input dtype, the same op order as the torch module (on a GPU the compiler
may fuse a multiply and add into an FMA, a difference of at most an fp32 ulp before rounding).
Rotation covers the whole ``head_dim`` (no partial rotary).

q ``[num_tokens, num_heads, head_dim]`` and k ``[num_tokens, num_kv_heads, head_dim]`` may be
strided views (e.g. slices of a fused qkv output); only the last dim must be contiguous.
Positions are not range-checked (that would need a host sync): each must be in
``[0, max_position)``.
"""

from __future__ import annotations

import torch

from pagedserve.kernels.checks import HAS_TRITON, check_same_device, require_triton

if HAS_TRITON:  # optional (see checks.py): without it only the torch code here is defined
    import triton
    import triton.language as tl

__all__ = ["apply_rotary", "apply_rotary_reference"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate_rotary_args(positions, q, k, cos_sin_cache) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            "q and k must be [num_tokens, num_heads, head_dim], got "
            f"{tuple(q.shape)} and {tuple(k.shape)}"
        )
    num_tokens, _, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on tokens/head_dim")
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be even and <= {MAX_HEAD_DIM}, got {head_dim}")
    if q.dtype != k.dtype or q.dtype not in _DTYPES:
        raise TypeError(f"q and k must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(
            f"the last dim of q and k must be contiguous, got strides {q.stride()}, {k.stride()}"
        )
    if positions.dim() != 1 or positions.shape[0] != num_tokens:
        raise ValueError(
            f"positions must be [num_tokens={num_tokens}], got {tuple(positions.shape)}"
        )
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be int64 (or int32), got {positions.dtype}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache must be [max_position, head_dim={head_dim}], got "
            f"{tuple(cos_sin_cache.shape)}"
        )
    if cos_sin_cache.dtype != torch.float32:
        raise TypeError(f"cos_sin_cache must be fp32, got {cos_sin_cache.dtype}")
    if cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"cos_sin_cache rows must be contiguous, got {cos_sin_cache.stride()}")
    check_same_device((positions, q, k, cos_sin_cache))


def apply_rotary_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch ``apply_rotary`` (the ``workers.rotary`` math), also in place: returns (q, k)."""
    _validate_rotary_args(positions, q, k, cos_sin_cache)
    cos, sin = cos_sin_cache[positions.long()].unsqueeze(-2).chunk(2, dim=-1)
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1))
    return q, k


if HAS_TRITON:

    @triton.jit
    def _rotary_kernel(
        positions_ptr,
        q_ptr,
        k_ptr,
        cos_sin_ptr,
        stride_q_token,
        stride_q_head,
        stride_k_token,
        stride_k_head,
        stride_cos_sin_position,
        num_q_heads,
        num_k_heads,
        num_q_head_blocks,
        HALF_DIM: tl.constexpr,
        HALF_DIM_PAD: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
    ):
        # Program (token, b) rotates BLOCK_HEADS heads of q (b < num_q_head_blocks) or of k.
        token = tl.program_id(0).to(tl.int64)
        head_block = tl.program_id(1)
        if head_block < num_q_head_blocks:
            base = q_ptr + token * stride_q_token
            stride_head = stride_q_head
            num_heads = num_q_heads
            first_head = head_block * BLOCK_HEADS
        else:
            base = k_ptr + token * stride_k_token
            stride_head = stride_k_head
            num_heads = num_k_heads
            first_head = (head_block - num_q_head_blocks) * BLOCK_HEADS

        position = tl.load(positions_ptr + token).to(tl.int64)
        dims = tl.arange(0, HALF_DIM_PAD)
        in_dim = dims < HALF_DIM
        cos_sin_row = cos_sin_ptr + position * stride_cos_sin_position
        cos = tl.load(cos_sin_row + dims, mask=in_dim, other=0.0)[None, :]
        sin = tl.load(cos_sin_row + HALF_DIM + dims, mask=in_dim, other=0.0)[None, :]

        heads = first_head + tl.arange(0, BLOCK_HEADS)
        mask = (heads < num_heads)[:, None] & in_dim[None, :]
        first_half = base + heads.to(tl.int64)[:, None] * stride_head + dims[None, :]
        second_half = first_half + HALF_DIM
        x1 = tl.load(first_half, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(second_half, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * cos - x2 * sin
        out2 = x2 * cos + x1 * sin
        tl.store(first_half, out1.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(second_half, out2.to(q_ptr.dtype.element_ty), mask=mask)


def apply_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[T, num_heads, D]`` and k ``[T, num_kv_heads, D]`` IN PLACE; returns (q, k).

    ``positions`` (int64/int32 ``[T]``, any order, each in ``[0, max_position)``) picks each
    token's row of ``cos_sin_cache`` (fp32 ``[max_position, D]`` = cat(cos, sin)). q and k may be
    strided views (token and head strides free, last dim contiguous), e.g. of a fused qkv output,
    and must not overlap each other. No host synchronisation (CUDA-graph safe).
    """
    require_triton("apply_rotary")
    _validate_rotary_args(positions, q, k, cos_sin_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    # ~2K elements per program; head blocks sized so k (the fewer heads, under GQA) wastes little.
    fewest_heads = max(min(num_q_heads, num_k_heads), 1)
    block_heads = min(triton.next_power_of_2(fewest_heads), max(1, 1024 // half_pad))
    num_q_head_blocks = triton.cdiv(num_q_heads, block_heads)
    num_k_head_blocks = triton.cdiv(num_k_heads, block_heads)
    if num_q_head_blocks + num_k_head_blocks == 0:
        return q, k
    _rotary_kernel[(num_tokens, num_q_head_blocks + num_k_head_blocks)](
        positions,
        q,
        k,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_k_heads,
        num_q_head_blocks,
        HALF_DIM=half,
        HALF_DIM_PAD=half_pad,
        BLOCK_HEADS=block_heads,
        num_warps=4,
    )
    return q, k
