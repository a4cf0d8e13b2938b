"""Attention over the paged KV cache for one flat batch of tokens (prefill, chunks and decode).

Per layer: store this step's K/V into their cache slots, then attend each query token to its
sequence's cached context through the block table. The Triton kernels run on CUDA tensors; on
CPU the torch reference implementations (same contract) run instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedserve.kernels.cache_ops import write_kv, write_kv_reference
from pagedserve.kernels.paged_attention import paged_attention, paged_attention_reference

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
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_query_len: int
    max_seq_len: int

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
        on_gpu = q.is_cuda
        (write_kv if on_gpu else write_kv_reference)(
            k, v, key_cache, value_cache, metadata.slot_mapping)
        attend = paged_attention if on_gpu else paged_attention_reference
        out = attend(
            q, key_cache, value_cache, metadata.block_tables, metadata.query_start_loc,
            metadata.seq_lens, scale=self.scale, max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len, sliding_window=self.sliding_window,
        )
        return out.flatten(1)
