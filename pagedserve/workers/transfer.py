"""Host-to-device copies that never make the host wait for the device.

`torch.tensor(values, device="cuda")` copies synchronously: it first waits for every kernel
already queued on the stream, which would stall async scheduling behind the running step. These
copies stage through pinned memory (PyTorch's caching host allocator hands a staging buffer out
again only after its copy ran) and return at once; off CUDA they are plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` (a list, or nested lists of equal lengths) as a tensor on `device`."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
