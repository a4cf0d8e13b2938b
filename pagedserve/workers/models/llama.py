"""Llama-family decoder-only causal LM over a flat token batch and a paged KV cache.

One implementation covers Llama 2/3 (incl. llama3 RoPE scaling), Mistral (sliding window),
Qwen2 (q/k/v bias) and Qwen3 (per-head RMSNorm of q and k); subclasses only switch those
features on. Tensors are flat: `forward` takes [T] token ids of all sequences of the step
concatenated and returns [T, hidden]; which rows belong to which sequence is described by the
`AttentionMetadata`. Module names follow Hugging Face's so checkpoint names map one-to-one,
except the fused q/k/v (`qkv_proj`) and gate/up (`gate_up_proj`) projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedserve.workers.layers.activation import SiluAndMul
from pagedserve.workers.layers.attention import Attention, AttentionMetadata, KVCache
from pagedserve.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedserve.workers.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedserve.workers.layers.norm import RMSNorm
from pagedserve.workers.layers.parallel import TensorParallelGroup
from pagedserve.workers.layers.rotary import RotaryEmbedding, rotary_for_config


def head_dim_of(config: Any) -> int:
    """`head_dim` from the config when set (Qwen3, Mistral Nemo), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_kv_heads_of(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def sliding_window_of_layer(config: Any, layer_index: int) -> int | None:
    """The layer's attention window, following each HF config generation's convention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # transformers 5 (and Qwen2/3 in late 4.x)
        return window if layer_types[layer_index] == "sliding_attention" else None
    if hasattr(config, "use_sliding_window"):  # Qwen2 in 4.x: only from max_window_layers on
        use = config.use_sliding_window and layer_index >= config.max_window_layers
        return window if use else None
    return window  # Mistral: every layer, when set


@dataclass(frozen=True)
class DecoderFeatures:
    """The switches that tell the supported architectures apart."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


class DecoderAttention(nn.Module):
    def __init__(self, config: Any, layer_index: int, rotary: RotaryEmbedding,
                 features: DecoderFeatures, tp: TensorParallelGroup) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        num_heads = config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, num_heads,
                                          num_kv_heads_of(config), features.qkv_bias, tp)
        self.o_proj = RowParallelLinear(num_heads * head_dim, config.hidden_size,
                                        features.o_bias, tp)
        self.rotary = rotary
        self.head_dim = head_dim
        self.num_heads = self.qkv_proj.num_heads_per_rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads_per_rank
        if features.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5,
                              sliding_window_of_layer(config, layer_index))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None:  # Qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata))


class DecoderMLP(nn.Module):
    def __init__(self, config: Any, features: DecoderFeatures, tp: TensorParallelGroup) -> None:
        super().__init__()
        hidden, intermediate = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate],
                                                       features.mlp_bias, tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, features.mlp_bias, tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_index: int, rotary: RotaryEmbedding,
                 features: DecoderFeatures, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(config, layer_index, rotary, features, tp)
        self.mlp = DecoderMLP(config, features, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, kv_cache: KVCache,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config: Any, features: DecoderFeatures, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        # One RoPE table shared by all layers.
        self.rotary = rotary_for_config(config, head_dim_of(config))
        self.layers = nn.ModuleList(
            DecoderLayer(config, index, self.rotary, features, tp)
            for index in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected one KV cache per layer ({len(self.layers)}), "
                             f"got {len(kv_caches)}")
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama 2/3; the base of every supported architecture."""

    # Checkpoint projection name -> (our fused parameter's module, shard id in it).
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    @classmethod
    def features(cls, config: Any) -> DecoderFeatures:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderFeatures(qkv_bias=bias, o_bias=bias,
                               mlp_bias=bool(getattr(config, "mlp_bias", False)))

    def __init__(self, config: Any, tp: TensorParallelGroup | None = None) -> None:
        super().__init__()
        tp = tp or TensorParallelGroup()
        self.config = config
        self.tp = tp
        self.model = DecoderModel(config, self.features(config), tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids/positions [T] -> final hidden states [T, hidden] (K/V stored on the way)."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> fp32 logits [N, vocab] over the full vocabulary.

        With tensor parallelism only rank 0 gets logits (others get None): only it samples.
        Pass only the rows that need logits (e.g. each sequence's last token).
        """
        logits = self.lm_head(hidden)
        return None if logits is None else logits.float()


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with an optional sliding attention window (read per layer from the config)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def features(cls, config: Any) -> DecoderFeatures:
        return DecoderFeatures(qkv_bias=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def features(cls, config: Any) -> DecoderFeatures:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderFeatures(qkv_bias=bias, o_bias=bias, qk_norm=True)


MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
# transformers maps both names to SiLU.
_SILU_NAMES = ("silu", "swish")
_MODEL_TYPE_TO_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def model_class_for(config: Any) -> type[LlamaForCausalLM]:
    """The model class for a HF config's `architectures` (or, when unset, its `model_type`)."""
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        model_type = getattr(config, "model_type", None)
        architectures = [_MODEL_TYPE_TO_ARCHITECTURE.get(model_type, f"model_type={model_type}")]
    activation = getattr(config, "hidden_act", "silu")
    if activation not in _SILU_NAMES:
        raise ValueError(f"unsupported hidden_act {activation!r}; the MLP supports only "
                         f"{list(_SILU_NAMES)} (SiLU-gated)")
    for name in architectures:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(f"unsupported model architecture {architectures}; supported: "
                     f"{sorted(MODEL_REGISTRY)}")
