"""Gated activation of the Llama MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels.activation import silu_and_mul, silu_and_mul_reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is the fused [gate | up] projection along the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused kernel instead of three
            return silu_and_mul(x)
        if x.dim() >= 1 and x.shape[-1] % 2 == 0 and x.dtype in _DTYPES:
            # silu_and_mul_reference's math and roundings, multiplying into silu's output
            # instead of allocating a third tensor.
            gate, up = x.chunk(2, dim=-1)
            return F.silu(gate).mul_(up)
        return silu_and_mul_reference(x)  # (raises the reference's error)
