"""GGUF checkpoints (llama.cpp's single-file format): config, tokenizer and weights.

`LLM(model="model.gguf")`, or a directory with no config.json that holds exactly one .gguf file,
loads a Llama-family model from the file alone:

- the config is transformers' own reading of the metadata (`AutoConfig.from_pretrained(dir,
  gguf_file=...)`), and the tokenizer and chat template likewise (`AutoTokenizer`), so a GGUF file
  serves exactly the model transformers builds from it;
- the weights are read with the `gguf` package: each tensor is renamed to its Hugging Face name,
  the rotary permutation llama.cpp applies to the q/k projections is undone, and quantized blocks
  are dequantized by `gguf.quants` when a weight loader reads them. The loaders get a lazy slice
  (like safetensors'), so a tensor-parallel rank dequantizes only its own rows (and, for
  row-parallel weights, only its own quantization blocks) and the usual TP slicing applies.

Dequantized values land in the model's dtype when the loader copies them into its parameter;
nothing stays quantized at run time.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pagedserve.errors import InvalidArgument, Unsupported

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
"""`general.architecture` values this loader serves. llama.cpp writes Llama 1/2/3, Mistral 7B,
SmolLM, TinyLlama and other Llama-shaped models as "llama"."""

GGUF_SUFFIX = ".gguf"

# GGUF tensor name -> Hugging Face Llama name (the weight/bias suffix is kept).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors transformers does not load either: llama3 RoPE frequency factors and the per-layer
# rotary tables some old conversions carry.
_IGNORED_TENSOR = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?")


def _gguf():
    try:
        import gguf
    except ImportError as error:  # pragma: no cover - gguf is installed wherever tests run
        raise Unsupported("loading a .gguf checkpoint needs the `gguf` package: "
                          "pip install gguf") from error
    return gguf


def supported_types() -> list[str]:
    """The ggml tensor types `gguf.quants` can dequantize (F32, F16, BF16, Q*_0/1, K-quants,
    IQ*, ...), by name, in ggml's numbering order."""
    gguf = _gguf()
    types = gguf.GGMLQuantizationType
    traits = getattr(gguf.quants, "_type_traits", {})
    return [t.name for t in types if t in (types.F32, types.F16) or t in traits]


# ---- locating the file ------------------------------------------------------------------------


def gguf_file_of(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: `path` itself when it ends in .gguf, or the only .gguf in a
    directory without config.json (a directory with config.json is a Hugging Face checkpoint).
    None when `path` names no GGUF file."""
    path = Path(path)
    if path.suffix.lower() == GGUF_SUFFIX and not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(files) > 1:
        raise InvalidArgument(f"directory {str(path)!r} holds {len(files)} GGUF files "
                              f"({[f.name for f in files]}); pass the path of the one to load "
                              "(split files must first be merged with llama-gguf-split --merge)")
    return files[0] if files else None


def is_gguf(path: str | os.PathLike) -> bool:
    return gguf_file_of(path) is not None


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


# ---- reading and checking the file ------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _cached_reader(key: tuple[str, int, int]) -> Any:
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(key[0], "r")
    except (ValueError, OSError) as error:
        raise InvalidArgument(f"{key[0]!r} is not a readable GGUF file: {error}") from None
    check_supported(reader, key[0])
    return reader


def open_gguf(path: str | os.PathLike) -> Any:
    """A `gguf.GGUFReader` of the file, checked for a supported architecture and tensor types
    (cached per file version: the header of a large vocabulary takes a second to parse)."""
    return _cached_reader(_file_key(Path(path)))


def metadata_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def check_supported(reader: Any, name: str = "this GGUF file") -> None:
    """Unsupported, naming what is supported, for an architecture or tensor type this loader
    cannot serve."""
    architecture = metadata_value(reader, "general.architecture")
    if architecture is None:
        raise InvalidArgument(f"{name!r} has no general.architecture in its metadata")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise Unsupported(f"GGUF architecture {architecture!r} ({name}) is not supported; "
                          f"supported GGUF architectures: {list(SUPPORTED_ARCHITECTURES)}")
    if (metadata_value(reader, f"{architecture}.expert_count") or 0) > 0:
        raise Unsupported(f"{name!r} is a mixture-of-experts model; supported GGUF models are "
                          f"dense {list(SUPPORTED_ARCHITECTURES)} models")
    if (metadata_value(reader, "split.count") or 1) > 1:
        raise Unsupported(f"{name!r} is one part of a split GGUF model; merge the parts with "
                          "llama-gguf-split --merge and load the merged file")
    supported = supported_types()
    bad: dict[str, list[str]] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in supported:
            bad.setdefault(tensor.tensor_type.name, []).append(tensor.name)
    if bad:
        described = "; ".join(f"{kind} ({len(names)} tensors, e.g. {names[0]!r})"
                              for kind, names in bad.items())
        raise Unsupported(f"{name!r} holds tensors of types that cannot be dequantized: "
                          f"{described}; supported GGUF tensor types: {supported}")


# ---- config, tokenizer, end-of-generation tokens -----------------------------------------------


def _float_dtype(reader: Any) -> torch.dtype | None:
    """The float type of an unquantized file (what `dtype="auto"` means for it, as in
    transformers: the half type when there is one; float32 for quantized files)."""
    gguf = _gguf()
    types = {tensor.tensor_type for tensor in reader.tensors}
    floats = {gguf.GGMLQuantizationType.F32: torch.float32,
              gguf.GGMLQuantizationType.F16: torch.float16,
              gguf.GGMLQuantizationType.BF16: torch.bfloat16}
    if not types <= set(floats):
        return None
    for kind in (gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F16):
        if kind in types:
            return floats[kind]
    return torch.float32


def _warn_ignored_features(reader: Any, name: str) -> None:
    architecture = metadata_value(reader, "general.architecture")
    scaling = metadata_value(reader, f"{architecture}.rope.scaling.type")
    ignored = [tensor.name for tensor in reader.tensors if _IGNORED_TENSOR.fullmatch(tensor.name)]
    if scaling not in (None, "none") or "rope_freqs.weight" in ignored:
        what = f"rope scaling {scaling!r}" if scaling not in (None, "none") else \
            "llama3 RoPE frequency factors (rope_freqs.weight)"
        logger.warning("%s: %s ignored, as transformers ignores them; long contexts may "
                       "differ from llama.cpp", name, what)


@functools.lru_cache(maxsize=4)
def _cached_config(key: tuple[str, int, int]) -> Any:
    from transformers import AutoConfig

    path = Path(key[0])
    reader = _cached_reader(key)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                        local_files_only=True)
    dtype = _float_dtype(reader)
    if dtype is not None:
        config.dtype = dtype
    _warn_ignored_features(reader, path.name)
    return config


def load_gguf_config(path: str | os.PathLike) -> Any:
    """Transformers' config for the GGUF file (a LlamaConfig), after checking the file is one
    this loader serves; raises Unsupported otherwise."""
    return copy.deepcopy(_cached_config(_file_key(Path(path))))


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(key: tuple[str, int, int]) -> Any:
    from transformers import AutoTokenizer

    path = Path(key[0])
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                         local_files_only=True)


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """Transformers' tokenizer (with the chat template) built from the file's metadata (a copy
    of one cached per file version: building it parses the whole header twice)."""
    return copy.deepcopy(_cached_tokenizer(_file_key(Path(path))))


def end_of_generation_ids(path: str | os.PathLike) -> list[int]:
    """The EOS, end-of-turn and end-of-message ids the metadata names (llama.cpp stops on all
    three; instruct files name e.g. Llama 3's <|eot_id|> as eot)."""
    reader = open_gguf(path)
    ids = []
    for key in ("eos", "eot", "eom"):
        token_id = metadata_value(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


# ---- weights --------------------------------------------------------------------------------


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor; None for ones transformers does not load
    either; unknown names come back unchanged (the loader reports them as unexpected)."""
    if _IGNORED_TENSOR.fullmatch(gguf_name):
        return None
    base, dot, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, suffix = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{suffix}"
    return gguf_name


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (its convert script interleaves each head's rotary
    halves for the GGML rope kernel): rows of `num_heads` whole heads back in HF order."""
    half = weight.shape[0] // num_heads // 2
    return (weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


class GGUFWeight:
    """One GGUF tensor as a lazy slice (the `LazySlice` the weight loaders take): indexing with
    basic slices dequantizes only the rows asked for, and only the quantization blocks of the
    columns asked for when they are block-aligned. Rows of q/k projections come back in HF
    order (whole-head row ranges are unpermuted on their own)."""

    def __init__(self, tensor: Any, num_heads: int | None = None) -> None:
        gguf = _gguf()
        self.tensor = tensor
        self.name = tensor.name
        self.qtype = tensor.tensor_type
        self.shape = [int(dim) for dim in reversed(tensor.shape.tolist())]
        self.num_heads = num_heads
        self.head_rows = self.shape[0] // num_heads if num_heads else 0
        self.block_size, self.type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        self._plain = self.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __repr__(self) -> str:
        return f"GGUFWeight({self.name!r}, {self.qtype.name}, shape={self.shape})"

    def _dequantize(self, rows: slice, cols: slice | None) -> torch.Tensor:
        """Values of rows `rows` (and columns `cols` of a matrix; None: all of them)."""
        gguf = _gguf()
        data = self.tensor.data[rows]  # a matrix's quantized rows are [rows, bytes]
        if cols is not None and (cols.start, cols.stop) != (0, self.shape[1]):
            if self._plain:
                data, cols = data[:, cols], None
            elif cols.start % self.block_size == 0 and cols.stop % self.block_size == 0:
                # Only this range's blocks: a block never spans two rows.
                start = cols.start // self.block_size * self.type_size
                stop = cols.stop // self.block_size * self.type_size
                data, cols = data[:, start:stop], None
        if self._plain:
            values = np.array(data)  # a copy: the file is mapped read-only
        else:
            values = gguf.quants.dequantize(np.ascontiguousarray(data), self.qtype)
        result = torch.from_numpy(values)
        return result if cols is None else result[:, cols]

    def __getitem__(self, index: Any) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > len(self.shape) or not all(
                isinstance(i, slice) and i.step in (None, 1) for i in index):
            raise TypeError(f"{self!r} takes basic slices only, got {index!r}")
        if len(self.shape) > 2:  # none in a Llama file: read it whole
            gguf = _gguf()
            values = np.array(self.tensor.data) if self._plain else \
                gguf.quants.dequantize(self.tensor.data, self.qtype)
            return torch.from_numpy(values.reshape(self.shape))[index]
        index = index + (slice(None),) * (len(self.shape) - len(index))
        rows = slice(*index[0].indices(self.shape[0])[:2])
        cols = slice(*index[1].indices(self.shape[1])[:2]) if len(self.shape) == 2 else None
        if not self.num_heads:
            return self._dequantize(rows, cols)
        if rows.start % self.head_rows or rows.stop % self.head_rows:  # not whole heads
            whole = self._dequantize(slice(0, self.shape[0]), cols)
            return unpermute_rows(whole, self.num_heads)[rows]
        heads = max(0, rows.stop - rows.start) // self.head_rows
        result = self._dequantize(rows, cols)
        return unpermute_rows(result, heads) if heads else result


class GGUFCheckpoint:
    """A GGUF file behind the two `safe_open` methods the loader uses, under Hugging Face
    names: `keys()` and `get_slice(name)` (a `GGUFWeight`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.weights = dict(gguf_weights(path))

    def keys(self) -> list[str]:
        return list(self.weights)

    def get_slice(self, name: str) -> GGUFWeight:
        return self.weights[name]


def gguf_weights(path: str | os.PathLike) -> Iterator[tuple[str, GGUFWeight]]:
    """(Hugging Face name, lazy weight) for every tensor of the file the model can load."""
    reader = open_gguf(path)
    architecture = metadata_value(reader, "general.architecture")
    num_heads = int(metadata_value(reader, f"{architecture}.attention.head_count"))
    num_kv_heads = int(metadata_value(reader, f"{architecture}.attention.head_count_kv",
                                      num_heads))
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        heads = None
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            heads = num_heads
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            heads = num_kv_heads
        yield name, GGUFWeight(tensor, heads)
