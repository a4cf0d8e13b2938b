"""FP8 versions of the random paged batches: caches quantized with per-layer scales, and the
dense K/V the float64 oracle sees replaced by their fp8-rounded values (``fp8 * scale``)."""

from __future__ import annotations

import dataclasses

import torch

from pagedserve.kernels.kv_quant import FP8_KV_DTYPE, dequantize_kv, quantize_kv
from tests.kernels._batches import PagedBatch


@dataclasses.dataclass
class Fp8Batch:
    batch: PagedBatch  # fp8 caches; dense_keys/dense_values are the dequantized fp8 values
    k_scale: torch.Tensor
    v_scale: torch.Tensor

    def args(self) -> tuple:
        return self.batch.args()

    def kwargs(self) -> dict:
        return dict(self.batch.kwargs(), k_scale=self.k_scale, v_scale=self.v_scale)


def _round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequantize_kv(quantize_kv(x, scale), scale, torch.float64)


def quantize_batch(batch: PagedBatch, key_range: float = 1.0, value_range: float = 1.0) -> Fp8Batch:
    """``batch`` with e4m3 caches. The scales map ``key_range`` / ``value_range`` times the
    largest magnitude onto 448: below 1 some entries saturate, as an under-calibrated layer's
    do. NaN-poisoned (never written) slots stay NaN in the fp8 caches."""
    keys = torch.cat([k.reshape(-1) for k in batch.dense_keys]).float()
    values = torch.cat([v.reshape(-1) for v in batch.dense_values]).float()
    device = batch.key_cache.device
    k_scale = (keys.abs().max() * key_range / 448).reshape(1).to(device)
    v_scale = (values.abs().max() * value_range / 448).reshape(1).to(device)
    quantized = dataclasses.replace(
        batch,
        key_cache=quantize_kv(batch.key_cache, k_scale),
        value_cache=quantize_kv(batch.value_cache, v_scale),
        dense_keys=[_round_trip(k, k_scale) for k in batch.dense_keys],
        dense_values=[_round_trip(v, v_scale) for v in batch.dense_values],
    )
    assert quantized.key_cache.dtype == FP8_KV_DTYPE
    return Fp8Batch(quantized, k_scale.float(), v_scale.float())
