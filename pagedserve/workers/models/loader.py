"""Building a model from a Hugging Face checkpoint directory (or a config, for dummy weights).

Weights are read from safetensors lazily: each checkpoint tensor is opened as a slice and every
parameter's `weight_loader` reads only this rank's rows/columns, so a TP rank never holds a full
tensor it does not need. Checkpoints without safetensors may be PyTorch `.bin` files
(`pytorch_model.bin`, or shards named by `pytorch_model.bin.index.json`), read whole with
`torch.load(weights_only=True)`; safetensors win when both are there. Checkpoint names map
one-to-one onto module names except the q/k/v and gate/up projections, which load into the
fused parameters as shards (see `LlamaForCausalLM.packed_modules_mapping`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, LlamaConfig, PretrainedConfig

from pagedserve.workers.layers.parallel import TensorParallelGroup, valid_tp_sizes
from pagedserve.workers.layers.weight_utils import WeightShapeError, default_weight_loader
from pagedserve.workers.models import gguf
from pagedserve.workers.models.llama import LlamaForCausalLM, model_class_for, num_kv_heads_of

logger = logging.getLogger(__name__)

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
# Derived buffers some older checkpoints saved; recomputed from the config instead.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_INDEX_FILE = "model.safetensors.index.json"
_BIN_INDEX_FILE = "pytorch_model.bin.index.json"


def load_config(model_dir: str | os.PathLike) -> PretrainedConfig:
    """The checkpoint's config.json via transformers, without touching the network (for a GGUF
    file, or a directory holding one and no config.json, transformers' config of its metadata)."""
    path = Path(model_dir)
    gguf_file = gguf.gguf_file_of(path)
    if gguf_file is not None:
        return gguf.load_gguf_config(gguf_file)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def resolve_dtype(dtype: str | torch.dtype, config: Any) -> torch.dtype:
    """'auto' means the config's dtype (float32 when it names none)."""
    if dtype == "auto":
        # transformers 5 renamed torch_dtype to dtype (reading the old name there warns).
        dtype = config.dtype if hasattr(config, "dtype") else config.torch_dtype
        dtype = dtype or torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use 'auto' or one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported dtype {dtype}; use bfloat16, float16 or float32")
    return dtype


def check_tp_size(config: Any, tp_size: int) -> None:
    """Heads (query and KV: KV heads are not replicated) and the MLP must split evenly."""
    dims = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": num_kv_heads_of(config),
        "intermediate_size": config.intermediate_size,
    }
    valid = valid_tp_sizes(*dims.values())
    if tp_size not in valid:
        described = ", ".join(f"{name}={value}" for name, value in dims.items())
        raise ValueError(f"tensor parallel size {tp_size} does not evenly split this model "
                         f"({described}); valid tensor parallel sizes: {valid}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: Any, dtype: torch.dtype, device: str | torch.device,
                tp: TensorParallelGroup) -> LlamaForCausalLM:
    """The model with uninitialised parameters allocated directly on `device` in `dtype`."""
    model_class = model_class_for(config)
    check_tp_size(config, tp.size)
    with _default_dtype(dtype), torch.device(device):
        model = model_class(config, tp)
    return model.eval()


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files to read: those named by the index when there is one, else all;
    without any, the PyTorch .bin files. A GGUF checkpoint is its one .gguf file."""
    gguf_file = gguf.gguf_file_of(model_dir)
    if gguf_file is not None:
        return [gguf_file]
    index_path = model_dir / _INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{_INDEX_FILE} in {str(model_dir)!r} names missing files: "
                                    f"{missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    # Mistral repositories ship the same weights again under Mistral's own names.
    files = [f for f in files if not f.name.startswith("consolidated")] or files
    if not files:
        files = _bin_checkpoint_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no *.safetensors weight files (nor pytorch_model*.bin) in "
                                f"{str(model_dir)!r}")
    return files


def _bin_checkpoint_files(model_dir: Path) -> list[Path]:
    """PyTorch .bin weights: those named by pytorch_model.bin.index.json, else
    pytorch_model*.bin (other .bin files, e.g. training_args.bin, are no weights)."""
    index_path = model_dir / _BIN_INDEX_FILE
    if not index_path.is_file():
        return sorted(model_dir.glob("pytorch_model*.bin"))
    weight_map = json.loads(index_path.read_text())["weight_map"]
    files = [model_dir / name for name in sorted(set(weight_map.values()))]
    missing = [str(f.name) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{_BIN_INDEX_FILE} in {str(model_dir)!r} names missing files: "
                                f"{missing}")
    return files


class _BinCheckpoint:
    """A .bin state dict behind the two `safe_open` methods `load_weights` uses; get_slice
    returns the tensor itself, which the weight loaders slice like a safetensors slice."""

    def __init__(self, path: Path) -> None:
        self.tensors = torch.load(path, weights_only=True, map_location="cpu")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_slice(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@contextlib.contextmanager
def _open_checkpoint(path: Path) -> Iterator[Any]:
    if path.suffix.lower() == gguf.GGUF_SUFFIX:
        yield gguf.GGUFCheckpoint(path)  # dequantized as the weight loaders read their slices
    elif path.suffix == ".bin":
        yield _BinCheckpoint(path)
    else:
        with safe_open(path, framework="pt", device="cpu") as checkpoint:
            yield checkpoint


def _param_target(model: LlamaForCausalLM, checkpoint_name: str) -> tuple[str, Any]:
    """Checkpoint tensor name -> (our parameter name, shard id or None)."""
    parts = checkpoint_name.split(".")
    for index, part in enumerate(parts):
        if part in model.packed_modules_mapping:
            fused, shard_id = model.packed_modules_mapping[part]
            return ".".join([*parts[:index], fused, *parts[index + 1:]]), shard_id
    return checkpoint_name, None


# Checkpoint names of per-layer fp8 KV-cache scales (the names vLLM reads) -> the Attention
# buffers they set. A scale s means the cache stores x / s.
_KV_SCALE_NAMES = {
    "self_attn.k_scale": ("k_scale",),  # llm-compressor
    "self_attn.v_scale": ("v_scale",),
    "self_attn.kv_scale": ("k_scale", "v_scale"),  # AutoFP8: one scale for both
    "self_attn.k_proj.output_scale": ("k_scale",),  # ModelOpt
    "self_attn.v_proj.output_scale": ("v_scale",),
}


def _kv_scale_target(checkpoint_name: str) -> tuple[str, tuple[str, ...]] | None:
    """(our Attention module's name, the scales it sets) for a KV-scale tensor, else None."""
    for suffix, scales in _KV_SCALE_NAMES.items():
        if checkpoint_name.endswith("." + suffix):
            return checkpoint_name[: -len(suffix)] + "self_attn.attn", scales
    return None


@torch.no_grad()
def _load_kv_scale(model: LlamaForCausalLM, checkpoint_name: str, tensor: torch.Tensor,
                   module_name: str, scales: tuple[str, ...]) -> None:
    try:
        attention = model.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"checkpoint tensor {checkpoint_name!r} is a KV scale of a layer the "
                         "model does not have") from None
    # A per-head scale (some exporters) becomes the layer's largest: nothing saturates.
    value = float(tensor.float().max()) if tensor.numel() else float("nan")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"checkpoint tensor {checkpoint_name!r} must hold finite scales > 0, "
                         f"got {tensor.flatten()[:4].tolist()}")
    for scale in scales:
        getattr(attention, scale).fill_(value)
        attention.checkpoint_kv_scales.add(scale)


def _expected_loads(model: LlamaForCausalLM) -> set[tuple[str, Any]]:
    """Every (parameter, shard id) a complete checkpoint must fill."""
    shards_of: dict[str, list[Any]] = {}
    for fused, shard_id in model.packed_modules_mapping.values():
        shards_of.setdefault(fused, []).append(shard_id)
    expected = set()
    for name, _ in model.named_parameters():  # tied weights appear once, under the embedding
        module_name = name.split(".")[-2]
        for shard_id in shards_of.get(module_name, [None]):
            expected.add((name, shard_id))
    return expected


def load_weights(model: LlamaForCausalLM, model_dir: str | os.PathLike) -> None:
    """Fill `model`'s parameters (this rank's shards) from the checkpoint in `model_dir`, and
    the attention layers' fp8 KV scales where the checkpoint has them (see `kv_scales`)."""
    model_dir = Path(model_dir)
    params = dict(model.named_parameters())
    loaded: set[tuple[str, Any]] = set()
    unexpected: list[str] = []
    for path in checkpoint_files(model_dir):
        with _open_checkpoint(path) as checkpoint:
            for checkpoint_name in checkpoint.keys():  # noqa: SIM118 (safe_open is no dict)
                if checkpoint_name.endswith(_IGNORED_SUFFIXES) or (
                        model.tie_word_embeddings and checkpoint_name == "lm_head.weight"):
                    continue
                kv_scale = _kv_scale_target(checkpoint_name)
                if kv_scale is not None:
                    tensor = (checkpoint.get_tensor(checkpoint_name)
                              if hasattr(checkpoint, "get_tensor")
                              else checkpoint.get_slice(checkpoint_name))
                    _load_kv_scale(model, checkpoint_name, tensor, *kv_scale)
                    continue
                name, shard_id = _param_target(model, checkpoint_name)
                param = params.get(name)
                if param is None:
                    unexpected.append(checkpoint_name)
                    continue
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, checkpoint.get_slice(checkpoint_name), shard_id)
                except WeightShapeError as error:
                    raise WeightShapeError(f"checkpoint tensor {checkpoint_name!r} (parameter "
                                           f"{name!r}): {error}") from None
                loaded.add((name, shard_id))
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model has no parameter for: %s",
                       len(unexpected), unexpected[:20])
    missing = _expected_loads(model) - loaded
    if missing:
        described = sorted(name if shard is None else f"{name} (shard {shard})"
                           for name, shard in missing)
        raise ValueError(f"checkpoint {str(model_dir)!r} is missing weights: {described}")


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Random N(0, std) weights (norm scales 1) so activations stay in a realistic range.

    Each rank draws its own shard from a generator seeded by (seed, rank), so dummy weights are
    reproducible for a given TP size but differ between TP sizes.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.device not in generators:
            generators[param.device] = torch.Generator(param.device).manual_seed(
                seed * 1_000_003 + model.tp.rank)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generators[param.device])


@torch.no_grad()
def load_model(model: str | os.PathLike | PretrainedConfig, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", tp_rank: int = 0, tp_size: int = 1,
               load_format: str = "auto", process_group: Any = None,
               seed: int = 0) -> LlamaForCausalLM:
    """A ready-to-run model for this TP rank.

    `model` is a HF checkpoint directory, or a config when `load_format="dummy"` (random
    weights of the config's shapes, for benchmarks; see `llama_8b_config`).
    """
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"unsupported load_format {load_format!r}; use 'auto' or 'dummy'")
    if isinstance(model, PretrainedConfig):
        if load_format != "dummy":
            raise ValueError("a config without a checkpoint directory needs load_format='dummy'")
        config = model
    else:
        config = load_config(model)
    tp = TensorParallelGroup(rank=tp_rank, size=tp_size, process_group=process_group)
    network = build_model(config, resolve_dtype(dtype, config), device, tp)
    if load_format == "dummy":
        init_dummy_weights(network, seed)
    else:
        load_weights(network, model)
    return network


def _llama3_config(**shape: int) -> LlamaConfig:
    """A Llama 3.1-style config (RoPE theta 500000 with llama3 scaling to 128K context)."""
    return LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, dtype="bfloat16", **shape,
    )


def llama_8b_config() -> LlamaConfig:
    """Llama 3 8B shapes (for dummy-weight benchmarks)."""
    return _llama3_config(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                          num_key_value_heads=8, intermediate_size=14336)


def llama_70b_config() -> LlamaConfig:
    """Llama 3 70B shapes (for dummy-weight benchmarks)."""
    return _llama3_config(num_hidden_layers=80, hidden_size=8192, num_attention_heads=64,
                          num_key_value_heads=8, intermediate_size=28672)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The checkpoint's tokenizer (local files only), or None with a warning when it has none."""
    from transformers import AutoTokenizer

    try:
        gguf_file = gguf.gguf_file_of(path)
        if gguf_file is not None:  # built from the file's metadata, chat template included
            return gguf.load_gguf_tokenizer(gguf_file)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        # The message, not the exception: a log record keeps its args, and the exception's
        # traceback would keep the caller (and its GPU workers) alive.
        logger.warning("no tokenizer in %s (%s); only token-id prompts work", path, str(error))
        return None


def eos_token_ids(hf_config: Any, tokenizer: Any, model_dir: str | os.PathLike) -> list[int]:
    """EOS ids from config.json, then generation_config.json (instruct models often list their
    end-of-turn token only there, e.g. Llama 3's <|eot_id|>), then the tokenizer. A GGUF file
    has no generation config: its metadata's eos/eot/eom ids stand in for it."""
    from transformers import GenerationConfig

    gguf_file = gguf.gguf_file_of(model_dir)
    try:
        generation_eos = gguf.end_of_generation_ids(gguf_file) if gguf_file is not None else \
            GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
    except OSError:
        generation_eos = None
    ids: list[int] = []
    for eos in (getattr(hf_config, "eos_token_id", None), generation_eos,
                None if tokenizer is None else tokenizer.eos_token_id):
        for token_id in eos if isinstance(eos, list | tuple) else [eos]:
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
    return ids
