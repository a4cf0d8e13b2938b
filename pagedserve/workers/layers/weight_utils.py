"""Reading a rank's shard out of a full checkpoint tensor without materialising the rest.

A weight loader receives either a torch.Tensor or a lazy safetensors slice (`safe_open(...)
.get_slice(name)`). Both support `get_shape`-or-`.shape` and basic slicing, so loaders index them
the same way and only the requested rows/columns are ever read from disk.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class LazySlice(Protocol):
    """The part of safetensors' `PySafeSlice` we use."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


LoadedWeight = torch.Tensor | LazySlice


class WeightShapeError(ValueError):
    """A checkpoint tensor's shape does not match the parameter it is loaded into."""


def weight_shape(weight: LoadedWeight) -> tuple[int, ...]:
    if isinstance(weight, torch.Tensor):
        return tuple(weight.shape)
    return tuple(weight.get_shape())


def check_shape(weight: LoadedWeight, expected: tuple[int, ...]) -> None:
    got = weight_shape(weight)
    if got != tuple(expected):
        raise WeightShapeError(f"expected shape {tuple(expected)}, got {got}")


def read_range(weight: LoadedWeight, dim: int, start: int, length: int) -> torch.Tensor:
    """Read `weight[..., start:start+length, ...]` along `dim` (only that part is loaded)."""
    index = (slice(None),) * dim + (slice(start, start + length),)
    return weight[index]


def read_all(weight: LoadedWeight) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else weight[:]


def default_weight_loader(param: torch.Tensor, loaded_weight: LoadedWeight,
                          shard_id: Any = None) -> None:
    """Copy an unsharded weight, checking its shape (dtype/device conversion by copy_)."""
    del shard_id  # unsharded parameters have a single source tensor
    check_shape(loaded_weight, tuple(param.shape))
    param.data.copy_(read_all(loaded_weight))
