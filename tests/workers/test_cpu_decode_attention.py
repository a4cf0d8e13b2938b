"""The CPU decode path (`DecodeKV`, `DecodeStep`) against `paged_attention_reference`, step by
step: ragged lengths, GQA and MHA, sliding windows, shared prefix blocks, lengths on block
boundaries, one sequence, bf16/fp16, NaN-poisoned unused cache slots; and that it keeps its copy
only while each step continues the previous one (same sequences, same blocks, one token more)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.kernels.paged_attention import paged_attention_reference
from pagedserve.workers.layers import cpu_attention
from pagedserve.workers.layers.attention import Attention, AttentionMetadata
from pagedserve.workers.layers.cpu_attention import DecodeKV, DecodeStep
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 - autouse fixture

pytestmark = pytest.mark.timeout(120)

_FAR_BLOCK = 2**30  # table entries past a sequence's blocks: out of range, so never read


class PagedSequences:
    """Sequences in a NaN-poisoned paged cache that grow one decode token at a time."""

    def __init__(self, lengths, *, kv_heads=2, head_dim=8, block_size=4, num_blocks=64,
                 dtype=torch.float32, shared_prefix_blocks=0, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.block_size, self.kv_heads, self.head_dim, self.dtype = (block_size, kv_heads,
                                                                     head_dim, dtype)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.key_cache = torch.full(shape, float("nan"), dtype=dtype)
        self.value_cache = torch.full(shape, float("nan"), dtype=dtype)
        self.free = torch.randperm(num_blocks, generator=self.generator).tolist()
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []
        shared: list[int] = []
        for index, length in enumerate(lengths):
            table = list(shared) if shared_prefix_blocks else []
            self.tables.append(table)
            self.lengths.append(len(table) * block_size)
            self._grow(index, length - self.lengths[index])
            if index == 0 and shared_prefix_blocks:
                shared = table[:shared_prefix_blocks]

    def _grow(self, seq: int, count: int) -> list[int]:
        slots = []
        for _ in range(count):
            position = self.lengths[seq]
            if position // self.block_size == len(self.tables[seq]):
                self.tables[seq].append(self.free.pop())
            slot = self.tables[seq][position // self.block_size] * self.block_size + \
                position % self.block_size
            self._write(slot)
            self.lengths[seq] += 1
            slots.append(slot)
        return slots

    def _write(self, slot: int) -> None:
        entry = (self.kv_heads, self.head_dim)
        block, offset = divmod(slot, self.block_size)
        self.key_cache[block, offset] = torch.randn(entry, generator=self.generator)
        self.value_cache[block, offset] = torch.randn(entry, generator=self.generator)

    def decode(self, seqs=None) -> AttentionMetadata:
        """One decode token for each of `seqs` (default all), written to the cache."""
        seqs = range(len(self.lengths)) if seqs is None else seqs
        slots = [self._grow(seq, 1)[0] for seq in seqs]
        width = max(len(self.tables[seq]) for seq in seqs) + 1
        tables = [self.tables[seq] + [_FAR_BLOCK] * (width - len(self.tables[seq]))
                  for seq in seqs]
        lengths = [self.lengths[seq] for seq in seqs]
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
            query_start_loc=torch.arange(len(slots) + 1, dtype=torch.int32),
            seq_lens=torch.tensor(lengths, dtype=torch.int32), max_query_len=1,
            max_seq_len=max(lengths))

    def copy_on_write(self, seq: int, logical_block: int) -> None:
        """Move a block of `seq` to a fresh copy, then overwrite the old one (now another
        sequence's): a copy that kept the old block's keys would now be wrong."""
        old, new = self.tables[seq][logical_block], self.free.pop()
        self.key_cache[new] = self.key_cache[old]
        self.value_cache[new] = self.value_cache[old]
        self.tables[seq][logical_block] = new
        for offset in range(self.block_size):
            self._write(old * self.block_size + offset)


def _reference(query, seqs: PagedSequences, metadata: AttentionMetadata, window=None):
    return paged_attention_reference(
        query, seqs.key_cache, seqs.value_cache, metadata.block_tables, metadata.query_start_loc,
        metadata.seq_lens, scale=seqs.head_dim**-0.5, max_query_len=1,
        max_seq_len=metadata.max_seq_len, sliding_window=window)


def _attend(kv: DecodeKV, query, seqs: PagedSequences, metadata: AttentionMetadata, window=None):
    return kv.attend(query, seqs.key_cache, seqs.value_cache,
                     metadata.cpu_decode_step(seqs.block_size), scale=seqs.head_dim**-0.5,
                     sliding_window=window)


def _query(seqs: PagedSequences, num_seqs: int, q_heads: int) -> torch.Tensor:
    return torch.randn(num_seqs, q_heads, seqs.head_dim, generator=seqs.generator).to(seqs.dtype)


def _tolerance(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize(("lengths", "q_heads", "kv_heads", "block_size", "window", "shared"), [
    ([5, 17, 1, 8, 30], 6, 2, 4, None, 0),   # ragged, GQA 3, a sequence of length 1 growing
    ([4, 8, 12], 4, 4, 4, None, 0),          # MHA, every length on a block boundary
    ([7], 2, 1, 8, None, 0),                 # one sequence, MQA
    ([9, 20, 3], 4, 2, 4, 5, 0),             # sliding window shorter than most contexts
    ([13, 13, 9], 4, 2, 4, None, 2),         # two full prefix blocks shared by all three
])
def test_decode_steps_match_the_reference(lengths, q_heads, kv_heads, block_size, window,
                                          shared):
    seqs = PagedSequences(lengths, kv_heads=kv_heads, block_size=block_size,
                          shared_prefix_blocks=shared, seed=len(lengths))
    kv = DecodeKV()
    buffers = set()
    for _ in range(2 * block_size + 1):  # crosses block boundaries for every sequence
        metadata = seqs.decode()
        query = _query(seqs, len(lengths), q_heads)
        out = _attend(kv, query, seqs, metadata, window)
        expected = _reference(query, seqs, metadata, window)
        assert out.shape == expected.shape and not out.isnan().any()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        buffers.add(kv.keys.data_ptr())
    assert len(buffers) == 1  # one gather, then appends only (the steps fit the free room)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode_is_close_to_the_reference(dtype):
    seqs = PagedSequences([6, 19, 2], kv_heads=2, dtype=dtype, seed=3)
    kv = DecodeKV()
    for _ in range(5):
        metadata = seqs.decode()
        query = _query(seqs, 3, 4)
        out = _attend(kv, query, seqs, metadata)
        expected = _reference(query, seqs, metadata)
        assert out.dtype == dtype
        assert ((out.double() - expected.double()).norm() / expected.double().norm()) < \
            _tolerance(dtype)


def test_buffer_grows_past_its_free_room_and_stays_right(monkeypatch):
    monkeypatch.setattr(cpu_attention, "_NEW_BATCH_ROOM", 2)
    monkeypatch.setattr(cpu_attention, "_GROWING_ROOM", 3)
    seqs = PagedSequences([3, 10], seed=4)
    kv = DecodeKV()
    capacities = []
    for _ in range(9):
        metadata = seqs.decode()
        query = _query(seqs, 2, 4)
        torch.testing.assert_close(_attend(kv, query, seqs, metadata),
                                   _reference(query, seqs, metadata), rtol=1e-5, atol=1e-5)
        capacities.append(kv.keys.shape[1])
    # 11 + 2 free positions, then each time it fills: the longest length + 3
    assert capacities == [13, 13, 13, 17, 17, 17, 17, 21, 21]


@pytest.mark.parametrize("change", ["finish", "reorder", "copy_on_write", "skip_a_step"])
def test_a_step_that_does_not_continue_rebuilds(change):
    seqs = PagedSequences([9, 14, 5], seed=5)
    kv = DecodeKV()
    for _ in range(2):
        metadata = seqs.decode()
        _attend(kv, _query(seqs, 3, 4), seqs, metadata)
    order = [0, 1, 2]
    if change == "finish":
        order = [0, 2]
    elif change == "reorder":
        order = [2, 0, 1]
    elif change == "copy_on_write":
        seqs.copy_on_write(1, 0)
    else:  # a step without sequence 1, which still grows: the next step is two tokens on
        seqs.decode([1])
    metadata = seqs.decode(order)
    before = kv.keys.data_ptr()
    query = _query(seqs, len(order), 4)
    out = _attend(kv, query, seqs, metadata)
    torch.testing.assert_close(out, _reference(query, seqs, metadata), rtol=1e-5, atol=1e-5)
    assert kv.keys.data_ptr() != before


def test_batches_it_does_not_serve_return_none_and_forget_the_copy(monkeypatch):
    seqs = PagedSequences([6, 11], seed=6)
    kv = DecodeKV()
    _attend(kv, _query(seqs, 2, 4), seqs, seqs.decode())
    assert kv.keys is not None
    # a prefill / mixed step (one sequence with two query tokens)
    metadata = seqs.decode()
    mixed = DecodeStep.for_batch(metadata.block_tables, torch.tensor([0, 2, 3]),
                                 metadata.seq_lens, torch.tensor([0, 1, 2]), 2,
                                 metadata.max_seq_len, seqs.block_size)
    assert mixed is None
    assert kv.attend(_query(seqs, 2, 4), seqs.key_cache, seqs.value_cache, None,
                     scale=1.0, sliding_window=None) is None
    assert kv.keys is None and kv.step is None
    # a padding token (slot -1) in the batch
    metadata = seqs.decode()
    assert DecodeStep.for_batch(metadata.block_tables, metadata.query_start_loc,
                                metadata.seq_lens, torch.tensor([-1, 5]), 1,
                                metadata.max_seq_len, seqs.block_size) is None
    # a cache of another dtype than the query (fp8 caches go to paged_attention_cpu)
    assert _attend(kv, _query(seqs, 2, 4).double(), seqs, seqs.decode()) is None
    # a copy past the memory bound
    monkeypatch.setattr(cpu_attention, "_MAX_COPY_BYTES", 1000)
    assert _attend(kv, _query(seqs, 2, 4), seqs, seqs.decode()) is None
    assert kv.keys is None


def test_attention_layer_uses_the_copy_for_decode_and_the_plan_otherwise():
    seqs = PagedSequences([5, 12], kv_heads=2, head_dim=8, seed=7)
    layer = Attention(4, 2, 8, 8**-0.5)
    for _ in range(3):
        metadata = seqs.decode()
        query = _query(seqs, 2, 4)
        # the layer writes this step's K/V itself: write back what the cache already holds
        slots = metadata.slot_mapping
        blocks, offsets = slots // seqs.block_size, slots % seqs.block_size
        k = seqs.key_cache[blocks, offsets].clone()
        v = seqs.value_cache[blocks, offsets].clone()
        out = layer(query, k, v, (seqs.key_cache, seqs.value_cache), metadata)
        torch.testing.assert_close(out, _reference(query, seqs, metadata).flatten(1),
                                   rtol=1e-5, atol=1e-5)
        assert not metadata.cpu_plans and layer.cpu_decode_kv.step is not None


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
       block_size=st.sampled_from([1, 2, 4, 16]), group=st.sampled_from([1, 2, 3]),
       kv_heads=st.integers(1, 2), window=st.one_of(st.none(), st.integers(1, 12)),
       steps=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_random_decode_runs_match_the_reference(lengths, block_size, group, kv_heads, window,
                                                steps, seed):
    seqs = PagedSequences(lengths, kv_heads=kv_heads, block_size=block_size,
                          num_blocks=sum(-(-(n + steps) // block_size) for n in lengths) + 4,
                          seed=seed)
    kv = DecodeKV()
    for _ in range(steps):
        metadata = seqs.decode()
        query = _query(seqs, len(lengths), group * kv_heads)
        torch.testing.assert_close(_attend(kv, query, seqs, metadata, window),
                                   _reference(query, seqs, metadata, window),
                                   rtol=1e-5, atol=1e-5)
