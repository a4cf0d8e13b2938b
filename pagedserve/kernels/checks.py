"""Argument checks shared by the kernels' host wrappers."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def check_same_device(tensors: Iterable[torch.Tensor]) -> None:
    """Raise ValueError unless every tensor lives on one device (naming the devices seen)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
