"""Rotary position embedding (rotate-half / GPT-NeoX layout, as Llama-family HF checkpoints use).

Frequencies are computed once, in fp32, into a [max_position, head_dim] cos|sin table (the
layout the rotary kernel reads) indexed by each token's absolute position, so a flat batch
mixing prefill and decode tokens of different sequences needs no per-sequence handling.
Supported `rope_type`s: default, linear, llama3.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedserve.kernels.rotary import apply_rotary, apply_rotary_reference

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_config(config: Any) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling parameters) from a HF config of transformers 4.x or 5.x.

    transformers 5 folds theta and scaling into `rope_parameters`; 4.x has `rope_theta` and an
    optional `rope_scaling` dict (whose type key was `type` in old checkpoints).
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params.setdefault("rope_type", params.pop("type", "default"))
    return float(theta), params


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: keep high frequencies, divide low ones by `factor`, and
    interpolate smoothly in between (wavelengths measured against the original context)."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    original_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE with one model's frequencies to q and k."""

    def __init__(self, head_dim: int, max_position: int, theta: float = 10000.0,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        scaling = scaling or {}
        rope_type = scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: "
                             f"{list(SUPPORTED_ROPE_TYPES)}")
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (theta ** exponents)
        if rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        # Non-persistent: derived from the config, never part of a checkpoint; always fp32.
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1)
                             .float(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (q, k) for q [T, heads, head_dim] and k [T, kv_heads, head_dim].

        In fp32, rounded once to the input dtype. On CUDA a fused Triton kernel rotates q and k
        IN PLACE (they may be views of the fused qkv output; no copies); on CPU new tensors are
        returned. Either way callers use the returned tensors and not q/k afterwards.
        """
        if q.is_cuda:
            return apply_rotary(positions, q, k, self.cos_sin_cache)
        return apply_rotary_reference(positions, q.clone(), k.clone(), self.cos_sin_cache)


def rotary_for_config(config: Any, head_dim: int) -> RotaryEmbedding:
    theta, scaling = rope_config(config)
    return RotaryEmbedding(head_dim, config.max_position_embeddings, theta, scaling)
