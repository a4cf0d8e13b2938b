"""The embedded default model: a tiny Llama with a byte-level tokenizer and seeded weights.

It lets `LLM()` run anywhere with no download: on first use it is written, as an ordinary
Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files), to
$PAGEDSERVE_CACHE (default ~/.cache/pagedserve). Its weights are random, so its text is noise;
it exists to exercise the whole serving path, not to answer questions.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

NAME = "tiny-llama-bytes-v2"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
SEED = 1234

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("PAGEDSERVE_CACHE", Path.home() / ".cache" / "pagedserve"))


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(alphabet):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _write(target: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    printable = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(chr(byte))[0])
                 for byte in range(32, 127)]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.5 if "embed" in name else 0.08)
        # Only printable ASCII gets large output weights, so sampled text is readable noise
        # rather than invalid UTF-8.
        lm_head = model.lm_head.weight
        lm_head.zero_()
        lm_head[printable] = torch.randn(len(printable), config.hidden_size) * 0.3
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def ensure_default_model() -> str:
    """Path of the default model's checkpoint directory, creating it on first use."""
    target = cache_dir() / NAME
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("creating the embedded default model in %s", target)
    # Written to a temporary sibling and renamed, so a crash never leaves half a checkpoint.
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        _write(Path(staging) / NAME)
        try:
            os.rename(Path(staging) / NAME, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    return str(target)
