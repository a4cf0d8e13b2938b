"""rms_norm, apply_rotary and silu_and_mul (Triton kernels interpreted on CPU) against their torch
references, which are themselves checked against the torch modules they replace.

The references round exactly where the torch modules do, so the kernels match them bit for bit
except where the summation order differs (rms_norm's mean of squares) or the libm differs
(silu's exp): there, rarely, results differ by an ulp or two of the output dtype.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.activation import silu_and_mul, silu_and_mul_reference
from pagedserve.kernels.rms_norm import rms_norm, rms_norm_reference
from pagedserve.kernels.rotary import apply_rotary, apply_rotary_reference
from pagedserve.workers.layers.activation import SiluAndMul
from pagedserve.workers.layers.norm import RMSNorm
from pagedserve.workers.layers.rotary import RotaryEmbedding

MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def assert_nearly_equal(actual, expected, min_exact=0.99):
    """Nearly all elements identical, the rest within two ulps of the dtype of ``expected``.

    Two because both ops round an intermediate (the normed row, silu(gate)) to the dtype and
    then multiply it: an intermediate one ulp off becomes a relative 2**-mantissa before the
    final rounding adds up to half an ulp more.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any()
    a, e = actual.double(), expected.double()
    bits = MANTISSA_BITS[expected.dtype]
    tolerance = 2.0 ** (1 - bits) * e.abs() + 2.0**-24
    assert ((a - e).abs() <= tolerance).all(), f"max diff {(a - e).abs().max().item()}"
    assert (a == e).double().mean().item() >= min_exact


def assert_matches(actual, expected):
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    else:
        assert_nearly_equal(actual, expected)


def _nan_like(tensor, dtype=None):
    return torch.full_like(tensor, float("nan"), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_reference_is_the_torch_module(dtype):
    torch.manual_seed(0)
    module = RMSNorm(96, eps=1e-5).to(dtype)
    module.weight.data.normal_(1.0, 0.2)
    x, residual = torch.randn(5, 96).to(dtype), torch.randn(5, 96).to(dtype)
    assert torch.equal(rms_norm_reference(x, module.weight, 1e-5), module(x))
    expected_out, expected_residual = module(x, residual)
    out, new_residual = rms_norm_reference(x, module.weight, 1e-5, residual.clone())
    assert torch.equal(out, expected_out) and torch.equal(new_residual, expected_residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("num_rows", "hidden"), [(1, 80), (37, 80), (6, 4096), (3, 5000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, num_rows, hidden, with_residual):
    torch.manual_seed(num_rows * hidden)
    # x is a strided view (row stride > hidden), as from a slice of a wider activation.
    x = (3 * torch.randn(num_rows, hidden + 16)).to(dtype)[:, :hidden]
    weight = torch.randn(hidden).to(dtype)
    residual = torch.randn(num_rows, hidden).to(dtype) if with_residual else None
    x_before = x.clone()
    out = _nan_like(x)
    if with_residual:
        expected_residual = residual.clone()
        expected, _ = rms_norm_reference(x, weight, 1e-6, expected_residual)
        result = rms_norm(x, weight, 1e-6, residual, out=out)
        assert result[0] is out and result[1] is residual
        assert torch.equal(residual, expected_residual)  # the add is exact: one rounding
    else:
        expected = rms_norm_reference(x, weight, 1e-6)
        assert rms_norm(x, weight, 1e-6, out=out) is out
    assert torch.equal(x, x_before)
    assert_matches(out, expected)


def test_rms_norm_allocates_out_handles_leading_dims_and_in_place_out():
    torch.manual_seed(1)
    x, residual = torch.randn(2, 3, 80).half(), torch.randn(2, 3, 80).half()
    weight = torch.randn(80).half()
    expected = rms_norm_reference(x, weight, 1e-5)
    assert_matches(rms_norm(x, weight, 1e-5), expected)
    expected, expected_residual = rms_norm_reference(x, weight, 1e-5, residual.clone())
    out, new_residual = rms_norm(x, weight, 1e-5, residual, out=x)  # normalise x in place
    assert out is x and new_residual is residual
    assert torch.equal(residual, expected_residual)
    assert_matches(x, expected)


def test_rms_norm_promotes_like_torch_with_an_fp32_weight():
    torch.manual_seed(2)
    x, weight = torch.randn(4, 80).half(), torch.randn(80)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-6), rtol=1e-6, atol=1e-6)


def test_rms_norm_rejects_bad_arguments():
    x = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(32), 1e-6)
    with pytest.raises(TypeError, match="residual"):
        rms_norm(x, torch.ones(64), 1e-6, residual=torch.zeros(4, 64).half())
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm(torch.zeros(1, 16385), torch.ones(16385), 1e-6)
    with pytest.raises(ValueError, match="residual"):  # cannot flatten to rows without a copy
        rms_norm(
            x.view(4, 1, 64).expand(4, 2, 64),
            torch.ones(64),
            1e-6,
            residual=torch.zeros(2, 4, 64).transpose(0, 1),
        )
    assert rms_norm(torch.zeros(0, 64), torch.ones(64), 1e-6).shape == (0, 64)


# ---------------------------------------------------------------------------------------------
# apply_rotary


def _fused_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, pad=8):
    """q, k, v as views of one [T, (Hq + 2 Hk) * D + pad] projection output; the pad is NaN."""
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.full((num_tokens, width + pad), float("nan"), dtype=dtype)
    qkv[:, :width] = (2 * torch.randn(num_tokens, width)).to(dtype)
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k_end = (num_q_heads + num_kv_heads) * head_dim
    k = qkv[:, num_q_heads * head_dim : k_end].view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k


def test_rotary_reference_is_the_torch_module():
    torch.manual_seed(3)
    rope = RotaryEmbedding(64, 512, theta=500000.0)
    positions = torch.randperm(512)[:9]
    q, k = torch.randn(9, 4, 64).half(), torch.randn(9, 2, 64).half()
    expected_q, expected_k = rope(positions, q, k)
    got_q, got_k = apply_rotary_reference(positions, q.clone(), k.clone(), rope.cos_sin_cache)
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("num_tokens", "num_q_heads", "num_kv_heads", "head_dim"),
    [(1, 4, 2, 64), (37, 4, 1, 128), (13, 6, 2, 80), (5, 2, 2, 256), (7, 3, 5, 32)],
)
def test_apply_rotary_in_place_on_fused_qkv_views(
    dtype, num_tokens, num_q_heads, num_kv_heads, head_dim
):
    torch.manual_seed(num_tokens * head_dim + num_q_heads)
    max_position = 4096
    cache = RotaryEmbedding(head_dim, max_position, theta=10000.0).cos_sin_cache
    qkv, q, k = _fused_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype)
    assert num_tokens == 1 or not (q.is_contiguous() or k.is_contiguous())
    positions = torch.randint(0, max_position, (num_tokens,))  # out of order, repeats allowed
    positions[0] = max_position - 1
    expected = qkv.clone()
    q_ref, k_ref = _views_like(expected, q, k)
    apply_rotary_reference(positions, q_ref, k_ref, cache)
    result = apply_rotary(positions, q, k, cache)
    assert result[0] is q and result[1] is k
    # fp32 products and differences in the same order, one rounding: identical, v and pad too.
    assert torch.equal(qkv.nan_to_num(7.0), expected.nan_to_num(7.0))
    assert qkv[:, -8:].isnan().all()


def _views_like(base, q, k):
    """The same views as q and k, but of ``base`` (a clone of their storage's owner)."""
    return (
        base.as_strided(q.shape, q.stride(), q.storage_offset()),
        base.as_strided(k.shape, k.stride(), k.storage_offset()),
    )


def test_apply_rotary_separate_tensors_int32_positions_and_wide_head_stride():
    torch.manual_seed(4)
    cache = RotaryEmbedding(64, 128).cos_sin_cache
    q = torch.randn(11, 3, 64)
    k_storage = torch.full((11, 2, 128), float("nan"))
    k_storage[..., :64] = torch.randn(11, 2, 64)
    k = k_storage[..., :64]  # head stride 128
    positions = torch.randperm(128)[:11].int()
    q_ref, k_ref = q.clone(), k.clone()
    apply_rotary_reference(positions, q_ref, k_ref, cache)
    apply_rotary(positions, q, k, cache)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert k_storage[..., 64:].isnan().all()


def test_apply_rotary_rejects_bad_arguments():
    cache = torch.zeros(16, 64)
    q, k = torch.zeros(3, 2, 64), torch.zeros(3, 1, 64)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(torch.zeros(2, dtype=torch.int64), q, k, cache)
    with pytest.raises(TypeError, match="positions"):
        apply_rotary(torch.zeros(3), q, k, cache)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        apply_rotary(torch.zeros(3, dtype=torch.int64), q, k, torch.zeros(16, 32))
    with pytest.raises(TypeError, match="cos_sin_cache"):
        apply_rotary(torch.zeros(3, dtype=torch.int64), q, k, cache.half())
    with pytest.raises(ValueError, match="contiguous"):
        apply_rotary(torch.zeros(3, dtype=torch.int64), torch.zeros(3, 2, 128)[..., ::2], k, cache)


# ---------------------------------------------------------------------------------------------
# silu_and_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul_reference_is_the_torch_module(dtype):
    x = (4 * torch.randn(6, 2 * 72)).to(dtype)
    assert torch.equal(silu_and_mul_reference(x), SiluAndMul()(x))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(100)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("num_rows", "intermediate"), [(1, 80), (37, 1000), (3, 2600)])
def test_silu_and_mul_matches_reference(dtype, num_rows, intermediate):
    torch.manual_seed(num_rows + intermediate)
    # Strided rows, and extreme gates (exp overflow / underflow) in the first row.
    x = (4 * torch.randn(num_rows, 2 * intermediate + 8)).to(dtype)[:, : 2 * intermediate]
    x[0, :4] = torch.tensor([-100.0, 100.0, -20.0, 0.0], dtype=dtype)
    x_before = x.clone()
    out = torch.full((num_rows, intermediate), float("nan"), dtype=dtype)
    assert silu_and_mul(x, out=out) is out
    assert torch.equal(x, x_before)
    assert_matches(out, silu_and_mul_reference(x))


def test_silu_and_mul_allocates_and_handles_leading_dims():
    x = torch.randn(2, 5, 2 * 48).half()
    out = silu_and_mul(x)
    assert out.shape == (2, 5, 48)
    assert_matches(out, silu_and_mul_reference(x))
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="out"):
        silu_and_mul(x, out=torch.empty(2, 5, 96).half())
