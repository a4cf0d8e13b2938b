"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels.rms_norm import rms_norm
from pagedserve.workers.layers.weight_utils import default_weight_loader


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (as Hugging Face does).

    With `residual`, computes `x + residual` first and returns (normed, x + residual), the sum
    being the next residual. On CUDA a fused Triton kernel does both and writes the sum into
    `residual` in place, so callers must not reuse the tensor they pass as `residual`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm computes in fp32 and rounds once to x's dtype; scaling by the weight
        # afterwards, in x's dtype, reproduces Hugging Face's two roundings exactly.
        return F.rms_norm(x, self.weight.shape, eps=self.eps) * self.weight

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:  # one fused kernel; updates `residual` in place to x + residual
            return rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
