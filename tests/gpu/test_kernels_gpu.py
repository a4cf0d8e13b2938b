"""Kernel sweeps on a CUDA device (skipped without one): bf16, realistic head shapes, int64
offsets past 2**31 elements, CUDA-graph capture of decode, GPU<->CPU swaps."""

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
from pagedserve.kernels.paged_attention import paged_attention, paged_attention_reference
from tests.kernels._batches import make_batch, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _check(batch, tolerance, **options):
    out = torch.full_like(batch.query, float("nan"))
    paged_attention(*batch.args(), **batch.kwargs(), out=out, **options)
    options.pop("num_kv_splits", None)
    expected = paged_attention_reference(*batch.args(), **batch.kwargs(), **options)
    valid = int(batch.query_start_loc[-1])
    assert not out[:valid].isnan().any()
    assert relative_error(out[:valid], expected[:valid]) < tolerance


@pytest.mark.parametrize(
    ("dtype", "num_q_heads", "num_kv_heads", "head_dim", "block_size"),
    [
        (torch.bfloat16, 32, 8, 128, 16),  # Llama-3-8B
        (torch.bfloat16, 32, 4, 128, 16),  # Llama-3-70B, TP=2 shard
        (torch.bfloat16, 32, 8, 128, 8),
        (torch.bfloat16, 32, 8, 128, 32),
        (torch.bfloat16, 32, 8, 128, 128),
        (torch.bfloat16, 8, 8, 64, 16),
        (torch.bfloat16, 10, 2, 80, 16),
        (torch.bfloat16, 12, 4, 96, 32),
        (torch.bfloat16, 8, 2, 256, 16),
        (torch.float16, 40, 8, 128, 16),
        (torch.float32, 16, 4, 64, 16),
    ],
)
def test_mixed_batches(dtype, num_q_heads, num_kv_heads, head_dim, block_size):
    q_lens = [1, 1, 300, 1, 77, 1, 129]
    seq_lens = [1, 2000, 300, 517, 1100, 4099, 129]
    batch = make_batch(
        q_lens,
        seq_lens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device="cuda",
    )
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    _check(batch, tolerance)
    _check(batch, tolerance, sliding_window=200)


@pytest.mark.parametrize("num_kv_splits", [None, 1, 2, 7, 16])
def test_decode_split_kv(num_kv_splits):
    batch = make_batch(
        [1] * 5,
        [17, 4096, 1, 900, 3000],
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        device="cuda",
    )
    _check(batch, 1e-2, num_kv_splits=num_kv_splits)


def test_offsets_beyond_int32_elements():
    # 140k blocks x 16 x 8 x 128 = 2.3e9 elements per cache: element offsets overflow int32.
    num_blocks, block_size, heads, dim = 140_000, 16, 8, 128
    key_cache = torch.full(
        (num_blocks, block_size, heads, dim), float("nan"), device="cuda", dtype=torch.bfloat16
    )
    value_cache = torch.full_like(key_cache, float("nan"))
    seq_lens = [100, 37]
    blocks = torch.tensor(
        [
            [139_999, 131_072, 135_000, 138_001, 136_500, 137_777, 134_001],
            [139_500, 133_333, 132_111, 0, 0, 0, 0],
        ],
        dtype=torch.int32,
        device="cuda",
    )
    for seq, seq_len in enumerate(seq_lens):
        pos = torch.arange(seq_len, device="cuda")
        ids = blocks[seq].long()[pos // block_size]
        for cache in (key_cache, value_cache):
            cache[ids, pos % block_size] = torch.randn(
                seq_len, heads, dim, device="cuda"
            ).bfloat16()
    query = torch.randn(1 + 37, 32, dim, device="cuda").bfloat16()
    args = (
        query,
        key_cache,
        value_cache,
        blocks,
        torch.tensor([0, 1, 38], dtype=torch.int32, device="cuda"),
        torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
    )
    kwargs = dict(scale=dim**-0.5, max_query_len=37, max_seq_len=100)
    for splits in (1, 3):
        out = paged_attention(*args, **kwargs, num_kv_splits=splits)
        expected = paged_attention_reference(*args, **kwargs)
        assert relative_error(out, expected) < 1e-2


def test_decode_is_cuda_graph_capturable():
    batch = make_batch(
        [1] * 8,
        [1000, 20, 4000, 77, 1, 513, 2048, 9],
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        device="cuda",
    )
    out = torch.empty_like(batch.query)
    kwargs = dict(scale=batch.scale, max_query_len=1, max_seq_len=4000, num_kv_splits=4)
    paged_attention(*batch.args(), **kwargs, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(*batch.args(), **kwargs, out=out)
    # New inputs in place, shorter contexts: the replay must follow them.
    batch.query.copy_(torch.randn_like(batch.query))
    batch.seq_lens.sub_(torch.tensor([1, 1, 5, 0, 0, 1, 2, 1], device="cuda", dtype=torch.int32))
    for _ in range(3):  # each replay must find the split counters zeroed by the previous one
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = paged_attention_reference(*batch.args(), **batch.kwargs())
        assert relative_error(out, expected) < 1e-2


def test_split_merge_is_race_free_and_deterministic():
    # Whichever split finishes last merges, always in split order: the result must be bitwise
    # identical on every launch; a merge that read a partial before it was written would not be.
    batch = make_batch(
        [1] * 64,
        [4096 - 37 * i for i in range(64)],
        num_q_heads=32,
        num_kv_heads=4,
        head_dim=128,
        block_size=16,
        dtype=torch.bfloat16,
        device="cuda",
    )
    kwargs = dict(scale=batch.scale, max_query_len=1, max_seq_len=4096, num_kv_splits=16)
    # Two query sets in turn: a merge that read a partial before it was written would find the
    # other set's stale partial there, not an identical one.
    queries = [batch.query, torch.randn_like(batch.query)]
    args = list(batch.args())
    expected = []
    for query in queries:
        args[0] = query
        expected.append(paged_attention(*args, **kwargs).clone())
        reference = paged_attention_reference(*args, **batch.kwargs())
        assert relative_error(expected[-1], reference) < 1e-2
    for launch in range(50):
        args[0] = queries[launch % 2]
        out = torch.full_like(expected[0], float("nan"))
        paged_attention(*args, **kwargs, out=out)
        assert torch.equal(out, expected[launch % 2])


def test_write_kv_and_copy_blocks_bf16():
    num_blocks, block_size, heads, dim, tokens = 300, 16, 8, 128, 1000
    qkv = torch.randn(tokens, 48, dim, device="cuda").bfloat16()
    key, value = qkv[:, 32:40], qkv[:, 40:]
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
    slots[::7] = -1
    caches = [
        torch.randn(num_blocks, block_size, heads, dim, device="cuda").bfloat16() for _ in range(8)
    ]
    expected = [c.clone() for c in caches]
    write_kv(key, value, caches[0], caches[1], slots)
    write_kv_reference(key, value, expected[0], expected[1], slots)
    mapping = torch.tensor([[1, 2], [5, 299], [100, 0]], device="cuda")
    copy_blocks(caches[:4], caches[4:], mapping)
    copy_blocks_reference(expected[:4], expected[4:], mapping)
    for actual, wanted in zip(caches, expected, strict=True):
        assert torch.equal(actual, wanted)


@pytest.mark.parametrize("staging_blocks", [None, 2])
@pytest.mark.parametrize("direction", ["gpu_to_cpu", "cpu_to_gpu", "gpu_to_gpu"])
def test_swap_blocks(direction, staging_blocks):
    # Three layers' K and V in one call, as the model runner swaps them.
    shape = (64, 16, 8, 128)
    gpu = [torch.randn(shape, device="cuda").bfloat16() for _ in range(6)]
    cpu = [torch.randn(shape).bfloat16().pin_memory() for _ in range(6)]
    src, dst = {
        "gpu_to_cpu": (gpu, cpu),
        "cpu_to_gpu": (cpu, gpu),
        "gpu_to_gpu": (gpu, [cache.clone() for cache in gpu]),
    }[direction]
    mapping = torch.tensor([[3, 60], [10, 0], [63, 5]])
    expected = [cache.clone() for cache in dst]
    swap_blocks_reference(src, expected, mapping)
    if staging_blocks is None:
        swap_blocks(src, dst, mapping)
    else:  # chunks of 2 blocks: the 3 pairs go in two transfers
        block_bytes = len(src) * src[0][0].numel() * src[0].element_size()
        swap_blocks(src, dst, mapping, max_staging_bytes=staging_blocks * block_bytes)
    torch.cuda.synchronize()
    for actual, wanted in zip(dst, expected, strict=True):
        assert torch.equal(actual.cpu(), wanted.cpu())
