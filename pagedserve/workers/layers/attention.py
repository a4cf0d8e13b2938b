"""Attention over the paged KV cache for one flat batch of tokens (prefill, chunks and decode).

Per layer: store this step's K/V into their cache slots, then attend each query token to its
sequence's cached context through the block table. The Triton kernels run on CUDA tensors; on
CPU, torch code with the same contract: the K/V write as one `index_copy_` per cache and the
batched CPU attention (`paged_attention_cpu`), whose host-side plan (key slots, masks) is made
once per step and shared by every layer; all-decode steps attend each layer's contiguous copy of
the batch's K/V instead, kept across steps (`cpu_attention.DecodeKV`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pagedserve.kernels.cache_ops import write_kv, write_kv_reference
from pagedserve.kernels.kv_quant import calibrate_kv_scales_, is_fp8_cache, quantize_kv
from pagedserve.kernels.paged_attention import (
    CpuAttentionPlan,
    paged_attention,
    paged_attention_cpu,
    plan_cpu_attention,
    slot_rows,
)
from pagedserve.workers.layers.cpu_attention import DecodeKV, DecodeStep

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
    cpu_plans / cpu_write / cpu_decode: CPU only, made by the first layer that needs them and
        shared by the others (never moved by `to`): attention plans by (block size, sliding
        window), the slots to write with the rows they come from (None: every row), and the
        decode-step descriptions for `DecodeKV` by block size.
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
    cpu_decode: dict[int, DecodeStep | None] = field(default_factory=dict, repr=False,
                                                     compare=False)

    def cpu_decode_step(self, block_size: int) -> DecodeStep | None:
        """The step for `DecodeKV` (None unless every sequence decodes one token), made once."""
        if block_size not in self.cpu_decode:
            self.cpu_decode[block_size] = DecodeStep.for_batch(
                self.block_tables, self.query_start_loc, self.seq_lens, self.slot_mapping,
                self.max_query_len, self.max_seq_len, block_size)
        return self.cpu_decode[block_size]

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
    """Multi-head / grouped-query attention of this rank's heads over the paged cache.

    ``k_scale``/``v_scale`` (float32 buffers, 1.0 until a checkpoint or calibration sets them,
    see ``workers/kv_scales.py``) quantize and dequantize an fp8 cache; other caches ignore
    them. With ``calibrate_kv_scales`` set, the next eager forward sets them from its K/V.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.calibrate_kv_scales = False
        self.checkpoint_kv_scales: set[str] = set()  # the scales the checkpoint set
        self.cpu_decode_kv = DecodeKV()  # CPU decode steps' K/V, kept across steps

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> output [T, heads * head_dim]."""
        key_cache, value_cache = kv_cache
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.calibrate_kv_scales and not capturing:  # (a graph would bake the flag in)
            self.calibrate_kv_scales = not calibrate_kv_scales_(k, v, self.k_scale, self.v_scale)
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        args = (q, key_cache, value_cache, metadata.block_tables, metadata.query_start_loc,
                metadata.seq_lens)
        kwargs = dict(scale=self.scale, max_query_len=metadata.max_query_len,
                      max_seq_len=metadata.max_seq_len, sliding_window=self.sliding_window,
                      **scales)
        if q.is_cuda:
            write_kv(k, v, key_cache, value_cache, metadata.slot_mapping, **scales)
            return paged_attention(*args, **kwargs).flatten(1)
        _write_kv_cpu(k, v, key_cache, value_cache, metadata, **scales)
        attended = self.cpu_decode_kv.attend(
            q, key_cache, value_cache, metadata.cpu_decode_step(key_cache.shape[1]),
            scale=self.scale, sliding_window=self.sliding_window)
        if attended is not None:
            return attended.flatten(1)
        plan = metadata.cpu_plan(key_cache.shape[1], self.sliding_window)
        return paged_attention_cpu(*args, **kwargs, plan=plan).flatten(1)


def _write_kv_cpu(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, metadata: AttentionMetadata,
                  k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """`write_kv_reference`'s effect as one `index_copy_` per cache into its slot rows (the
    reference indexes by block and offset, 6x slower at decode sizes); the reference itself
    when the caches' strides allow no slot-row view. fp8 caches get `quantize_kv`'s bytes
    (copied as uint8: torch has no fp8 `index_copy_`)."""
    key_rows, value_rows = slot_rows(key_cache), slot_rows(value_cache)
    fp8 = is_fp8_cache(key_cache)
    dtypes_match = (key.dtype == value.dtype and value_cache.dtype == key_cache.dtype
                    and (fp8 or key.dtype == key_cache.dtype))
    if (key_rows is None or value_rows is None or key.shape != value.shape
            or key.shape[1:] != key_cache.shape[2:] or not dtypes_match):
        # (the reference also raises the errors of mismatched arguments)
        write_kv_reference(key, value, key_cache, value_cache, metadata.slot_mapping,
                           k_scale, v_scale)
        return
    slots, rows = metadata.cpu_write_slots()
    for source, target, scale in ((key, key_rows, k_scale), (value, value_rows, v_scale)):
        source = source.reshape(source.shape[0], -1)
        source = source if rows is None else source[rows]
        if fp8:
            source, target = quantize_kv(source, scale).view(torch.uint8), target.view(torch.uint8)
        target.index_copy_(0, slots, source)
