"""Argument checks shared by the kernels' host wrappers, and whether Triton is there at all.

Triton is optional: pyproject installs it only on Linux x86_64, and the CPU path (the torch
references and the fast CPU attention) needs none. Each kernel module imports Triton and defines
its kernels only under ``HAS_TRITON``; its host wrapper calls :func:`require_triton` first.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True


def require_triton(op: str) -> None:
    """Raise RuntimeError naming `op` when Triton cannot be imported."""
    if not HAS_TRITON:
        raise RuntimeError(
            f"{op} is a Triton kernel and Triton is not installed (it is installed only on "
            f"Linux x86_64); use {op}_reference, which runs anywhere"
        )


def check_same_device(tensors: Iterable[torch.Tensor]) -> None:
    """Raise ValueError unless every tensor lives on one device (naming the devices seen)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
