"""FP8 (e4m3) KV cache: the quantization contract, the KV write, paged attention (Triton kernel
interpreted on CPU, the torch reference and the CPU path) against a float64 oracle fed with the
fp8-rounded K/V, and block copies/swaps that must move the bytes unchanged.

The interpreter's fp32 -> fp8 cast rounds wrongly when rounding carries into the exponent (it
turns 31.35 into 16), so the interpreted write kernel is fed values that are exact in e4m3 after
the division by a power-of-two scale (and values past the range, to test saturation); rounding
itself is tested on the torch reference, and byte for byte on a GPU in tests/gpu.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.kernels.block_ops import (
    copy_blocks,
    copy_blocks_reference,
    swap_blocks,
    swap_blocks_reference,
)
from pagedserve.kernels.cache_ops import write_kv, write_kv_reference
from pagedserve.kernels.kv_quant import (
    FP8_KV_DTYPE,
    calibrate_kv_scales_,
    dequantize_kv,
    quantize_kv,
)
from pagedserve.kernels.paged_attention import (
    AttentionConfig,
    paged_attention,
    paged_attention_cpu,
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
from tests.kernels._fp8 import quantize_batch

F8 = FP8_KV_DTYPE


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8)


def _scale(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)


def test_quantize_saturates_and_rounds_to_nearest_even():
    x = torch.tensor([1e6, -1e6, 449.0, 1.0625, 1.1875, 0.3, -0.0, float("nan"), 2.0**-10])
    got = quantize_kv(x, _scale(1.0)).float()
    # 1.0625 and 1.1875 are ties between e4m3 neighbours (spacing 0.125): even mantissas win;
    # 2**-10 is half the smallest subnormal (2**-9) and ties to 0.
    expected = torch.tensor([448.0, -448.0, 448.0, 1.0, 1.25, 0.3125, 0.0, float("nan"), 0.0])
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
    # The scale divides first: 3 / 0.5 = 6, 1000 / 0.5 saturates.
    assert quantize_kv(torch.tensor([3.0, 1000.0]), _scale(0.5)).float().tolist() == [6.0, 448.0]


_FINITE_CODES = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
_FINITE_VALUES = _FINITE_CODES.view(F8).double()


def _nearest_e4m3(value: float) -> float:
    """Brute force over every finite e4m3 value: the nearest, ties to the even code."""
    distance = (_FINITE_VALUES - value).abs()
    candidates = (distance == distance.min()).nonzero().flatten()
    codes = _FINITE_CODES[candidates].int()
    return float(_FINITE_VALUES[candidates[(codes & 1) == 0][0]] if len(candidates) > 1
                 else _FINITE_VALUES[candidates[0]])


@settings(max_examples=300, deadline=None)
@given(st.floats(-1e5, 1e5, allow_nan=False, width=32),
       st.sampled_from([1.0, 0.5, 0.0173, 3.0, 2.0**-7]))
def test_quantize_is_the_nearest_e4m3_of_the_saturated_quotient(x, scale):
    scale_tensor = _scale(scale)
    quotient = (torch.tensor([x], dtype=torch.float32) / scale_tensor).item()
    expected = _nearest_e4m3(max(-448.0, min(448.0, quotient)))
    quantized = quantize_kv(torch.tensor([x]), scale_tensor)
    assert quantized.double().item() == expected or (expected == 0.0 == quantized.item())
    # Idempotent: a dequantized value quantizes back to the same byte.
    again = quantize_kv(dequantize_kv(quantized, scale_tensor, torch.float32), scale_tensor)
    assert torch.equal(again.view(torch.uint8), quantized.view(torch.uint8))


def test_every_finite_e4m3_value_round_trips_exactly():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(F8)
    finite = ~values.float().isnan()
    assert int(finite.sum()) == 254  # 0x7F and 0xFF are e4m3fn's only NaNs
    scale = _scale(0.0375)
    dequantized = dequantize_kv(values[finite], scale, torch.float32)
    assert torch.equal(dequantized, values[finite].float() * scale)
    assert torch.equal(_bits(quantize_kv(dequantized, scale)), codes[finite])


def test_calibrated_scales_map_the_largest_magnitude_to_448():
    key = torch.tensor([[[0.5, -8.96]], [[float("inf"), 1.0]]])
    value = torch.zeros(2, 1, 2)
    k_scale, v_scale = _scale(1.0), _scale(1.0)
    assert not calibrate_kv_scales_(key[:0], value[:0], k_scale, v_scale)  # no tokens: no-op
    assert (k_scale.item(), v_scale.item()) == (1.0, 1.0)
    assert calibrate_kv_scales_(key, value, k_scale, v_scale)
    assert k_scale.item() == pytest.approx(8.96 / 448, rel=1e-7)  # the inf is ignored
    assert 0 < v_scale.item() <= 1e-12  # an all-zero layer gets a tiny scale, never 0
    assert quantize_kv(key[:1], k_scale).float().abs().max().item() == 448.0


@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size", "dtype"),
    [(2, 64, 16, torch.float32), (1, 128, 8, torch.float16), (3, 80, 32, torch.bfloat16)],
)
def test_write_kv_kernel_stores_the_reference_bytes(num_kv_heads, head_dim, block_size, dtype):
    num_tokens, num_q_heads, num_blocks = 11, 2 * num_kv_heads, 9
    generator = torch.Generator().manual_seed(head_dim)
    k_scale, v_scale = _scale(0.25), _scale(4.0)
    representable = (torch.randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim,
                                 generator=generator) * 60).clamp(-448, 448).to(F8).float()
    qkv = torch.cat([representable[:, :num_q_heads + num_kv_heads] * 0.25,
                     representable[:, num_q_heads + num_kv_heads:] * 4.0], dim=1).to(dtype)
    qkv[0, num_q_heads, :3] = torch.tensor([1e4, -1e4, 120.0])  # past 448 * 0.25: saturate
    key = qkv[:, num_q_heads : num_q_heads + num_kv_heads]  # strided views of a fused qkv
    value = qkv[:, num_q_heads + num_kv_heads :]
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slots[[2, 7]] = -1
    # Poisoned with NaN bytes, as views of one [num_blocks, 2, ...] allocation.
    caches = torch.full((num_blocks, 2, block_size, num_kv_heads, head_dim), float("nan")).to(F8)
    expected = caches.clone()
    write_kv_reference(key, value, expected[:, 0], expected[:, 1], slots, k_scale, v_scale)
    write_kv(key, value, caches[:, 0], caches[:, 1], slots, k_scale, v_scale)
    assert torch.equal(_bits(caches), _bits(expected))
    written_keys = caches[:, 0].flatten(0, 1)[slots[0]].float()
    assert written_keys[0, :3].tolist() == [448.0, -448.0, 448.0]
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert caches[:, 1].flatten(0, 1)[untouched].float().isnan().all()
    # The stored values are the inputs over their scales (exact by construction, unsaturated).
    stored = caches[:, 1].flatten(0, 1)[slots[1]].float() * 4.0
    assert torch.equal(stored, value[1].float())


def test_write_kv_reference_rounds_arbitrary_values_within_half_an_e4m3_step():
    key = torch.randn(64, 2, 32) * 3
    cache = torch.zeros(8, 8, 2, 32).to(F8)
    scale = _scale(3 * 4.5 / 448)
    write_kv_reference(key, key, cache, cache.clone(), torch.arange(64), scale, scale)
    stored = dequantize_kv(cache.flatten(0, 1), scale, torch.float32)
    assert torch.equal(_bits(cache.flatten(0, 1)), _bits(quantize_kv(key, scale)))
    inside = key.abs() < 448 * scale
    # e4m3 keeps 3 mantissa bits: within 2**-4 relative for normal numbers, plus the subnormals'
    # absolute step (2**-10 of the scale) near zero.
    bound = key.abs() * 2**-4 + scale * 2**-10
    assert ((stored - key).abs() <= bound)[inside].all()


def test_fp8_cache_arguments_are_checked():
    key = torch.zeros(4, 1, 64)
    cache = torch.zeros(2, 8, 1, 64).to(F8)
    slots = torch.arange(4)
    with pytest.raises(TypeError, match="k_scale"):
        write_kv(key, key, cache, cache, slots)
    with pytest.raises(ValueError, match="v_scale must be a float32"):
        write_kv(key, key, cache, cache, slots, _scale(1.0), torch.ones(1, dtype=torch.float64))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        write_kv_reference(key.to(F8), key.to(F8), cache, cache, slots, _scale(1.0), _scale(1.0))
    batch = make_batch([1], [5], num_q_heads=2, num_kv_heads=1, head_dim=64, block_size=8)
    fp8 = quantize_batch(batch)
    with pytest.raises(TypeError, match="k_scale"):
        paged_attention(*fp8.args(), **batch.kwargs())
    with pytest.raises(TypeError, match="float8_e4m3fn"):  # one fp8 cache, one not
        paged_attention_reference(batch.query, fp8.batch.key_cache, batch.value_cache,
                                  *batch.args()[3:], **fp8.kwargs())


def _check_all_paths(fp8, *, tolerance, sliding_window=None, **kernel_options):
    """Kernel (poisoned output), reference and CPU path against the float64 oracle on the
    fp8-rounded K/V; returns the kernel output."""
    batch = fp8.batch
    oracle = naive_dense_attention(batch, sliding_window)
    valid = int(batch.query_start_loc[-1])
    out = torch.full_like(batch.query, float("nan"))
    assert paged_attention(*fp8.args(), **fp8.kwargs(), out=out, sliding_window=sliding_window,
                           **kernel_options) is out
    assert not out[:valid].isnan().any(), "kernel left output rows unwritten"
    assert relative_error(out[:valid], oracle[:valid]) < tolerance
    for path in (paged_attention_reference, paged_attention_cpu):
        result = path(*fp8.args(), **fp8.kwargs(), sliding_window=sliding_window)
        assert relative_error(result[:valid], oracle[:valid]) < tolerance, path.__name__
    return out


@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim", "block_size", "dtype"),
    KERNEL_HEAD_SHAPES,
)
def test_mixed_batch_matches_the_fp8_rounded_oracle(
    num_q_heads, num_kv_heads, head_dim, block_size, dtype
):
    batch = make_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=num_q_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                       dtype=dtype, seed=head_dim + block_size)
    fp8 = quantize_batch(batch, key_range=0.7)  # the largest keys saturate
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    out = _check_all_paths(fp8, tolerance=tolerance)
    # Not vacuous: the fp8 rounding and saturation move the result far past that tolerance.
    unquantized = naive_dense_attention(batch)
    valid = int(batch.query_start_loc[-1])
    assert relative_error(out[:valid], unquantized[:valid]) > 4 * tolerance


def test_cpu_paths_with_bf16_queries_over_fp8():
    # (The interpreter cannot run bf16 tiles, fp8 or not; tests/gpu covers the bf16 kernel.)
    batch = make_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_q_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=16, dtype=torch.bfloat16, seed=11)
    fp8 = quantize_batch(batch, key_range=0.7)
    oracle = naive_dense_attention(fp8.batch)
    for path, tolerance in ((paged_attention_reference, 1e-2), (paged_attention_cpu, 1.5e-2)):
        result = path(*fp8.args(), **fp8.kwargs())
        assert result.dtype == torch.bfloat16
        assert relative_error(result, oracle) < tolerance, path.__name__


@pytest.mark.parametrize(
    ("block_size", "block_n", "num_kv_splits"),
    [(128, 16, 1), (8, 64, 1), (32, 32, 3), (16, 128, 2)],
    ids=["tile-inside-block", "tile-spans-blocks", "tile-equals-block", "split-wide-tile"],
)
def test_key_tiles_and_splits_over_fp8_blocks(block_size, block_n, num_kv_splits):
    batch = make_batch([1, 5, 1], [300, 141, 7], num_q_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=block_size, seed=block_size + block_n)
    config = AttentionConfig(block_q=8, block_n=block_n, num_kv_splits=num_kv_splits,
                             num_warps=4, num_stages=2)
    _check_all_paths(quantize_batch(batch), tolerance=1e-5, config=config)


@pytest.mark.parametrize(
    ("q_lens", "seq_lens", "num_kv_splits", "sliding_window"),
    [
        ([1, 1, 1], [70, 5, 129], 4, None),  # decode: some splits see no keys at all
        ([1, 6, 1], [70, 40, 3], 3, None),  # split-KV with a prefill chunk in the batch
        ([1, 1], [90, 33], 2, 20),  # split-KV and sliding window
        (MIXED_Q_LENS, MIXED_SEQ_LENS, 1, 9),  # sliding window over prefill and decode
    ],
)
def test_split_kv_and_sliding_window_over_fp8(q_lens, seq_lens, num_kv_splits, sliding_window):
    batch = make_batch(q_lens, seq_lens, num_q_heads=4, num_kv_heads=2, head_dim=64,
                       block_size=16, seed=num_kv_splits)
    _check_all_paths(quantize_batch(batch, value_range=0.8), tolerance=1e-5,
                     num_kv_splits=num_kv_splits, sliding_window=sliding_window)


def test_fp8_padding_rows_and_empty_sequences_are_left_alone():
    batch = make_batch([1, 0, 4], [9, 17, 20], num_q_heads=2, num_kv_heads=1, head_dim=64,
                       block_size=16, padding_tokens=3)
    fp8 = quantize_batch(batch)
    for splits in (1, 2):
        out = _check_all_paths(fp8, tolerance=1e-5, num_kv_splits=splits)
        assert out[5:].isnan().all()


def test_fp8_tens_of_thousands_of_blocks():
    batch = make_batch([1, 3], [300, 77], num_q_heads=2, num_kv_heads=1, head_dim=64,
                       block_size=8, dtype=torch.float16, num_blocks=40_000, seed=3)
    assert int(batch.block_tables[batch.block_tables < 2**30].max()) > 30_000
    _check_all_paths(quantize_batch(batch), tolerance=2e-3)


def _all_byte_values(shape) -> torch.Tensor:
    """A float8 tensor holding every byte value (NaNs included) in turn."""
    count = torch.Size(shape).numel()
    return (torch.arange(count) % 256).to(torch.uint8).view(F8).reshape(shape)


def test_copy_blocks_moves_fp8_bytes_unchanged():
    shape = (12, 8, 2, 64)
    keys = [_all_byte_values(shape) for _ in range(3)]
    values = [_all_byte_values(shape).flip(0) for _ in range(3)]
    expected_keys, expected_values = [c.clone() for c in keys], [c.clone() for c in values]
    mapping = torch.tensor([[0, 5], [3, 11], [3, 7], [9, 1]])
    copy_blocks_reference(expected_keys, expected_values, mapping)
    copy_blocks(keys, values, mapping)
    for actual, expected in zip(keys + values, expected_keys + expected_values, strict=True):
        assert torch.equal(_bits(actual), _bits(expected))
    assert torch.equal(_bits(keys[2][11]), _bits(keys[2][3]))
    assert torch.equal(_bits(values[0][1]), _bits(_all_byte_values(shape).flip(0)[9]))


def test_swap_blocks_moves_fp8_bytes_unchanged():
    sources = [_all_byte_values((10, 16, 2, 64)) for _ in range(4)]
    targets = [torch.zeros(7, 16, 2, 64).to(F8) for _ in range(4)]
    expected = [target.clone() for target in targets]
    mapping = torch.tensor([[9, 0], [2, 6], [4, 3]])
    swap_blocks_reference(sources, expected, mapping)
    swap_blocks(sources, targets, mapping)
    for source, target, wanted in zip(sources, targets, expected, strict=True):
        assert torch.equal(_bits(target), _bits(wanted))
        assert torch.equal(_bits(target[6]), _bits(source[2]))
        assert not _bits(target[1]).any()  # untouched block
