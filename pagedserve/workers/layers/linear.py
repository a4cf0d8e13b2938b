"""Tensor-parallel linear layers (Megatron-style column/row split) with per-rank weight loaders.

Column-parallel layers split the output features across ranks and need no communication; a
row-parallel layer splits the input features and all-reduces its partial sums. A column layer
followed by a row layer (q/k/v -> o, gate/up -> down) therefore costs one all-reduce.

Each parameter carries `weight_loader(param, loaded_weight, shard_id=None)` that receives the
FULL checkpoint tensor (or a lazy safetensors slice of it) and copies this rank's part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.workers.layers.parallel import TensorParallelGroup, divide_exactly, valid_tp_sizes
from pagedserve.workers.layers.weight_utils import LoadedWeight, check_shape, read_all, read_range

_SINGLE_RANK = TensorParallelGroup()


def _parameter(*shape: int, loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split across ranks; output stays sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallelGroup = _SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_size_per_rank = divide_exactly(output_size, tp.size, "output_size")
        rows = self.output_size_per_rank
        self.weight = _parameter(rows, input_size, loader=self.weight_loader)
        self.bias = _parameter(rows, loader=self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight,
                      shard_id: object = None) -> None:
        del shard_id  # a plain column layer has one source tensor
        rows = param.shape[0]
        check_shape(loaded_weight, (rows * self.tp.size, *param.shape[1:]))
        param.data.copy_(read_range(loaded_weight, 0, self.tp.rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul.

    Each rank's weight is [shard_0 of part 0; shard_0 of part 1; ...] so that splitting the
    output by `output_sizes // tp` recovers every projection's local slice (e.g. gate and up).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp: TensorParallelGroup = _SINGLE_RANK) -> None:
        for index, size in enumerate(output_sizes):
            divide_exactly(size, tp.size, f"output_sizes[{index}]")
        super().__init__(input_size, sum(output_sizes), bias, tp)
        self.output_sizes = list(output_sizes)

    def _shard_index(self, shard_id: object) -> int:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be in [0, {len(self.output_sizes)}), got {shard_id!r}")
        return shard_id

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight,
                      shard_id: object = None) -> None:
        index = self._shard_index(shard_id)
        part_size = self.output_sizes[index]
        rows = part_size // self.tp.size
        offset = sum(self.output_sizes[:index]) // self.tp.size
        check_shape(loaded_weight, (part_size, *param.shape[1:]))
        param.data.narrow(0, offset, rows).copy_(
            read_range(loaded_weight, 0, self.tp.rank * rows, rows))


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q/k/v projection; each rank owns num_heads/tp query and num_kv_heads/tp KV heads.

    KV heads are not replicated, so tp must divide num_kv_heads (and num_heads).
    """

    SHARD_IDS = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TensorParallelGroup = _SINGLE_RANK) -> None:
        if num_heads % tp.size or num_kv_heads % tp.size:
            raise ValueError(
                f"tensor parallel size {tp.size} must divide num_attention_heads={num_heads} "
                f"and num_key_value_heads={num_kv_heads}; valid tensor parallel sizes: "
                f"{valid_tp_sizes(num_heads, num_kv_heads)}"
            )
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim,
                                       num_kv_heads * head_dim], bias, tp)
        self.head_dim = head_dim
        self.num_heads_per_rank = num_heads // tp.size
        self.num_kv_heads_per_rank = num_kv_heads // tp.size

    def _shard_index(self, shard_id: object) -> int:
        if shard_id not in self.SHARD_IDS:
            raise ValueError(f"shard_id must be one of {self.SHARD_IDS}, got {shard_id!r}")
        return self.SHARD_IDS.index(shard_id)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split this rank's fused output into q, k, v (flattened heads)."""
        q_size = self.num_heads_per_rank * self.head_dim
        kv_size = self.num_kv_heads_per_rank * self.head_dim
        return qkv.split([q_size, kv_size, kv_size], dim=-1)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split across ranks, then all-reduced.

    The input is expected to be already sharded (the output of a column-parallel layer).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallelGroup = _SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.input_size_per_rank = divide_exactly(input_size, tp.size, "input_size")
        self.weight = _parameter(output_size, self.input_size_per_rank, loader=self.weight_loader)
        self.bias = _parameter(output_size, loader=self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight,
                      shard_id: object = None) -> None:
        del shard_id
        if param.dim() == 1:  # the bias is replicated: added once, after the all-reduce
            check_shape(loaded_weight, tuple(param.shape))
            param.data.copy_(read_all(loaded_weight))
            return
        cols = param.shape[1]
        check_shape(loaded_weight, (param.shape[0], cols * self.tp.size))
        param.data.copy_(read_range(loaded_weight, 1, self.tp.rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias
