"""Tensor-parallel linear layers (Megatron-style column/row split) with per-rank weight loaders.

Column-parallel layers split the output features across ranks and need no communication; a
row-parallel layer splits the input features and all-reduces its partial sums. A column layer
followed by a row layer (q/k/v -> o, gate/up -> down) therefore costs one all-reduce.

Each parameter carries `weight_loader(param, loaded_weight, shard_id=None)` that receives the
FULL checkpoint tensor (or a lazy safetensors slice of it) and copies this rank's part.

On CPU, `pack_weights_for_cpu` (called by the worker once the weights are loaded) gives each
large fp32 (or bf16) layer a copy of its weight prepacked for oneDNN: at decode-sized inputs
(4-128 rows) that matmul is about 1.4x faster than `F.linear` at one thread (SmolLM2-135M's 30
layers at 16 rows: 52 vs 76 ms in fp32, 22 vs 31 ms in bf16, measured). Other row counts, and
small weights (where oneDNN's per-call cost outweighs the gain: a 2-layer 128-wide model got
slower), stay on `F.linear`.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.workers.host_resources import available_host_memory
from pagedserve.workers.layers.parallel import TensorParallelGroup, divide_exactly, valid_tp_sizes
from pagedserve.workers.layers.weight_utils import LoadedWeight, check_shape, read_all, read_range

_SINGLE_RANK = TensorParallelGroup()
# Input rows that use the prepacked weight: below, F.linear's gemv-like path is faster; above,
# both are compute-bound and equal (946 rows: 1.06 vs 1.09 s for SmolLM2's layers).
CPU_PACKED_MIN_ROWS = 4
CPU_PACKED_MAX_ROWS = 128
# Smallest weight (elements) worth packing; SmolLM2-135M's smallest, o_proj, has 331776.
CPU_PACKED_MIN_ELEMENTS = 1 << 18
_PACKED_DTYPES = (torch.float32, torch.bfloat16)
# Packing copies the weights, so it is skipped when the copy would take more than this share
# of the host memory still available.
_CPU_PACKING_MEMORY_SHARE = 0.25

logger = logging.getLogger(__name__)


def _parameter(*shape: int, loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader
    return param


@functools.cache
def cpu_packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU run oneDNN's prepacked linear for `dtype` (x86 and Arm
    builds have it; bf16 also needs AVX-512 or AVX-NE-CONVERT, which a probe finds out)."""
    mkldnn = torch.ops.mkldnn
    if dtype not in _PACKED_DTYPES or not (
            torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise")):
        return False
    try:
        weight = torch.ones(8, 8, dtype=dtype)
        packed = mkldnn._reorder_linear_weight(weight, None)
        mkldnn._linear_pointwise(torch.ones(4, 8, dtype=dtype), packed, None, "none", [], "")
    except RuntimeError as error:
        logger.info("no prepacked CPU linears for %s: %s", dtype, error)
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed_weight: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through `packed_weight` (oneDNN's copy of `weight`) when
    there is one and `x` has enough rows to gain from it."""
    if (packed_weight is not None and x.dim() == 2
            and CPU_PACKED_MIN_ROWS <= x.shape[0] <= CPU_PACKED_MAX_ROWS):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight, bias, "none",
                                                  [], "")
    return F.linear(x, weight, bias)


def pack_weights_for_cpu(model: nn.Module) -> int:
    """Give every fp32 or bf16 CPU layer of `model` that has a `packed_weight` slot and at least
    `CPU_PACKED_MIN_ELEMENTS` weights a oneDNN-prepacked copy of its weight; returns the bytes
    packed (0 when oneDNN cannot run the layers' dtype here or the copies would not fit
    comfortably in host memory).

    The copies are a snapshot: call this once the weights are final (the worker does, after
    loading) and not again after changing weights in place. A layer whose weight is moved off
    the CPU or changes dtype stops using its copy (see `packed_weight_for`).
    """
    layers = [module for module in model.modules() if hasattr(module, "packed_weight")
              and module.weight.device.type == "cpu"
              and module.weight.numel() >= CPU_PACKED_MIN_ELEMENTS
              and cpu_packing_available(module.weight.dtype)]
    total = sum(module.weight.numel() * module.weight.element_size() for module in layers)
    host = available_host_memory()
    if host is not None and total > _CPU_PACKING_MEMORY_SHARE * host:
        logger.info("not prepacking %.2f GiB of CPU weights: %.2f GiB of host memory available",
                    total / 2**30, host / 2**30)
        return 0
    with torch.no_grad():
        for module in layers:
            module.packed_weight = (module.weight,
                                    torch.ops.mkldnn._reorder_linear_weight(module.weight, None))
    return total


def packed_weight_for(module: nn.Module) -> torch.Tensor | None:
    """`module`'s prepacked weight, if it has one and it was packed from its current weight."""
    packed = module.packed_weight
    if packed is None:
        return None
    source, weight = packed
    current = module.weight
    if (source is not current or current.device.type != "cpu"
            or current.dtype not in _PACKED_DTYPES):
        return None
    return weight


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
        self.packed_weight = None  # (source weight, oneDNN copy): see pack_weights_for_cpu

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight,
                      shard_id: object = None) -> None:
        del shard_id  # a plain column layer has one source tensor
        rows = param.shape[0]
        check_shape(loaded_weight, (rows * self.tp.size, *param.shape[1:]))
        param.data.copy_(read_range(loaded_weight, 0, self.tp.rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, packed_weight_for(self))


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
        self.packed_weight = None  # (source weight, oneDNN copy): see pack_weights_for_cpu

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
        packed = packed_weight_for(self)
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias, packed)
        out = self.tp.all_reduce(linear(x, self.weight, None, packed))
        return out if self.bias is None else out + self.bias
