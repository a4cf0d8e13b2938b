"""Tiny random Hugging Face checkpoints of every supported architecture, for tests.

`save_tiny_checkpoint(path, variant)` writes config.json + safetensors with transformers'
own `save_pretrained`, so loading them exercises exactly the format of real checkpoints.
Weights are drawn with a larger spread than HF's init (std 0.02 would make every logit ~0 and
any comparison trivially pass) and norm scales are randomised around 1 so they are tested too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

TINY_SHAPE: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# variant name -> (config class, settings on top of TINY_SHAPE)
TINY_VARIANTS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, {}),
    "llama_tied": (LlamaConfig, {"tie_word_embeddings": True}),
    # Scaling that actually changes frequencies for short test sequences.
    "llama3_rope": (LlamaConfig, {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    # A window shorter than the test prompts, so the sliding mask matters.
    "mistral": (MistralConfig, {"sliding_window": 6, "head_dim": 16}),
    "qwen2": (Qwen2Config, {"tie_word_embeddings": False}),
    # head_dim (32) differs from hidden / heads (16), as in real Qwen3 checkpoints.
    "qwen3": (Qwen3Config, {"head_dim": 32, "tie_word_embeddings": False}),
}


def tiny_config(variant: str = "llama", **overrides: Any) -> PretrainedConfig:
    config_class, settings = TINY_VARIANTS[variant]
    return config_class(**{**TINY_SHAPE, **settings, **overrides})


@torch.no_grad()
def tiny_hf_model(config: PretrainedConfig, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """A float32 transformers model of `config` with seeded random weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1.0 + 0.1 * torch.randn_like(param))
        else:
            param.normal_(0.0, std)
    return model.eval()


@torch.no_grad()
def hf_reference_logits(checkpoint: str | Path, sequences: dict[str, list[int]],
                        device: str = "cpu") -> dict[str, torch.Tensor]:
    """Transformers' fp32 logits [len, vocab] of each whole token sequence, returned on CPU."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device)
    return {key: model(torch.tensor([tokens], device=device)).logits[0].cpu()
            for key, tokens in sequences.items()}


def save_tiny_checkpoint(path: str | Path, variant: str = "llama", seed: int = 0,
                         max_shard_size: str | int | None = None, **overrides: Any) -> Path:
    """Save a tiny random checkpoint of `variant` into `path` and return the path.

    A small `max_shard_size` (e.g. "40KB") splits it into several safetensors files plus
    `model.safetensors.index.json`.
    """
    path = Path(path)
    model = tiny_hf_model(tiny_config(variant, **overrides), seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path
