"""FP8 (e4m3) KV cache: the quantization contract every KV kernel and CPU path shares.

A cache of dtype ``torch.float8_e4m3fn`` stores ``clamp(x / scale, -448, 448)`` rounded to the
nearest e4m3 value (ties to even); reading it back gives ``fp8 * scale``. Each layer has one
key scale and one value scale, float32 tensors of one element on the cache's device: tensors,
not Python floats, so a CUDA graph captured before the scales are known (checkpoint load or
calibration) reads the values they hold at replay.

Why saturate explicitly: e4m3fn has no infinity, and what an unclamped cast makes of a value
past 448 differs between torch versions, Triton and the interpreter (NaN in some), and one NaN
would poison every later attention over that slot. Why per-layer scales and not
per-head or per-token: they are what checkpoints carry (``k_scale``/``v_scale``), they cost no
extra bytes per token, and the Triton kernel folds them into the softmax scale and the output
(a multiply per tile, not per element).

Anything that reads an fp8 cache outside the Triton kernels (the CPU attention paths) calls
:func:`dequantize_kv` on the gathered bytes; anything that writes one calls :func:`quantize_kv`.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_E4M3_MAX",
    "FP8_KV_DTYPE",
    "calibrate_kv_scales_",
    "check_kv_scales",
    "dequantize_kv",
    "has_fp8",
    "is_fp8_cache",
    "kv_scale_from_amax",
    "quantize_kv",
]

FP8_E4M3_MAX = 448.0
FP8_KV_DTYPE: torch.dtype | None = getattr(torch, "float8_e4m3fn", None)
# The smallest scale calibration gives: an all-zero first prefill would otherwise give 0 and
# every later value would divide by zero.
_MIN_SCALE = 1e-12


def has_fp8() -> bool:
    """Whether this torch build has the e4m3 dtype an fp8 KV cache needs."""
    return FP8_KV_DTYPE is not None


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return FP8_KV_DTYPE is not None and cache.dtype == FP8_KV_DTYPE


def check_kv_scales(cache: torch.Tensor, k_scale, v_scale) -> None:
    """For an fp8 cache: both scales must be float32 one-element tensors on its device."""
    if not is_fp8_cache(cache):
        return
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(scale, torch.Tensor):
            raise TypeError(
                f"an fp8 KV cache needs {name} as a float32 tensor of one element, got "
                f"{type(scale).__name__}"
            )
        if scale.dtype != torch.float32 or scale.numel() != 1 or scale.device != cache.device:
            raise ValueError(
                f"{name} must be a float32 tensor of one element on {cache.device}, got "
                f"{scale.dtype} {tuple(scale.shape)} on {scale.device}"
            )


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` divided by ``scale`` (in fp32), saturated to +-448 and rounded to e4m3.

    The division is IEEE fp32 division, the same the Triton write kernel does (``div_rn``),
    so both store the same bytes. NaN stays NaN (a NaN key is a model bug, not a range issue).
    """
    scaled = x.float() / scale.reshape(()).float()
    return scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 cache entries ``x`` (any shape) as ``dtype``: ``x * scale`` computed in fp32.

    The helper for every CPU reader of an fp8 cache: gather the fp8 entries first (a quarter of
    the bytes of fp32), then dequantize only what was gathered.
    """
    return (x.to(torch.float32) * scale.reshape(()).float()).to(dtype)


def kv_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """The scale that maps ``amax`` onto e4m3's largest value (never below a tiny floor)."""
    return (amax.float() / FP8_E4M3_MAX).clamp_min(_MIN_SCALE)


@torch.no_grad()
def calibrate_kv_scales_(key: torch.Tensor, value: torch.Tensor, k_scale: torch.Tensor,
                         v_scale: torch.Tensor) -> bool:
    """Set the scales in place from this batch's largest key and value magnitudes; False (and
    nothing set) for a batch without tokens, which has nothing to calibrate on.

    On the device and without a host round trip, and into the existing tensors, so captured
    graphs that read ``k_scale``/``v_scale`` see the calibrated values. Non-finite entries are
    ignored (they would make every scale infinite).
    """
    if key.numel() == 0 or value.numel() == 0:
        return False
    for source, scale in ((key, k_scale), (value, v_scale)):
        magnitude = source.detach().float().abs()
        amax = torch.where(magnitude.isfinite(), magnitude, 0.0).amax()
        scale.copy_(kv_scale_from_amax(amax).reshape(scale.shape))
    return True
