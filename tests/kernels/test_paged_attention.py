"""Paged attention: the torch reference against naive dense attention, and the Triton kernel
(interpreted on CPU) against the reference."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.paged_attention import (
    AttentionConfig,
    paged_attention,
    paged_attention_reference,
)
from tests.kernels._batches import (
    KERNEL_HEAD_SHAPES,
    MIXED_Q_LENS,
    MIXED_SEQ_LENS,
    make_batch,
    naive_dense_attention,
    relative_error,
)


@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "block_size", "sliding_window"),
    [(2, 2, 8, None), (4, 1, 16, None), (5, 1, 16, 6), (8, 2, 32, None)],
)
def test_reference_matches_naive_dense_attention(
    num_q_heads, num_kv_heads, block_size, sliding_window
):
    batch = make_batch(
        MIXED_Q_LENS,
        MIXED_SEQ_LENS,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=32,
        block_size=block_size,
        seed=num_q_heads,
    )
    out = paged_attention_reference(*batch.args(), **batch.kwargs(), sliding_window=sliding_window)
    assert relative_error(out, naive_dense_attention(batch, sliding_window)) < 1e-6


def _check_kernel(batch, *, tolerance, **options):
    out = torch.full_like(batch.query, float("nan"))
    result = paged_attention(*batch.args(), **batch.kwargs(), out=out, **options)
    assert result is out
    num_valid = int(batch.query_start_loc[-1])
    assert not out[:num_valid].isnan().any(), "kernel left output rows unwritten"
    options.pop("num_kv_splits", None)
    options.pop("config", None)
    expected = paged_attention_reference(*batch.args(), **batch.kwargs(), **options)
    assert relative_error(out[:num_valid], expected[:num_valid]) < tolerance
    return out


@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim", "block_size", "dtype"),
    KERNEL_HEAD_SHAPES,
)
def test_kernel_matches_reference_on_mixed_batch(
    num_q_heads, num_kv_heads, head_dim, block_size, dtype
):
    batch = make_batch(
        MIXED_Q_LENS,
        MIXED_SEQ_LENS,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=head_dim + block_size,
    )
    _check_kernel(batch, tolerance=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize(
    ("block_size", "block_n", "num_kv_splits"),
    [(128, 16, 1), (8, 64, 1), (32, 32, 3), (16, 128, 2)],
    ids=["tile-inside-block", "tile-spans-blocks", "tile-equals-block", "split-wide-tile"],
)
def test_key_tile_is_independent_of_block_size(block_size, block_n, num_kv_splits):
    batch = make_batch(
        [1, 5, 1],
        [300, 141, 7],
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=64,
        block_size=block_size,
        seed=block_size + block_n,
    )
    config = AttentionConfig(
        block_q=8, block_n=block_n, num_kv_splits=num_kv_splits, num_warps=4, num_stages=2
    )
    _check_kernel(batch, tolerance=1e-5, config=config)


@pytest.mark.parametrize(
    ("q_lens", "seq_lens", "num_kv_splits", "sliding_window"),
    [
        ([1, 1, 1], [70, 5, 129], 4, None),  # decode: some splits see no keys at all
        ([1, 6, 1], [70, 40, 3], 3, None),  # split-KV with a prefill chunk in the batch
        ([1, 1], [90, 33], 2, 20),  # split-KV and sliding window
    ],
)
def test_split_kv_matches_reference(q_lens, seq_lens, num_kv_splits, sliding_window):
    batch = make_batch(
        q_lens,
        seq_lens,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        seed=num_kv_splits,
    )
    _check_kernel(batch, tolerance=1e-5, num_kv_splits=num_kv_splits, sliding_window=sliding_window)


def test_split_kv_counters_are_left_zeroed_for_the_next_launch():
    # The last split of each tile merges and resets its ticket counter; a counter left non-zero
    # would make the next launch merge too early (or never), so run three launches in a row.
    from pagedserve.kernels import paged_attention as module

    batch = make_batch(
        [1, 1, 2],
        [70, 5, 129],
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        seed=11,
    )
    for splits in (3, 5, 3):
        _check_kernel(batch, tolerance=1e-5, num_kv_splits=splits)
        counters = module._split_counter_buffers[batch.query.device]
        assert int(counters.count_nonzero()) == 0


def test_outgrown_split_counters_stay_allocated(monkeypatch):
    # A CUDA graph captured before the buffer grew still points at the old one, so the old
    # buffer must stay allocated (never handed to anything else).
    from pagedserve.kernels import paged_attention as module

    monkeypatch.setattr(module, "_MIN_SPLIT_COUNTERS", 4)
    monkeypatch.setattr(module, "_split_counter_buffers", {})
    monkeypatch.setattr(module, "_outgrown_counter_buffers", [])
    small = make_batch([1, 1], [40, 9], num_q_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=16, seed=1)
    large = make_batch([1] * 5, [40, 9, 33, 17, 2], num_q_heads=4, num_kv_heads=2,
                       head_dim=64, block_size=16, seed=2)
    _check_kernel(small, tolerance=1e-5, num_kv_splits=2)  # 2 seqs x 2 heads: 4 counters
    first = module._split_counter_buffers[small.query.device]
    _check_kernel(large, tolerance=1e-5, num_kv_splits=2)  # 10 counters: the buffer grows
    grown = module._split_counter_buffers[large.query.device]
    assert grown.numel() == 10 and module._outgrown_counter_buffers == [first]
    _check_kernel(small, tolerance=1e-5, num_kv_splits=2)
    assert module._split_counter_buffers[small.query.device] is grown


def test_sliding_window_matches_reference():
    batch = make_batch(
        MIXED_Q_LENS,
        MIXED_SEQ_LENS,
        num_q_heads=4,
        num_kv_heads=1,
        head_dim=64,
        block_size=8,
        seed=7,
    )
    _check_kernel(batch, tolerance=1e-5, sliding_window=9)


def test_padding_rows_and_empty_sequences_are_left_alone():
    # Sequence 1 has no query tokens this step; 3 trailing query rows belong to no sequence.
    batch = make_batch(
        [1, 0, 4],
        [9, 17, 20],
        num_q_heads=2,
        num_kv_heads=1,
        head_dim=64,
        block_size=16,
        padding_tokens=3,
    )
    for splits in (1, 2):
        out = _check_kernel(batch, tolerance=1e-5, num_kv_splits=splits)
        assert out[5:].isnan().all()


def test_tens_of_thousands_of_blocks():
    # Physical block ids up to ~40k: block offsets computed in int64 throughout.
    batch = make_batch(
        [1, 3],
        [300, 77],
        num_q_heads=2,
        num_kv_heads=1,
        head_dim=64,
        block_size=8,
        dtype=torch.float16,
        num_blocks=40_000,
        seed=3,
    )
    assert int(batch.block_tables[batch.block_tables < 2**30].max()) > 30_000
    _check_kernel(batch, tolerance=2e-3)


def test_rejects_bad_arguments():
    batch = make_batch([1], [5], num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=8)
    with pytest.raises(ValueError, match="num_q_heads"):
        paged_attention(batch.query[:, :3], *batch.args()[1:], **batch.kwargs())
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(batch.query[..., :32], *batch.args()[1:], **batch.kwargs())
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention(*batch.args()[:5], batch.seq_lens[:0], **batch.kwargs())
    with pytest.raises(ValueError, match="max_seq_len"):
        paged_attention(*batch.args(), scale=1.0, max_query_len=1, max_seq_len=10**6)
    big = torch.zeros(1, 8, 1, 512)
    with pytest.raises(ValueError, match="unsupported head_dim 512"):
        paged_attention(torch.zeros(1, 1, 512), big, big, *batch.args()[3:], **batch.kwargs())


def test_launch_configuration_is_computed_once_per_step_shape():
    from pagedserve.kernels.paged_attention import select_config

    sizes = dict(num_seqs=3, num_kv_heads=2, group_size=4, head_dim=64, max_query_len=40,
                 max_seq_len=900, device=torch.device("cpu"))
    select_config.cache_clear()
    first = select_config(**sizes)
    assert select_config(**sizes) is first  # the other layers of the step
    assert select_config.cache_info().hits == 1
    decode = select_config(**{**sizes, "max_query_len": 1})
    assert decode != first and select_config.cache_info().misses == 2
    with pytest.raises(ValueError, match="num_kv_splits must be >= 1"):
        select_config(**sizes, num_kv_splits=0)
