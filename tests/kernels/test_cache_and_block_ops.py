"""write_kv, copy_blocks and swap_blocks (Triton kernels interpreted on CPU) against their
torch references."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.block_ops import (
    copy_blocks,
    copy_blocks_reference,
    swap_blocks,
    swap_blocks_reference,
)
from pagedserve.kernels.cache_ops import write_kv, write_kv_reference


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size", "dtype"),
    [(2, 64, 16, torch.float32), (1, 128, 8, torch.float16), (3, 80, 32, torch.float32)],
)
def test_write_kv_matches_reference_from_fused_qkv_views(num_kv_heads, head_dim, block_size, dtype):
    num_tokens, num_q_heads, num_blocks = 11, 2 * num_kv_heads, 9
    qkv = torch.randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim).to(dtype)
    key = qkv[:, num_q_heads : num_q_heads + num_kv_heads]  # strided views, as from a fused qkv
    value = qkv[:, num_q_heads + num_kv_heads :]
    assert not key.is_contiguous()
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[2, 7]] = -1  # padding tokens
    # The caches are views of one [num_blocks, 2, ...] allocation: non-contiguous block stride.
    caches = _poisoned((num_blocks, 2, block_size, num_kv_heads, head_dim), dtype)
    key_cache, value_cache = caches[:, 0], caches[:, 1]
    expected = caches.clone()
    write_kv_reference(key, value, expected[:, 0], expected[:, 1], slots)
    write_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(caches.nan_to_num(7.0), expected.nan_to_num(7.0))
    written = slots[slots >= 0]
    flat_keys = key_cache.flatten(0, 1)
    assert torch.equal(flat_keys[written], key[slots >= 0])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[written] = False
    assert flat_keys[untouched].isnan().all()


def test_write_kv_rejects_mismatched_slot_mapping():
    key = torch.zeros(4, 1, 64)
    cache = torch.zeros(2, 8, 1, 64)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(key, key, cache, cache, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="slot_mapping"):
        write_kv(key, key, cache, cache, torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_copy_blocks_matches_reference_across_layers(dtype):
    num_layers, shape = 3, (12, 8, 2, 64)
    key_caches = [torch.randn(shape).to(dtype) for _ in range(num_layers)]
    value_caches = [torch.randn(shape).to(dtype) for _ in range(num_layers)]
    expected_keys = [c.clone() for c in key_caches]
    expected_values = [c.clone() for c in value_caches]
    mapping = torch.tensor([[0, 5], [3, 11], [3, 7], [9, 1]], dtype=torch.int64)
    copy_blocks_reference(expected_keys, expected_values, mapping)
    copy_blocks(key_caches, value_caches, mapping)
    for actual, expected in zip(
        key_caches + value_caches, expected_keys + expected_values, strict=True
    ):
        assert torch.equal(actual, expected)
    assert torch.equal(key_caches[1][11], key_caches[1][3])


def test_copy_blocks_on_views_of_one_allocation():
    # All layers' K and V in one [layers, 2, blocks, ...] tensor, as a KV pool may allocate them.
    pool = torch.randn(2, 2, 6, 16, 1, 64)
    expected = pool.clone()
    mapping = torch.tensor([[1, 4], [2, 0]])
    copy_blocks_reference(list(expected[:, 0]), list(expected[:, 1]), mapping)
    copy_blocks(list(pool[:, 0]), list(pool[:, 1]), mapping)
    assert torch.equal(pool, expected)


def test_copy_blocks_rejects_mismatched_layers():
    with pytest.raises(ValueError, match="value_caches"):
        copy_blocks([torch.zeros(2, 8, 1, 64)], [torch.zeros(3, 8, 1, 64)], torch.zeros(0, 2))


def test_swap_blocks_cpu_to_cpu_matches_reference():
    sources = [torch.randn(10, 16, 2, 64) for _ in range(4)]
    targets = [torch.randn(7, 16, 2, 64) for _ in range(4)]
    expected = [target.clone() for target in targets]
    mapping = torch.tensor([[9, 0], [2, 6], [4, 3]])
    swap_blocks_reference(sources, expected, mapping)
    swap_blocks(sources, targets, mapping)
    for source, target, wanted in zip(sources, targets, expected, strict=True):
        assert torch.equal(target, wanted)
        assert torch.equal(target[6], source[2])
        assert torch.equal(target[1], wanted[1])  # untouched block


def test_swap_blocks_rejects_unpaired_or_mismatched_tensors():
    blocks = [torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)]
    mapping = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="must pair up"):
        swap_blocks(blocks, blocks[:1], mapping)
    with pytest.raises(ValueError, match=r"dst_caches\[1\] differs"):
        swap_blocks(blocks, [blocks[0], torch.zeros(4, 8, 2, 64)], mapping)
    with pytest.raises(ValueError, match="must match in dtype and block shape"):
        swap_blocks(blocks, [torch.zeros(4, 16, 2, 64, dtype=torch.float16)] * 2, mapping)
