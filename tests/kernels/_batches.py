"""Random paged-attention batches shared by the CPU (interpreter) and GPU kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Mixed batch in one launch: decode (q_len 1), chunked prefill over cached context, a full
# prefill, a one-token sequence; lengths are not multiples of any block size.
MIXED_Q_LENS = [1, 7, 1, 19, 1]
MIXED_SEQ_LENS = [1, 26, 37, 19, 45]

KERNEL_HEAD_SHAPES = [
    (2, 2, 64, 16, torch.float32),  # GQA ratio 1 (MHA)
    (4, 1, 64, 8, torch.float16),  # ratio 4
    (8, 1, 128, 32, torch.float32),  # ratio 8
    (5, 1, 80, 16, torch.float32),  # ratio 5 (padded group), head_dim 80 (padded dims)
    (4, 2, 64, 128, torch.float16),  # a 128-token block
]
"""(num_q_heads, num_kv_heads, head_dim, block_size, dtype) the kernels are checked over."""


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens, q_heads, head_dim]
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32
    query_start_loc: torch.Tensor  # int32
    seq_lens: torch.Tensor  # int32
    max_query_len: int
    max_seq_len: int
    dense_keys: list[torch.Tensor]  # per sequence [seq_len, kv_heads, head_dim]
    dense_values: list[torch.Tensor]
    scale: float

    def kwargs(self) -> dict:
        return dict(
            scale=self.scale, max_query_len=self.max_query_len, max_seq_len=self.max_seq_len
        )

    def args(self) -> tuple:
        return (
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.query_start_loc,
            self.seq_lens,
        )


def make_batch(
    q_lens: list[int],
    seq_lens: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_blocks: int | None = None,
    padding_tokens: int = 0,
    seed: int = 0,
) -> PagedBatch:
    """Random K/V for each sequence scattered into shuffled physical blocks of a NaN-poisoned
    cache (unused slots and blocks stay NaN, so a kernel reading them fails the test). Block-table
    entries past a sequence's last block are filled with an out-of-range id for the same reason.
    ``padding_tokens`` extra query rows belong to no sequence."""
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    total_blocks = sum(blocks_needed)
    num_blocks = num_blocks or total_blocks + 3
    assert num_blocks >= total_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    # Physical blocks drawn from the top of the id range first, in shuffled order.
    physical = num_blocks - 1 - torch.randperm(num_blocks, generator=generator)[:total_blocks]
    max_blocks = max(blocks_needed) + 1
    block_tables = torch.full((len(seq_lens), max_blocks), 2**30, dtype=torch.int32)
    dense_keys, dense_values = [], []
    cursor = 0
    for seq, seq_len in enumerate(seq_lens):
        ids = physical[cursor : cursor + blocks_needed[seq]]
        cursor += blocks_needed[seq]
        block_tables[seq, : len(ids)] = ids.int()
        keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator).to(dtype)
        values = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator).to(dtype)
        positions = torch.arange(seq_len)
        key_cache[ids[positions // block_size], positions % block_size] = keys
        value_cache[ids[positions // block_size], positions % block_size] = values
        dense_keys.append(keys)
        dense_values.append(values)
    num_tokens = sum(q_lens) + padding_tokens
    query = torch.randn(num_tokens, num_q_heads, head_dim, generator=generator).to(dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    to = lambda t: t.to(device)
    return PagedBatch(
        query=to(query),
        key_cache=to(key_cache),
        value_cache=to(value_cache),
        block_tables=to(block_tables),
        query_start_loc=to(starts),
        seq_lens=to(torch.tensor(seq_lens, dtype=torch.int32)),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        dense_keys=[to(k) for k in dense_keys],
        dense_values=[to(v) for v in dense_values],
        scale=head_dim**-0.5,
    )


def naive_dense_attention(batch: PagedBatch, sliding_window: int | None = None) -> torch.Tensor:
    """Float64 causal attention on the dense (un-paged) K/V: repeat K/V heads, explicit mask."""
    num_tokens, num_q_heads, _ = batch.query.shape
    group = num_q_heads // batch.dense_keys[0].shape[1]
    out = torch.full(batch.query.shape, float("nan"), dtype=torch.float64)
    starts = batch.query_start_loc.tolist()
    for seq, (keys, values) in enumerate(zip(batch.dense_keys, batch.dense_values, strict=True)):
        q = batch.query[starts[seq] : starts[seq + 1]].double().cpu()
        k = keys.double().cpu().repeat_interleave(group, dim=1)
        v = values.double().cpu().repeat_interleave(group, dim=1)
        q_len, seq_len = q.shape[0], k.shape[0]
        scores = torch.einsum("qhd,khd->hqk", q, k) * batch.scale
        query_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        key_pos = torch.arange(seq_len)[None, :]
        mask = key_pos <= query_pos
        if sliding_window is not None:
            mask &= key_pos > query_pos - sliding_window
        scores = scores.masked_fill(~mask, float("-inf"))
        out[starts[seq] : starts[seq + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()
