"""Tensor-parallel group: this rank's place in the group and the collectives the layers need.

Every sharded layer receives a `TensorParallelGroup` instead of reading global state, so a test
(or a loader check) can build rank 1 of a TP=2 model in a process that never initialised
torch.distributed. Collectives are only touched when `size > 1`; then torch.distributed must be
initialised (NCCL on GPU, gloo on CPU) before the first forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    """This rank's index and the group size; `process_group` None means the default group."""

    rank: int = 0
    size: int = 1
    process_group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(
                f"tensor parallel rank must be in [0, size), got rank={self.rank} size={self.size}"
            )

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    def _require_initialized(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                f"tensor parallel size {self.size} needs torch.distributed to be initialised "
                "(see init_tensor_parallel) before running the model"
            )

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group in place and return it (identity for size 1)."""
        if self.size == 1:
            return tensor
        self._require_initialized()
        dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, in rank order, on every rank."""
        if self.size == 1:
            return tensor
        self._require_initialized()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.process_group)
        return torch.cat(parts, dim=dim)

    def gather_to_first(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's `tensor` along `dim` on rank 0; other ranks get None.

        Cheaper than `all_gather` when only rank 0 uses the result (the sampler runs there).
        """
        if self.size == 1:
            return tensor
        self._require_initialized()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)] if self.rank == 0 else None
        dst = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
        dist.gather(tensor, parts, dst=dst, group=self.process_group)
        return torch.cat(parts, dim=dim) if parts is not None else None


    def broadcast_from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite `tensor` on every rank with rank 0's (identity for size 1)."""
        if self.size == 1:
            return tensor
        self._require_initialized()
        src = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
        dist.broadcast(tensor, src=src, group=self.process_group)
        return tensor


def init_tensor_parallel(
    rank: int,
    size: int,
    init_method: str | None = None,
    backend: str | None = None,
    store: Any = None,
) -> TensorParallelGroup:
    """Initialise torch.distributed for a TP group spanning the whole world; TP=1 skips it.

    The ranks meet through `init_method` (a URL) or an already created `store` (a
    torch.distributed Store). `backend` defaults to NCCL when CUDA is available, else gloo.
    """
    if size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, init_method=init_method, store=store, rank=rank,
                                world_size=size)
    return TensorParallelGroup(rank=rank, size=size)


def divide_exactly(numerator: int, denominator: int, what: str) -> int:
    """`numerator // denominator`, raising a clear error when it does not divide."""
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor parallel size "
                         f"{denominator}")
    return numerator // denominator


def valid_tp_sizes(*sizes: int) -> list[int]:
    """Tensor parallel sizes that split every one of `sizes` evenly (the divisors of their gcd)."""
    common = math.gcd(*sizes)
    return [d for d in range(1, common + 1) if common % d == 0]
