"""Layer-level checks that the end-to-end comparison would only catch indirectly."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pagedserve.workers.layers.norm import RMSNorm
from pagedserve.workers.layers.rotary import (
    RotaryEmbedding,
    rope_config,
    rotary_for_config,
)
from tests.helpers.tiny_models import tiny_config

ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
def test_rope_tables_match_transformers(scaling):
    config = tiny_config("llama", rope_theta=500000.0, rope_scaling=ROPE_SCALINGS[scaling],
                         head_dim=32)
    ours = rotary_for_config(config, head_dim=32).cos_sin_cache
    positions = torch.arange(config.max_position_embeddings)[None]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    assert torch.allclose(ours[:, :16], cos[0, :, :16], atol=1e-6)
    assert torch.allclose(ours[:, 16:], sin[0, :, :16], atol=1e-6)


def test_llama3_scaling_changes_only_low_frequencies():
    config = tiny_config("llama", rope_theta=500000.0, rope_scaling=ROPE_SCALINGS["llama3"],
                         head_dim=32)
    plain = RotaryEmbedding(32, 256, 500000.0).cos_sin_cache
    scaled = rotary_for_config(config, head_dim=32).cos_sin_cache
    # Columns: cos of the 16 frequencies, then their sin (highest frequency first).
    assert torch.equal(plain[:, [0, 16]], scaled[:, [0, 16]])  # highest frequency kept
    assert torch.allclose(plain[1:, 31] / scaled[1:, 31], torch.tensor(8.0), rtol=1e-3)


def test_rope_config_reads_transformers_4_style_fields():
    class OldConfig:
        rope_theta = 123.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    theta, params = rope_config(OldConfig())
    assert theta == 123.0
    assert params["rope_type"] == "linear" and params["factor"] == 2.0


def test_fused_residual_norm_equals_add_then_norm():
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.linspace(0.5, 1.5, 8)
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    normed, new_residual = norm(x, residual)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(normed, norm(x + residual))


def test_rotary_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config = tiny_config("llama", rope_theta=10000.0, head_dim=32)
    rotary = rotary_for_config(config, head_dim=32)
    positions = torch.tensor([0, 5, 17, 200])
    q, k = torch.randn(4, 4, 32), torch.randn(4, 2, 32)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, positions[None])
    # transformers takes [batch, heads, seq, head_dim].
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                      hf_cos, hf_sin)
    ours_q, ours_k = rotary(positions, q.clone(), k.clone())
    assert torch.allclose(ours_q, hf_q[0].transpose(0, 1), atol=1e-6)
    assert torch.allclose(ours_k, hf_k[0].transpose(0, 1), atol=1e-6)


def test_rms_norm_matches_transformers_in_bf16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    reference = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    reference.weight.data = (torch.rand(64) + 0.5).to(torch.bfloat16)
    ours = RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    ours.weight.data = reference.weight.data.clone()
    x = (torch.randn(7, 64) * 3).to(torch.bfloat16)
    assert torch.equal(ours(x), reference(x))
