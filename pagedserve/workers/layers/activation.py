"""Gated activation of the Llama MLP."""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.kernels.activation import silu_and_mul, silu_and_mul_reference


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is the fused [gate | up] projection along the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused kernel instead of three
            return silu_and_mul(x)
        return silu_and_mul_reference(x)
