"""Rotary position embedding (rotate-half / GPT-NeoX layout, as Llama-family HF checkpoints use).

Frequencies are computed once, in fp32, into a [max_position, head_dim] cos|sin table (the
layout the rotary kernel reads) indexed by each token's absolute position, so a flat batch
mixing prefill and decode tokens of different sequences needs no per-sequence handling.

Supported `rope_type`s, each computed exactly as transformers' `modeling_rope_utils` does (same
formulas, same fp32/fp64 op order, so the tables match LlamaRotaryEmbedding's cos/sin):

* ``default``: ``inv_freq = 1 / theta ** (2i / head_dim)``.
* ``linear``: default frequencies divided by ``factor`` (position interpolation).
* ``llama3``: Llama 3.1's band-wise scaling against ``original_max_position_embeddings``.
* ``yarn``: NTK-by-parts blend of interpolated (``/ factor``) and extrapolated frequencies over
  a linear ramp between the correction dims of ``beta_fast``/``beta_slow`` (``truncate``
  honoured); cos and sin are multiplied by the attention factor (``attention_factor``, else
  ``0.1 * ln(factor) + 1``, or the ``mscale``/``mscale_all_dim`` ratio), as transformers
  multiplies its cos/sin by ``attention_scaling``. That factor lives in the table, so the
  kernel needs no extra parameter.
* ``dynamic`` (dynamic NTK): see below.

How ``dynamic`` matches transformers. transformers recomputes ``inv_freq`` in a forward call
only when ``max(position_ids) + 1`` exceeds ``config.max_position_embeddings`` (the "original"
length of dynamic NTK; its ``original_max_position_embeddings`` key is not read). Beyond that,
every token of the call is rotated with the frequencies of the call's longest sequence (the
whole padded batch's), the keys already cached keep the frequencies of the call that computed
them, and the module keeps the grown frequencies for later calls until one is shorter than the
original length. That cannot be reproduced per sequence from a token's position alone in a
flat batch of sequences of different lengths and chunking histories (it depends on batch
composition, on how a prompt was chunked, and on earlier requests). Below that length, however,
transformers never updates: its frequencies are those of ``_compute_dynamic_ntk_parameters``
at ``seq_len = max_position_embeddings`` (the default frequencies, base scaled by
``(factor * L / L - (factor - 1)) ** (d / (d - 2))``, 1 up to fp64 rounding). pagedserve
serves exactly that regime: the table has ``max_position_embeddings`` rows and the engine
refuses ``max_model_len`` above ``max_position_embeddings`` (``EngineCore``), so every
sequence it runs gets transformers' tokens, whatever it is batched or chunked with. Dynamic
NTK's context extension beyond ``max_position_embeddings`` is therefore not offered: serving
it exactly would need each token's frequencies to follow its own sequence's prompt length
(``seq_len = max(position + 1, prompt_len)`` reproduces an unbatched transformers ``generate``),
which the model forward does not receive, and prefix-cache blocks would then depend on the
prompt that computed them. Lifting the ``max_model_len`` cap requires that first.

Other types (``longrope``, ``proportional``, ...) and partial rotary
(``partial_rotary_factor`` < 1) raise ``pagedserve.errors.Unsupported``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedserve.errors import Unsupported
from pagedserve.kernels.rotary import apply_rotary, apply_rotary_reference

SUPPORTED_ROPE_TYPES = ("default", "dynamic", "linear", "llama3", "yarn")
# transformers moves the pretraining length into the parameters for these types.
_TYPES_WITH_ORIGINAL_LENGTH = ("llama3", "yarn")


def rope_config(config: Any) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling parameters) from a HF config of transformers 4.x or 5.x.

    transformers 5 folds theta and scaling into `rope_parameters`; 4.x has `rope_theta` and an
    optional `rope_scaling` dict (whose type key was `type` in old checkpoints). As in
    transformers' `standardize_rope_params`, llama3 and yarn get
    `original_max_position_embeddings` from a top-level config attribute of that name when
    there is one, else from the dict, else `max_position_embeddings`.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    rope_type = params.pop("type", "default")
    params.setdefault("rope_type", rope_type)
    if params["rope_type"] in _TYPES_WITH_ORIGINAL_LENGTH:
        original = getattr(config, "original_max_position_embeddings", None)
        if original is not None:
            params["original_max_position_embeddings"] = original
        else:
            params.setdefault("original_max_position_embeddings",
                              getattr(config, "max_position_embeddings", None))
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    return float(theta), params


def _default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta ** exponents)


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


def _dynamic_ntk_inv_freq(theta: float, head_dim: int, scaling: dict[str, Any],
                          max_position: int) -> torch.Tensor:
    """transformers' `_compute_dynamic_ntk_parameters` at seq_len = max_position_embeddings
    (python-float base, as there), the only frequencies it uses within that length."""
    factor = scaling["factor"]
    seq_len = max_position
    base = theta * ((factor * seq_len / max_position) - (factor - 1)) ** (
        head_dim / (head_dim - 2))
    return _default_inv_freq(base, head_dim)


def _yarn_inv_freq(theta: float, head_dim: int, scaling: dict[str, Any],
                   max_position: int) -> tuple[torch.Tensor, float]:
    """transformers' `_compute_yarn_parameters`: (inv_freq, attention factor)."""
    dim = head_dim
    factor = scaling.get("factor")
    attention_factor = scaling.get("attention_factor")
    mscale = scaling.get("mscale")
    mscale_all_dim = scaling.get("mscale_all_dim")
    original = scaling["original_max_position_embeddings"]
    if factor is None:  # DeepSeek-V3 style: the ratio of the two lengths
        factor = max_position / original

    def get_mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale)
                                     / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = (inv_freq_interpolation * (1 - extrapolation_factor)
                + inv_freq_extrapolation * extrapolation_factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Applies RoPE with one model's frequencies to q and k.

    `max_position` must be the config's `max_position_embeddings`: it is the table length and
    also the length `dynamic` and factor-less `yarn` measure against, as in transformers. No
    position at or past it can be looked up, which is what keeps `dynamic` exact (see the
    module docstring).
    """

    def __init__(self, head_dim: int, max_position: int, theta: float = 10000.0,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        scaling = scaling or {}
        rope_type = scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise Unsupported(f"unsupported rope_scaling type {rope_type!r}; supported: "
                              f"{list(SUPPORTED_ROPE_TYPES)}")
        partial = scaling.get("partial_rotary_factor", 1.0)
        if partial is not None and partial != 1.0:
            raise Unsupported(f"partial rotary embeddings (partial_rotary_factor={partial}) are "
                              "not supported; RoPE rotates the whole head_dim")
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.rope_type = rope_type
        self.attention_factor = 1.0
        if rope_type == "dynamic":
            inv_freq = _dynamic_ntk_inv_freq(theta, head_dim, scaling, max_position)
        elif rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(theta, head_dim, scaling,
                                                             max_position)
        else:
            inv_freq = _default_inv_freq(theta, head_dim)
            if rope_type == "linear":
                inv_freq = inv_freq / scaling["factor"]
            elif rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, scaling)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq.float()[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:  # transformers: emb.cos() * attention_scaling
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        # Non-persistent: derived from the config, never part of a checkpoint; always fp32.
        self.register_buffer("cos_sin_cache", torch.cat([cos, sin], dim=-1).float(),
                             persistent=False)

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
    """The model's RoPE table, `max_position_embeddings` rows long; `Unsupported` for a
    `rope_type` (or partial rotary) this module does not implement."""
    theta, scaling = rope_config(config)
    return RotaryEmbedding(head_dim, config.max_position_embeddings, theta, scaling)
