"""The fast CPU paged attention (`paged_attention_cpu`, what the model runs on CPU) against the
torch reference on hostile batches: GQA ratios 1-8, padded head dims, block sizes 1-128,
sliding windows, half precision, sequences with no queries, one-token sequences, padding rows,
strided caches and queries, and length mixes that split the batch into several groups. Every
output starts NaN-poisoned, and the caches are NaN outside the written slots (`make_batch`)."""

from __future__ import annotations

import random

import pytest
import torch

from pagedserve.kernels.paged_attention import (
    paged_attention_cpu,
    paged_attention_reference,
    plan_cpu_attention,
)
from tests.kernels._batches import (
    MIXED_Q_LENS,
    MIXED_SEQ_LENS,
    make_batch,
    naive_dense_attention,
    relative_error,
)


def _tolerance(dtype: torch.dtype) -> float:
    # bf16 runs natively (SDPA accumulates in fp32), so it differs by bf16 rounding.
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}[dtype]


def _check(batch, *, sliding_window=None, plan=None, query=None, key_cache=None,
           value_cache=None, dtype=torch.float32):
    """Run the fast path into a NaN-poisoned output and compare it with the reference; rows
    that belong to no sequence must stay NaN."""
    args = list(batch.args())
    for index, override in ((0, query), (1, key_cache), (2, value_cache)):
        if override is not None:
            args[index] = override
    out = torch.full_like(batch.query, float("nan"))
    result = paged_attention_cpu(*args, **batch.kwargs(), out=out, sliding_window=sliding_window,
                                 plan=plan)
    assert result is out
    num_valid = int(batch.query_start_loc[-1])
    starts = batch.query_start_loc.tolist()
    written = torch.zeros(batch.query.shape[0], dtype=torch.bool)
    for seq in range(len(starts) - 1):
        written[starts[seq] : starts[seq + 1]] = True
    assert not out[written].isnan().any(), "rows of real query tokens left unwritten"
    assert out[~written].isnan().all(), "rows that belong to no sequence were written"
    expected = paged_attention_reference(*batch.args(), **batch.kwargs(),
                                         sliding_window=sliding_window)
    assert relative_error(out[:num_valid], expected[:num_valid]) < _tolerance(dtype)
    return out


@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim", "block_size", "sliding_window", "dtype"),
    [
        (2, 2, 64, 16, None, torch.float32),  # MHA
        (9, 3, 64, 16, None, torch.float32),  # SmolLM2's shape (ratio 3)
        (4, 1, 64, 8, None, torch.float16),  # ratio 4, half precision
        (8, 1, 128, 32, None, torch.float32),  # ratio 8
        (5, 1, 80, 16, 6, torch.float32),  # ratio 5, head_dim 80, sliding window
        (4, 2, 64, 128, None, torch.bfloat16),  # a 128-token block, bfloat16
        (4, 2, 32, 1, None, torch.float32),  # one token per block
        (4, 2, 32, 4, 1, torch.float32),  # window 1: each query sees only itself
        (6, 2, 16, 8, 1000, torch.float32),  # a window longer than every sequence
    ],
)
def test_mixed_batch_matches_reference(num_q_heads, num_kv_heads, head_dim, block_size,
                                       sliding_window, dtype):
    batch = make_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=num_q_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                       dtype=dtype, padding_tokens=3, seed=head_dim + block_size)
    _check(batch, sliding_window=sliding_window, dtype=dtype)


def test_matches_naive_dense_attention():
    batch = make_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=6, num_kv_heads=2, head_dim=32,
                       block_size=8, seed=3)
    for window in (None, 5):
        out = paged_attention_cpu(*batch.args(), **batch.kwargs(), sliding_window=window)
        assert relative_error(out, naive_dense_attention(batch, window)) < 1e-6


def test_sequences_without_queries_and_padding_rows():
    # Sequence 1 has no queries this step, sequence 3 is one token long; 4 padding rows.
    batch = make_batch([1, 0, 4, 1], [9, 17, 20, 1], num_q_heads=4, num_kv_heads=2,
                       head_dim=64, block_size=16, padding_tokens=4, seed=5)
    _check(batch)


def test_only_empty_sequences_write_nothing():
    batch = make_batch([0, 0], [5, 9], num_q_heads=2, num_kv_heads=1, head_dim=16,
                       block_size=4, padding_tokens=2)
    out = torch.full_like(batch.query, float("nan"))
    paged_attention_cpu(*batch.args(), **batch.kwargs(), out=out)
    assert out.isnan().all()


def test_decode_batch_is_one_group_in_token_order():
    seq_lens = [40 + 7 * i for i in range(16)]
    batch = make_batch([1] * 16, seq_lens, num_q_heads=9, num_kv_heads=3, head_dim=64,
                       block_size=16, seed=1)
    plan = plan_cpu_attention(batch.block_tables, batch.query_start_loc, batch.seq_lens,
                              block_size=16)
    assert len(plan.groups) == 1
    group = plan.groups[0]
    assert (group.num_seqs, group.q_rows, group.num_keys) == (16, 1, max(seq_lens))
    assert group.token_index is None and group.dest is None  # rows read and written in place
    _check(batch, plan=plan)


def test_lengths_that_differ_a_lot_split_into_groups():
    # One long prefill chunk, decode sequences of very different lengths, a short prefill.
    q_lens = [300, 1, 1, 1, 1, 5]
    seq_lens = [400, 2000, 1990, 30, 3, 12]
    batch = make_batch(q_lens, seq_lens, num_q_heads=4, num_kv_heads=2, head_dim=32,
                       block_size=16, padding_tokens=2, seed=9)
    plan = plan_cpu_attention(batch.block_tables, batch.query_start_loc, batch.seq_lens,
                              block_size=16)
    assert len(plan.groups) >= 3
    assert sum(group.num_seqs for group in plan.groups) == len(q_lens)
    assert max(group.num_seqs * group.q_rows * group.num_keys for group in plan.groups) < (
        2 * 300 * 400
    )
    _check(batch, plan=plan)


def test_sliding_window_gathers_only_the_window():
    batch = make_batch([1, 1, 6], [500, 90, 300], num_q_heads=4, num_kv_heads=1, head_dim=32,
                       block_size=16, seed=4)
    plan = plan_cpu_attention(batch.block_tables, batch.query_start_loc, batch.seq_lens,
                              block_size=16, sliding_window=32)
    assert max(group.num_keys for group in plan.groups) == 32 + 6 - 1
    _check(batch, sliding_window=32, plan=plan)


def test_one_plan_serves_every_layer():
    # The caches of two "layers" as views of one pool (the KV pool's layout), one shared plan.
    batch = make_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=4, num_kv_heads=2,
                       head_dim=32, block_size=8, seed=6)
    plan = plan_cpu_attention(batch.block_tables, batch.query_start_loc, batch.seq_lens,
                              block_size=8)
    pool = torch.stack([torch.stack([batch.key_cache, batch.value_cache])] * 2)
    for layer in range(2):
        _check(batch, plan=plan, key_cache=pool[layer, 0], value_cache=pool[layer, 1])


def test_strided_cache_and_query():
    # Heads outer in memory ([blocks, heads, block, dim] permuted): no slot-row view exists, so
    # keys are gathered by (block, offset). The query is a slice of a fused qkv-like tensor.
    batch = make_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=6, num_kv_heads=2,
                       head_dim=32, block_size=16, padding_tokens=1, seed=8)
    keys = batch.key_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    values = batch.value_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    fused = torch.cat([batch.query, torch.randn_like(batch.query)], dim=1)
    query = fused[:, : batch.query.shape[1]]
    assert not query.is_contiguous()
    _check(batch, query=query, key_cache=keys, value_cache=values)


@pytest.mark.parametrize(("window", "plain_causal"), [(None, True), (200, True), (10, False)])
def test_one_whole_prompt_runs_as_plain_causal_attention(window, plain_causal):
    # A prompt with no cached context and no window inside it needs no mask (a 8k-token prompt
    # would need a 256 MiB one); a chunk after cached context, or a short window, does.
    batch = make_batch([70], [70], num_q_heads=6, num_kv_heads=2, head_dim=32, block_size=16,
                       padding_tokens=2, seed=10)
    plan = plan_cpu_attention(batch.block_tables, batch.query_start_loc, batch.seq_lens,
                              block_size=16, sliding_window=window)
    assert (plan.groups[0].mask is None) == plain_causal
    _check(batch, sliding_window=window, plan=plan)
    chunk = make_batch([30], [70], num_q_heads=6, num_kv_heads=2, head_dim=32, block_size=16,
                       seed=11)
    plan = plan_cpu_attention(chunk.block_tables, chunk.query_start_loc, chunk.seq_lens,
                              block_size=16, sliding_window=window)
    assert plan.groups[0].mask is not None
    _check(chunk, sliding_window=window, plan=plan)


def test_plan_for_another_window_or_block_size_is_refused():
    batch = make_batch([1, 2], [5, 9], num_q_heads=2, num_kv_heads=1, head_dim=16,
                       block_size=4)
    plan = plan_cpu_attention(batch.block_tables, batch.query_start_loc, batch.seq_lens,
                              block_size=4)
    with pytest.raises(ValueError, match="plan was made for"):
        paged_attention_cpu(*batch.args(), **batch.kwargs(), sliding_window=3, plan=plan)


def test_sequence_shorter_than_its_queries_is_refused():
    batch = make_batch([1, 2], [5, 9], num_q_heads=2, num_kv_heads=1, head_dim=16,
                       block_size=4)
    seq_lens = torch.tensor([5, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="shorter than its 2 queries"):
        paged_attention_cpu(*batch.args()[:5], seq_lens, **batch.kwargs())


@pytest.mark.parametrize("seed", range(12))
def test_random_batches_match_reference(seed):
    rng = random.Random(seed)
    num_kv_heads = rng.choice([1, 2, 3])
    num_q_heads = num_kv_heads * rng.choice([1, 2, 3, 4, 7])
    block_size = rng.choice([1, 2, 8, 16, 32])
    q_lens, seq_lens = [], []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        q_len = 0 if kind < 0.1 else 1 if kind < 0.7 else rng.randint(2, 40)
        seq_len = max(q_len, 1) + rng.choice([0, rng.randint(0, 20), rng.randint(0, 300)])
        q_lens.append(q_len)
        seq_lens.append(seq_len)
    batch = make_batch(q_lens, seq_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                       head_dim=rng.choice([8, 32, 64]), block_size=block_size,
                       padding_tokens=rng.randint(0, 3), seed=seed)
    _check(batch, sliding_window=rng.choice([None, None, 1, 7, 64]))
