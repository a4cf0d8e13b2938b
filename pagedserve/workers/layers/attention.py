"""Attention over the paged KV cache for one flat batch of tokens (prefill, chunks and decode).

Per layer: store this step's K/V into their cache slots, then attend each query token to its
sequence's cached context through the block table. The Triton kernels run on CUDA tensors; on
CPU, torch code with the same contract: the K/V write as one `index_copy_` per cache and the
batched CPU attention (`paged_attention_cpu`), whose host-side plan (key slots, masks) is made
once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pagedserve.kernels.cache_ops import write_kv, write_kv_reference
from pagedserve.kernels.paged_attention import (
    CpuAttentionPlan,
    paged_attention,
    paged_attention_cpu,
    plan_cpu_attention,
    slot_rows,
)

KVCache = tuple[torch.Tensor, torch.Tensor]
"""(key_cache, value_cache) of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""


@dataclass
class AttentionMetadata:
    """How this step's flat token batch maps onto sequences and cache slots (shared by layers).

    slot_mapping: int64 [num_tokens], cache slot (block * block_size + offset) of each token's
        K/V, -1 to skip (padding).
    block_tables: int32 [num_seqs, max_blocks], physical block of each logical block.
    query_start_loc: int32 [num_seqs + 1], prefix sums of the per-sequence query lengths.
    seq_lens: int32 [num_seqs], context length including this step's tokens.
    max_query_len / max_seq_len: host-side maxima of the two (for kernel launch configuration).
    cpu_plans / cpu_write: CPU only, made by the first layer that needs them and shared by the
        others (never moved by `to`): attention plans by (block size, sliding window), and the
        slots to write with the rows they come from (None: every row).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_query_len: int
    max_seq_len: int
    cpu_plans: dict[tuple[int, int | None], CpuAttentionPlan] = field(
        default_factory=dict, repr=False, compare=False)
    cpu_write: tuple[torch.Tensor, torch.Tensor | None] | None = field(
        default=None, repr=False, compare=False)

    def cpu_plan(self, block_size: int, sliding_window: int | None) -> CpuAttentionPlan:
        """The step's CPU attention plan for this block size and window (made once)."""
        key = (block_size, sliding_window)
        plan = self.cpu_plans.get(key)
        if plan is None:
            plan = self.cpu_plans[key] = plan_cpu_attention(
                self.block_tables, self.query_start_loc, self.seq_lens, block_size=block_size,
                sliding_window=sliding_window)
        return plan

    def cpu_write_slots(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(slots to write, the token rows that go there or None for all rows): padding tokens
        (slot -1) dropped, once per step."""
        if self.cpu_write is None:
            slots = self.slot_mapping.long()
            keep = slots >= 0
            rows = None if bool(keep.all()) else keep.nonzero().flatten()
            self.cpu_write = (slots if rows is None else slots[rows], rows)
        return self.cpu_write

    def to(self, device: torch.device | str) -> AttentionMetadata:
        """The same metadata with every tensor moved to `device` (non-blocking)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            block_tables=self.block_tables.to(device, non_blocking=True),
            query_start_loc=self.query_start_loc.to(device, non_blocking=True),
            seq_lens=self.seq_lens.to(device, non_blocking=True),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
        )


class Attention(nn.Module):
    """Multi-head / grouped-query attention of this rank's heads over the paged cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> output [T, heads * head_dim]."""
        key_cache, value_cache = kv_cache
        args = (q, key_cache, value_cache, metadata.block_tables, metadata.query_start_loc,
                metadata.seq_lens)
        kwargs = dict(scale=self.scale, max_query_len=metadata.max_query_len,
                      max_seq_len=metadata.max_seq_len, sliding_window=self.sliding_window)
        if q.is_cuda:
            write_kv(k, v, key_cache, value_cache, metadata.slot_mapping)
            return paged_attention(*args, **kwargs).flatten(1)
        _write_kv_cpu(k, v, key_cache, value_cache, metadata)
        plan = metadata.cpu_plan(key_cache.shape[1], self.sliding_window)
        return paged_attention_cpu(*args, **kwargs, plan=plan).flatten(1)


def _write_kv_cpu(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, metadata: AttentionMetadata) -> None:
    """`write_kv_reference`'s effect as one `index_copy_` per cache into its slot rows (the
    reference indexes by block and offset, 6x slower at decode sizes); the reference itself
    when the caches' strides allow no slot-row view."""
    key_rows, value_rows = slot_rows(key_cache), slot_rows(value_cache)
    if (key_rows is None or value_rows is None or key.shape != value.shape
            or key.shape[1:] != key_cache.shape[2:]
            or len({key.dtype, value.dtype, key_cache.dtype, value_cache.dtype}) != 1):
        # (the reference also raises the errors of mismatched arguments)
        write_kv_reference(key, value, key_cache, value_cache, metadata.slot_mapping)
        return
    slots, rows = metadata.cpu_write_slots()
    for source, target in ((key, key_rows), (value, value_rows)):
        source = source.reshape(source.shape[0], -1)
        target.index_copy_(0, slots, source if rows is None else source[rows])
