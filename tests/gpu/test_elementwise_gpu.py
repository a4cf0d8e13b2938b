"""rms_norm, apply_rotary and silu_and_mul on a CUDA device (skipped without one): bf16 at the
Llama-3-8B prefill shapes against the torch references, plus CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.activation import silu_and_mul, silu_and_mul_reference
from pagedserve.kernels.rms_norm import rms_norm, rms_norm_reference
from pagedserve.kernels.rotary import apply_rotary, apply_rotary_reference
from pagedserve.workers.layers.rotary import RotaryEmbedding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
HIDDEN, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336  # 8B


def assert_nearly_equal(actual, expected, min_exact=0.99, atol=2.0**-24):
    """Nearly all identical; the rest within two ulps of the dtype (see the interpreter tests:
    summation order, FMA contraction and the fast exp move fp32 results by an ulp or so before
    the rounding to bf16). ``atol`` covers rotary's cancellations (x1 cos - x2 sin near 0),
    where an fp32 ulp of the products is large next to the result."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any()
    a, e = actual.double(), expected.double()
    tolerance = 2.0 ** (1 - MANTISSA_BITS[expected.dtype]) * e.abs() + atol
    assert ((a - e).abs() <= tolerance).all(), f"max diff {(a - e).abs().max().item()}"
    assert (a == e).double().mean().item() >= min_exact


@pytest.mark.parametrize(
    ("num_tokens", "hidden", "dtype"),
    [
        (8192, HIDDEN, torch.bfloat16),
        (1, HIDDEN, torch.bfloat16),
        (37, 5120, torch.bfloat16),
        (300, 16384, torch.bfloat16),
        (300, 3000, torch.float16),
        (129, 4096, torch.float32),
    ],
)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_gpu(num_tokens, hidden, dtype, with_residual):
    torch.manual_seed(0)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    out = torch.full_like(x, float("nan"))
    if with_residual:
        residual = torch.randn_like(x)
        expected_residual = residual.clone()
        expected, _ = rms_norm_reference(x, weight, 1e-5, expected_residual)
        rms_norm(x, weight, 1e-5, residual, out=out)
        assert torch.equal(residual, expected_residual)
    else:
        expected = rms_norm_reference(x, weight, 1e-5)
        rms_norm(x, weight, 1e-5, out=out)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        assert_nearly_equal(out, expected)


@pytest.mark.parametrize(
    ("num_tokens", "num_q_heads", "num_kv_heads", "head_dim"),
    [
        (8192, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM),
        (1, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM),
        (257, 64, 8, 128),
        (33, 8, 2, 256),
        (19, 10, 2, 80),
    ],
)
def test_apply_rotary_gpu_on_fused_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim):
    torch.manual_seed(1)
    max_position = 131072
    rope = RotaryEmbedding(
        head_dim,
        max_position,
        theta=500000.0,
        scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ).cuda()
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, max_position, (num_tokens,), device="cuda")
    expected = qkv.clone()
    for base in (expected, qkv):
        q = base[:, :q_size].view(num_tokens, num_q_heads, head_dim)
        k = base[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
        fn = apply_rotary_reference if base is expected else apply_rotary
        fn(positions, q, k, rope.cos_sin_cache)
    assert torch.equal(qkv[:, q_size + kv_size :], expected[:, q_size + kv_size :])  # v intact
    assert_nearly_equal(qkv[:, : q_size + kv_size], expected[:, : q_size + kv_size], atol=1e-6)


@pytest.mark.parametrize(
    ("num_tokens", "intermediate"), [(8192, INTERMEDIATE), (1, INTERMEDIATE), (77, 1000)]
)
def test_silu_and_mul_gpu(num_tokens, intermediate):
    torch.manual_seed(2)
    x = 3 * torch.randn(num_tokens, 2 * intermediate, device="cuda", dtype=torch.bfloat16)
    out = torch.full((num_tokens, intermediate), float("nan"), device="cuda", dtype=x.dtype)
    silu_and_mul(x, out=out)
    assert_nearly_equal(out, silu_and_mul_reference(x))


def test_elementwise_kernels_capture_in_a_cuda_graph():
    torch.manual_seed(3)
    tokens = 64
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(
        tokens, (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16
    )
    q = qkv[:, : NUM_Q_HEADS * HEAD_DIM].view(tokens, NUM_Q_HEADS, HEAD_DIM)
    k = qkv[:, NUM_Q_HEADS * HEAD_DIM : (NUM_Q_HEADS + NUM_KV_HEADS) * HEAD_DIM].view(
        tokens, NUM_KV_HEADS, HEAD_DIM
    )
    cache = RotaryEmbedding(HEAD_DIM, 4096).cuda().cos_sin_cache
    positions = torch.arange(tokens, device="cuda")
    gate_up = torch.randn(tokens, 2 * INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
    out, act = (
        torch.empty_like(x),
        torch.empty(tokens, INTERMEDIATE, device="cuda", dtype=torch.bfloat16),
    )
    inputs = (x.clone(), residual.clone(), qkv.clone())

    def step():
        rms_norm(x, weight, 1e-5, residual, out=out)
        apply_rotary(positions, q, k, cache)
        silu_and_mul(gate_up, out=act)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    for tensor, initial in zip((x, residual, qkv), inputs, strict=True):
        tensor.copy_(initial)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for tensor, initial in zip((x, residual, qkv), inputs, strict=True):
        tensor.copy_(initial)
    graph.replay()
    torch.cuda.synchronize()

    expected_residual = inputs[1].clone()
    expected_out, _ = rms_norm_reference(inputs[0], weight, 1e-5, expected_residual)
    expected_qkv = inputs[2].clone()
    apply_rotary_reference(
        positions,
        expected_qkv[:, : NUM_Q_HEADS * HEAD_DIM].view(tokens, NUM_Q_HEADS, HEAD_DIM),
        expected_qkv[:, NUM_Q_HEADS * HEAD_DIM : (NUM_Q_HEADS + NUM_KV_HEADS) * HEAD_DIM].view(
            tokens, NUM_KV_HEADS, HEAD_DIM
        ),
        cache,
    )
    assert torch.equal(residual, expected_residual)
    assert_nearly_equal(out, expected_out)
    assert_nearly_equal(qkv, expected_qkv, atol=1e-6)
    assert_nearly_equal(act, silu_and_mul_reference(gate_up))
