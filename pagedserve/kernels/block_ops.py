"""Whole-block moves in the paged KV cache: copy-on-write copies and GPU<->CPU swaps.

Caches use the layout of ``cache_ops`` (``[num_blocks, block_size, num_kv_heads, head_dim]``);
these ops only need each block (everything after the first dimension) to be one contiguous run,
so a per-layer view of a larger allocation works. ``block_mapping`` is int64 ``[n, 2]`` of
``(src_block, dst_block)`` pairs. Destination blocks must be distinct and must not also appear
as sources in the same call (the pairs run in parallel).

Every op moves bits, never values: fp8 caches are handled as bytes (torch has no fp8
``index_copy_``), so copy-on-write and swapping leave quantized K/V byte-for-byte unchanged.
"""

from __future__ import annotations

import torch

from pagedserve.kernels.checks import HAS_TRITON, require_triton

if HAS_TRITON:  # optional (see checks.py): without it only the torch code here is defined
    import triton
    import triton.language as tl

__all__ = ["copy_blocks", "copy_blocks_reference", "swap_blocks", "swap_blocks_reference"]

# Elements each program moves per loop step (a 16 KiB-64 KiB run per step at 2-8 bytes each).
_COPY_CHUNK = 8192
# Largest staging buffer one swap transfer uses (on the GPU and pinned on the host).
_MAX_STAGING_BYTES = 128 * 2**20


def _check_block_mapping(block_mapping: torch.Tensor) -> None:
    if block_mapping.dim() != 2 or block_mapping.shape[1] != 2:
        raise ValueError(
            f"block_mapping must be [n, 2] (src, dst) pairs, got {tuple(block_mapping.shape)}"
        )
    if block_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_mapping must be int64 (or int32), got {block_mapping.dtype}")


def _check_blocks_contiguous(name: str, cache: torch.Tensor) -> None:
    if cache.dim() < 2:
        raise ValueError(f"{name} must be [num_blocks, ...], got shape {tuple(cache.shape)}")
    if not cache[0].is_contiguous():
        raise ValueError(f"each block of {name} must be contiguous (everything after dim 0)")


def _check_layer_caches(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor]) -> None:
    if len(key_caches) != len(value_caches):
        raise ValueError(
            f"key_caches ({len(key_caches)}) and value_caches ({len(value_caches)}) must have "
            "one tensor per layer each"
        )
    caches = [*key_caches, *value_caches]
    if not caches:
        return
    first = caches[0]
    for index, cache in enumerate(caches):
        name = f"{'key' if index < len(key_caches) else 'value'}_caches[{index % len(key_caches)}]"
        if (cache.shape, cache.stride(), cache.dtype, cache.device) != (
            first.shape,
            first.stride(),
            first.dtype,
            first.device,
        ):
            raise ValueError(
                f"{name} differs from key_caches[0] in shape, strides, dtype or device; all "
                "layers' caches must match"
            )
        _check_blocks_contiguous(name, cache)


def _as_bits(caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float8 caches as uint8 views of the same memory (other dtypes unchanged)."""
    return [cache.view(torch.uint8) if cache.dtype.is_floating_point and cache.element_size() == 1
            else cache for cache in caches]


def copy_blocks_reference(
    key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    """Pure-torch ``copy_blocks``: ``cache[dst] = cache[src]`` for every layer's K and V."""
    _check_layer_caches(key_caches, value_caches)
    _check_block_mapping(block_mapping)
    for cache in _as_bits([*key_caches, *value_caches]):
        mapping = block_mapping.to(cache.device).long()
        cache[mapping[:, 1]] = cache[mapping[:, 0]]


if HAS_TRITON:
    # Integer types of each element size: the copy moves bits, so any cache dtype (fp8 too)
    # works.
    _BITS_BY_ELEMENT_SIZE = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}

    @triton.jit
    def _copy_blocks_kernel(
        cache_addresses_ptr,  # int64 [num_caches]: base address of every layer's K and V cache
        block_mapping_ptr,  # [n, 2] (src, dst)
        stride_cache_block,  # elements between consecutive blocks
        block_numel,  # elements in one block
        ELEMENT_TYPE: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        pair = tl.program_id(0).to(tl.int64)
        cache = tl.program_id(1)
        base = tl.load(cache_addresses_ptr + cache).to(tl.pointer_type(ELEMENT_TYPE))
        src = tl.load(block_mapping_ptr + 2 * pair).to(tl.int64) * stride_cache_block
        dst = tl.load(block_mapping_ptr + 2 * pair + 1).to(tl.int64) * stride_cache_block
        for start in range(0, block_numel, CHUNK):
            offsets = start + tl.arange(0, CHUNK)
            in_block = offsets < block_numel
            tl.store(
                base + dst + offsets, tl.load(base + src + offsets, mask=in_block), mask=in_block
            )


class _AddressTable:
    """Device tensor of cache base addresses, rebuilt only when the set of caches changes."""

    def __init__(self) -> None:
        self._key: tuple[int, ...] | None = None
        self._table: torch.Tensor | None = None

    def get(self, caches: list[torch.Tensor]) -> torch.Tensor:
        key = (caches[0].device.index or 0, *(cache.data_ptr() for cache in caches))
        if key != self._key or self._table is None:
            self._table = torch.tensor(
                [cache.data_ptr() for cache in caches], dtype=torch.int64, device=caches[0].device
            )
            self._key = key
        return self._table


_address_table = _AddressTable()


def copy_blocks(
    key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    """Copy blocks ``src -> dst`` in every layer's K and V cache, all layers in one launch.

    ``block_mapping`` is int64 ``[n, 2]``; it is moved to the caches' device if needed.
    """
    require_triton("copy_blocks")
    _check_layer_caches(key_caches, value_caches)
    _check_block_mapping(block_mapping)
    caches = [*key_caches, *value_caches]
    if not caches or block_mapping.shape[0] == 0:
        return
    first = caches[0]
    element_type = _BITS_BY_ELEMENT_SIZE.get(first.element_size())
    if element_type is None:
        raise TypeError(f"unsupported cache element size {first.element_size()} bytes")
    mapping = block_mapping.to(first.device).contiguous()
    _copy_blocks_kernel[(mapping.shape[0], len(caches))](
        _address_table.get(caches),
        mapping,
        first.stride(0),
        first[0].numel(),
        ELEMENT_TYPE=element_type,
        CHUNK=_COPY_CHUNK,
    )


def _check_swap_args(
    src_caches: list[torch.Tensor], dst_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    _check_block_mapping(block_mapping)
    if len(src_caches) != len(dst_caches):
        raise ValueError(
            f"src_caches ({len(src_caches)}) and dst_caches ({len(dst_caches)}) must pair up: "
            "one source and one destination tensor per layer and K/V"
        )
    for side, caches in (("src_caches", src_caches), ("dst_caches", dst_caches)):
        for index, cache in enumerate(caches):
            _check_blocks_contiguous(f"{side}[{index}]", cache)
            if (cache.shape[1:], cache.dtype, cache.device) != (
                caches[0].shape[1:],
                caches[0].dtype,
                caches[0].device,
            ):
                raise ValueError(
                    f"{side}[{index}] differs from {side}[0] in block shape, dtype or device"
                )
    if src_caches and (
        src_caches[0].shape[1:] != dst_caches[0].shape[1:]
        or src_caches[0].dtype != dst_caches[0].dtype
    ):
        raise ValueError(
            f"src_caches {src_caches[0].dtype} {tuple(src_caches[0].shape)} and dst_caches "
            f"{dst_caches[0].dtype} {tuple(dst_caches[0].shape)} must match in dtype and block "
            "shape"
        )


def swap_blocks_reference(
    src_caches: list[torch.Tensor], dst_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    """Pure-torch ``swap_blocks``: one block of one tensor at a time."""
    _check_swap_args(src_caches, dst_caches, block_mapping)
    for src_cache, dst_cache in zip(_as_bits(src_caches), _as_bits(dst_caches), strict=True):
        for src, dst in block_mapping.tolist():
            dst_cache[dst].copy_(src_cache[src])


def swap_blocks(
    src_caches: list[torch.Tensor],
    dst_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
    max_staging_bytes: int = _MAX_STAGING_BYTES,
) -> None:
    """Copy whole blocks ``src_caches[i][src] -> dst_caches[i][dst]`` across devices, for every
    pair of tensors (all layers' K and V) in as few transfers as the staging limit allows.

    Gathers the source blocks of every tensor into one staging buffer on the source device
    (pinned when that is the CPU), makes one (non-blocking where possible) transfer, and
    scatters on the destination device. Swaps happen when GPU memory is tight, so the staging
    buffers hold at most ``max_staging_bytes``; bigger swaps go in chunks of blocks. GPU->CPU
    waits once per chunk before scattering on the host, so the CPU caches hold the data when
    this returns; CPU->GPU and GPU->GPU are stream-ordered.
    """
    _check_swap_args(src_caches, dst_caches, block_mapping)
    if block_mapping.shape[0] == 0 or not src_caches:
        return
    src_caches, dst_caches = _as_bits(src_caches), _as_bits(dst_caches)
    src_device, dst_device = src_caches[0].device, dst_caches[0].device
    if src_device == dst_device:
        src_ids = block_mapping[:, 0].to(src_device, torch.int64)
        dst_ids = block_mapping[:, 1].to(dst_device, torch.int64)
        for src_cache, dst_cache in zip(src_caches, dst_caches, strict=True):
            dst_cache.index_copy_(0, dst_ids, src_cache.index_select(0, src_ids))
        return
    block = src_caches[0][0]
    bytes_per_block = len(src_caches) * block.numel() * block.element_size()
    chunk = max(1, max_staging_bytes // bytes_per_block)
    for first in range(0, block_mapping.shape[0], chunk):
        _swap_chunk(src_caches, dst_caches, block_mapping[first : first + chunk])


def _swap_chunk(
    src_caches: list[torch.Tensor], dst_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    src_device, dst_device = src_caches[0].device, dst_caches[0].device
    src_ids = block_mapping[:, 0].to(src_device, torch.int64)
    dst_ids = block_mapping[:, 1].to(dst_device, torch.int64)
    staging_shape = (len(src_caches), block_mapping.shape[0], *src_caches[0].shape[1:])
    dtype = src_caches[0].dtype
    if src_device.type == "cpu":
        # Host -> device: gather into pinned memory so the upload is asynchronous.
        staging = torch.empty(staging_shape, dtype=dtype, pin_memory=True)
        for index, src_cache in enumerate(src_caches):
            torch.index_select(src_cache, 0, src_ids, out=staging[index])
        uploaded = staging.to(dst_device, non_blocking=True)
        for index, dst_cache in enumerate(dst_caches):
            dst_cache.index_copy_(0, dst_ids, uploaded[index])
        return
    gathered = torch.empty(staging_shape, dtype=dtype, device=src_device)
    for index, src_cache in enumerate(src_caches):
        torch.index_select(src_cache, 0, src_ids, out=gathered[index])
    if dst_device.type == "cpu":
        # Device -> host: one download into pinned memory and one wait, then scatter on the host.
        staging = torch.empty(staging_shape, dtype=dtype, pin_memory=True)
        staging.copy_(gathered, non_blocking=True)
        torch.cuda.current_stream(src_device).synchronize()
    else:
        staging = gathered.to(dst_device)
    for index, dst_cache in enumerate(dst_caches):
        dst_cache.index_copy_(0, dst_ids, staging[index])
