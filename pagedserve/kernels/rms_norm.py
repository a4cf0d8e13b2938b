"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

Why a kernel: in torch the norm is about eight elementwise passes over the activations (add,
upcast, square, mean, rsqrt, multiply, downcast, weight multiply), each a full round trip through
HBM at prefill sizes. Here one program owns one row of ``hidden`` elements, keeps it in
registers, and touches HBM once: read ``x`` (and ``residual``), write ``out`` (and the new
residual). That is the bandwidth floor of the op.

Numerics follow the Hugging Face / ``pagedserve.workers.layers.norm.RMSNorm`` order exactly:

1. with a residual: ``h = x + residual`` rounded to the input dtype (torch adds in fp32 and
   rounds; so do we);
2. ``y = h32 * rsqrt(mean(h32 ** 2) + eps)`` in fp32, then rounded to the input dtype;
3. ``out = weight * y`` computed in fp32 and rounded to ``promote_types(x.dtype, weight.dtype)``.

The only difference from torch is the summation order of the mean of squares (a tree reduction
here), which moves ``rsqrt`` by an fp32 ulp or so: outputs match exactly or differ by one ulp of
the output dtype, rarely.

In-place contract: ``residual`` (when given) is overwritten with ``x + residual`` and returned as
the second result; ``out`` is a new tensor unless passed, and may be ``x`` itself (each program
reads its whole row before writing). ``out`` must not overlap ``residual`` or ``weight``.
"""

from __future__ import annotations

import torch

from pagedserve.kernels.checks import HAS_TRITON, check_same_device, require_triton

if HAS_TRITON:  # optional (see checks.py): without it only the torch code here is defined
    import triton
    import triton.language as tl

__all__ = ["MAX_HIDDEN_SIZE", "rms_norm", "rms_norm_reference"]

MAX_HIDDEN_SIZE = 16384  # one row is held in registers: 16384 fp32 over 16 warps = 32 per thread
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate_rms_norm_args(x, weight, eps, residual, out) -> None:
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the hidden size last)")
    hidden = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(f"weight must be [hidden={hidden}], got {tuple(weight.shape)}")
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise TypeError(
            f"x and weight must be fp16, bf16 or fp32, got {x.dtype} and {weight.dtype}"
        )
    if not isinstance(eps, float | int) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    tensors = [x, weight]
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must be {x.dtype} like x, got {residual.dtype}")
        tensors.append(residual)
    if out is not None:
        expected = torch.promote_types(x.dtype, weight.dtype)
        if out.shape != x.shape or out.dtype != expected:
            raise ValueError(
                f"out must be {tuple(x.shape)} {expected}, got {tuple(out.shape)} {out.dtype}"
            )
        tensors.append(out)
    check_same_device(tensors)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch ``rms_norm`` (the ``workers.norm.RMSNorm`` math) with the same in-place
    contract: ``residual`` is overwritten with ``x + residual``; ``out`` is written if given."""
    _validate_rms_norm_args(x, weight, eps, residual, out)
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    normed = weight * x32.to(x.dtype)
    if out is not None:
        normed = out.copy_(normed)
    return normed if residual is None else (normed, residual)


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        residual_ptr,
        weight_ptr,
        out_ptr,
        stride_x_row,
        stride_x_col,
        stride_residual_row,
        stride_residual_col,
        stride_out_row,
        stride_out_col,
        hidden,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program normalises one row; the whole row stays in registers.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        in_row = cols < hidden
        x = tl.load(x_ptr + row * stride_x_row + cols * stride_x_col, mask=in_row, other=0.0)
        if HAS_RESIDUAL:
            residual_ptrs = residual_ptr + row * stride_residual_row + cols * stride_residual_col
            residual = tl.load(residual_ptrs, mask=in_row, other=0.0)
            # torch adds in fp32 and rounds once to the input dtype; do the same.
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(residual_ptrs, x, mask=in_row)
        x32 = x.to(tl.float32)
        mean_square = tl.sum(x32 * x32, axis=0) / hidden
        normed = (x32 * tl.math.rsqrt(mean_square + eps)).to(x_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + cols, mask=in_row, other=0.0)
        out = weight.to(tl.float32) * normed.to(tl.float32)
        tl.store(
            out_ptr + row * stride_out_row + cols * stride_out_col,
            out.to(out_ptr.dtype.element_ty),
            mask=in_row,
        )


def _as_rows(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """[..., hidden] -> [rows, hidden] view; raises when that needs a copy (written tensors)."""
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError as error:
        raise ValueError(
            f"{name} {tuple(tensor.shape)} with strides {tensor.stride()} cannot be viewed as "
            "[rows, hidden] without a copy; pass a tensor whose leading dims flatten"
        ) from error


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * rmsnorm(x)`` over the last dim of ``x`` ``[..., hidden]`` (hidden <= 16384).

    Without ``residual``: returns ``out``. With ``residual`` (same shape and dtype as ``x``):
    overwrites ``residual`` IN PLACE with ``x + residual`` (rounded to ``x.dtype``), normalises
    that sum, and returns ``(out, residual)``. ``x`` is only read. ``out`` is a new tensor of
    dtype ``promote_types(x.dtype, weight.dtype)`` unless given; it may be ``x`` itself, must not
    overlap ``residual`` or ``weight``. Tensors may have any row stride; the residual and ``out``
    must flatten to ``[rows, hidden]`` without a copy. No host synchronisation (CUDA-graph safe).
    """
    require_triton("rms_norm")
    _validate_rms_norm_args(x, weight, eps, residual, out)
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN_SIZE:
        raise ValueError(
            f"hidden size {hidden} > {MAX_HIDDEN_SIZE} is not supported by the one-row-per-program "
            "kernel; use rms_norm_reference"
        )
    if out is None:
        out = torch.empty(
            x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device
        )
    x_rows = x.reshape(-1, hidden)  # read only: a copy is harmless
    out_rows = _as_rows(out, "out")
    residual_rows = _as_rows(residual, "residual") if residual is not None else x_rows
    weight = weight.contiguous()
    num_rows = x_rows.shape[0]
    if num_rows == 0 or hidden == 0:
        return out if residual is None else (out, residual)
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x_rows,
        residual_rows,
        weight,
        out_rows,
        *x_rows.stride(),
        *residual_rows.stride(),
        *out_rows.stride(),
        hidden,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 512, 1), 16),
    )
    return out if residual is None else (out, residual)
