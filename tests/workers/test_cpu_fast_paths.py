"""The CPU-only fast paths of the layers: oneDNN-prepacked linear weights, the attention layer's
shared per-step plan and slot-row K/V write, and the allocation-saving SiluAndMul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels.activation import silu_and_mul_reference
from pagedserve.kernels.cache_ops import write_kv_reference
from pagedserve.kernels.paged_attention import paged_attention_reference
from pagedserve.workers.layers.activation import SiluAndMul
from pagedserve.workers.layers.attention import Attention, AttentionMetadata
from pagedserve.workers.layers.embedding import ParallelLMHead
from pagedserve.workers.layers.linear import (
    CPU_PACKED_MAX_ROWS,
    CPU_PACKED_MIN_ROWS,
    MergedColumnParallelLinear,
    RowParallelLinear,
    cpu_packing_available,
    pack_weights_for_cpu,
    packed_weight_for,
)
from tests.kernels._batches import make_batch, relative_error

needs_onednn = pytest.mark.skipif(not cpu_packing_available(), reason="no oneDNN in this torch")


@pytest.fixture(autouse=True)
def pack_small_weights(monkeypatch):
    from pagedserve.workers.layers import linear

    monkeypatch.setattr(linear, "CPU_PACKED_MIN_ELEMENTS", 1000)


def _layers(bias: bool) -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    layers = torch.nn.ModuleDict({
        "column": MergedColumnParallelLinear(48, [40, 24], bias=bias),
        "row": RowParallelLinear(48, 40, bias=bias),
        "head": ParallelLMHead(300, 48),
        "small": RowParallelLinear(8, 8),  # under the size threshold: never packed
    })
    for param in layers.parameters():
        param.data.normal_()
    return layers


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(bias):
    layers = _layers(bias)
    small = layers.pop("small")
    row_counts = (1, 2, CPU_PACKED_MIN_ROWS, 16, CPU_PACKED_MAX_ROWS, CPU_PACKED_MAX_ROWS + 1)
    inputs = {rows: torch.randn(rows, 48) for rows in row_counts}
    expected = {(name, rows): F.linear(x, layer.weight, getattr(layer, "bias", None))
                for name, layer in layers.items() for rows, x in inputs.items()}
    layers["small"] = small
    assert pack_weights_for_cpu(layers) == sum(
        layer.weight.numel() * 4 for name, layer in layers.items() if name != "small")
    assert packed_weight_for(small) is None
    del layers["small"]
    for name, layer in layers.items():
        assert packed_weight_for(layer) is not None
        for rows, x in inputs.items():
            got = layer(x)
            if not CPU_PACKED_MIN_ROWS <= rows <= CPU_PACKED_MAX_ROWS:  # F.linear itself
                assert torch.equal(got, expected[name, rows])
            else:
                assert relative_error(got, expected[name, rows]) < 1e-6


@needs_onednn
def test_packed_copy_is_dropped_when_the_weight_is_replaced_or_converted():
    layers = _layers(bias=False)
    pack_weights_for_cpu(layers)
    column, row = layers["column"], layers["row"]
    column.weight = torch.nn.Parameter(torch.zeros_like(column.weight), requires_grad=False)
    assert packed_weight_for(column) is None
    assert torch.equal(column(torch.randn(8, 48)), torch.zeros(8, 64))
    row.to(torch.float64)  # same Parameter object, new dtype
    assert packed_weight_for(row) is None
    x = torch.randn(8, 48, dtype=torch.float64)
    assert torch.equal(row(x), F.linear(x, row.weight))


def test_fp16_weights_are_not_packed():
    layers = _layers(bias=False).to(torch.float16)
    assert pack_weights_for_cpu(layers) == 0
    assert all(packed_weight_for(layer) is None for layer in layers.values())


@needs_onednn
def test_packed_bf16_linear_matches_f_linear():
    # bf16 packing needs AVX-512 or AVX-NE-CONVERT: on a CPU without them (an AVX2-only EPYC
    # runs CI at times) the layers stay on F.linear instead of failing at load.
    layers = _layers(bias=True).to(torch.bfloat16)
    del layers["small"]
    x = torch.randn(16, 48).to(torch.bfloat16)
    expected = {name: F.linear(x, layer.weight, getattr(layer, "bias", None))
                for name, layer in layers.items()}
    supported = cpu_packing_available(torch.bfloat16)
    assert (pack_weights_for_cpu(layers) > 0) == supported
    for name, layer in layers.items():
        assert (packed_weight_for(layer) is not None) == supported
        assert relative_error(layer(x), expected[name]) < 1e-2


def test_packing_probe_refuses_dtypes_onednn_does_not_pack():
    assert not cpu_packing_available(torch.float16)
    assert not cpu_packing_available(torch.int8)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_layer_writes_and_attends_like_the_references(window):
    # Two layers of one step: K/V written through slot rows (padding slot -1 skipped), one
    # shared plan per (block size, window), outputs equal to the references'.
    batch = make_batch([1, 6, 1, 0], [9, 20, 1, 4], num_q_heads=4, num_kv_heads=2,
                       head_dim=16, block_size=4, padding_tokens=2, seed=2)
    num_tokens = batch.query.shape[0]
    starts, lengths = batch.query_start_loc.tolist(), batch.seq_lens.tolist()
    tables = batch.block_tables.tolist()
    slots = []
    for seq, seq_len in enumerate(lengths):
        for pos in range(seq_len - (starts[seq + 1] - starts[seq]), seq_len):
            slots.append(tables[seq][pos // 4] * 4 + pos % 4)
    slots += [-1] * (num_tokens - len(slots))
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=batch.block_tables,
        query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
        max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len)
    layer = Attention(4, 2, 16, batch.scale, sliding_window=window)
    for seed in range(2):
        generator = torch.Generator().manual_seed(seed)
        k = torch.randn(num_tokens, 2, 16, generator=generator)
        v = torch.randn(num_tokens, 2, 16, generator=generator)
        expected_keys, expected_values = batch.key_cache.clone(), batch.value_cache.clone()
        write_kv_reference(k, v, expected_keys, expected_values, metadata.slot_mapping)
        out = layer(batch.query, k, v, (batch.key_cache, batch.value_cache), metadata)
        assert torch.equal(batch.key_cache.nan_to_num(7.0), expected_keys.nan_to_num(7.0))
        assert torch.equal(batch.value_cache.nan_to_num(7.0), expected_values.nan_to_num(7.0))
        expected = paged_attention_reference(
            batch.query, expected_keys, expected_values, batch.block_tables,
            batch.query_start_loc, batch.seq_lens, scale=batch.scale,
            max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len,
            sliding_window=window)
        num_valid = int(batch.query_start_loc[-1])
        assert relative_error(out[:num_valid], expected[:num_valid].flatten(1)) < 1e-5
    assert list(metadata.cpu_plans) == [(4, window)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_equals_the_reference(dtype):
    x = torch.randn(7, 2 * 33).to(dtype)
    assert torch.equal(SiluAndMul()(x), silu_and_mul_reference(x))
    with pytest.raises(ValueError):
        SiluAndMul()(torch.randn(3, 5))
