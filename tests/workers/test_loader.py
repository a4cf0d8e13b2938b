"""Checkpoint loading: sharded files, per-rank TP slices, dtypes, dummy weights, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve.errors import Unsupported
from pagedserve.workers.layers.weight_utils import WeightShapeError
from pagedserve.workers.models.loader import (
    llama_8b_config,
    llama_70b_config,
    load_model,
    resolve_dtype,
)
from tests.helpers.tiny_models import save_tiny_checkpoint, tiny_config


def hf_state(checkpoint) -> dict[str, torch.Tensor]:
    state = {}
    for path in checkpoint.glob("*.safetensors"):
        state.update(load_file(path))
    return state


def copy_checkpoint(source, destination):
    shutil.copytree(source, destination)
    return destination


def test_sharded_checkpoint_loads_same_weights(tiny_checkpoint, tmp_path):
    sharded = save_tiny_checkpoint(tmp_path / "sharded", "qwen2", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single = load_model(tiny_checkpoint("qwen2"), dtype="float32").state_dict()
    for name, tensor in load_model(sharded, dtype="float32").state_dict().items():
        assert torch.equal(tensor, single[name]), name


def test_fused_projections_hold_hf_weights_in_order(tiny_checkpoint):
    checkpoint = tiny_checkpoint("qwen2")
    state = hf_state(checkpoint)
    layer = load_model(checkpoint, dtype="float32").model.layers[1]
    prefix = "model.layers.1."
    qkv = [state[prefix + f"self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat(qkv))
    assert torch.equal(layer.self_attn.qkv_proj.bias,
                       torch.cat([state[prefix + f"self_attn.{p}_proj.bias"] for p in "qkv"]))
    gate_up = [state[prefix + f"mlp.{p}_proj.weight"] for p in ("gate", "up")]
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat(gate_up))


def test_tensor_parallel_shards_reassemble_full_weights(tiny_checkpoint):
    """Rank 0 and rank 1 of TP=2 (built without torch.distributed) hold complementary slices."""
    checkpoint = tiny_checkpoint("qwen2")
    state = hf_state(checkpoint)
    ranks = [load_model(checkpoint, dtype="float32", tp_rank=r, tp_size=2) for r in (0, 1)]
    attn = [m.model.layers[0].self_attn for m in ranks]
    mlp = [m.model.layers[0].mlp for m in ranks]
    prefix = "model.layers.0."

    # Column parallel: each rank's fused weight is [its q rows; its k rows; its v rows].
    local_offset = 0
    for part, full_size in zip("qkv", attn[0].qkv_proj.output_sizes, strict=True):
        local_size = full_size // 2
        pieces = [a.qkv_proj.weight[local_offset:local_offset + local_size] for a in attn]
        assert torch.equal(torch.cat(pieces), state[prefix + f"self_attn.{part}_proj.weight"])
        local_offset += local_size
    intermediate = 128 // 2
    for index, name in enumerate(("gate", "up")):
        pieces = [m.gate_up_proj.weight[index * intermediate:(index + 1) * intermediate]
                  for m in mlp]
        assert torch.equal(torch.cat(pieces), state[prefix + f"mlp.{name}_proj.weight"])
    # Row parallel: split by input columns; the bias-free o/down projections.
    assert torch.equal(torch.cat([a.o_proj.weight for a in attn], dim=1),
                       state[prefix + "self_attn.o_proj.weight"])
    assert torch.equal(torch.cat([m.down_proj.weight for m in mlp], dim=1),
                       state[prefix + "mlp.down_proj.weight"])
    # Vocabulary parallel: rows.
    assert torch.equal(torch.cat([m.model.embed_tokens.weight for m in ranks]),
                       state["model.embed_tokens.weight"])
    assert torch.equal(torch.cat([m.lm_head.weight for m in ranks]), state["lm_head.weight"])
    # Replicated: norms.
    for model in ranks:
        assert torch.equal(model.model.norm.weight, state["model.norm.weight"])


def test_vocab_not_divisible_by_tp_is_padded(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "odd_vocab", "llama", vocab_size=255)
    state = hf_state(checkpoint)
    ranks = [load_model(checkpoint, dtype="float32", tp_rank=r, tp_size=2) for r in (0, 1)]
    heads = [m.lm_head for m in ranks]
    assert [h.weight.shape[0] for h in heads] == [128, 128]
    assert torch.equal(heads[1].weight[127], torch.zeros(64))
    assert torch.equal(torch.cat([h.weight for h in heads])[:255], state["lm_head.weight"])


def test_mistral_consolidated_file_is_ignored(tiny_checkpoint, tmp_path, caplog):
    checkpoint = copy_checkpoint(tiny_checkpoint("mistral"), tmp_path / "ckpt")
    save_file({"tok_embeddings.weight": torch.zeros(3)}, checkpoint / "consolidated.safetensors")
    load_model(checkpoint, dtype="float32")
    assert "tok_embeddings" not in caplog.text


def test_unknown_checkpoint_tensors_are_reported(tiny_checkpoint, tmp_path, caplog):
    checkpoint = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    save_file({"model.extra.weight": torch.zeros(3)}, checkpoint / "extra.safetensors")
    load_model(checkpoint, dtype="float32")
    assert "ignored 1 checkpoint tensors" in caplog.text and "model.extra.weight" in caplog.text


@pytest.mark.parametrize(("requested", "expected"), [
    ("auto", torch.float32), ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
    (torch.float32, torch.float32)])
def test_dtype_choice(tiny_checkpoint, requested, expected):
    model = load_model(tiny_checkpoint("llama"), dtype=requested)
    assert {p.dtype for p in model.parameters()} == {expected}
    # RoPE tables stay fp32 whatever the weights' dtype.
    assert model.model.rotary.cos_sin_cache.dtype == torch.float32


def test_auto_dtype_follows_config():
    assert resolve_dtype("auto", llama_8b_config()) == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8", llama_8b_config())


def test_dummy_weights_are_seeded_and_sane():
    config = tiny_config("qwen3", architectures=["Qwen3ForCausalLM"])
    first = load_model(config, dtype="float32", load_format="dummy", seed=7)
    second = load_model(config, dtype="float32", load_format="dummy", seed=7)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(first.model.norm.weight, torch.ones(64))
    assert first.model.layers[0].mlp.down_proj.weight.std() == pytest.approx(0.02, rel=0.2)


def test_benchmark_configs_have_llama3_shapes():
    small, large = llama_8b_config(), llama_70b_config()
    assert (small.num_hidden_layers, small.hidden_size, small.num_attention_heads,
            small.num_key_value_heads, small.intermediate_size, small.vocab_size) == (
        32, 4096, 32, 8, 14336, 128256)
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads,
            large.num_key_value_heads, large.intermediate_size, large.vocab_size) == (
        80, 8192, 64, 8, 28672, 128256)
    assert small.rope_parameters["rope_theta"] == 500000.0


# ---- errors -----------------------------------------------------------------------------------


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path)


def test_missing_weight_files(tiny_checkpoint, tmp_path):
    checkpoint = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weight files"):
        load_model(checkpoint)


def test_index_naming_a_missing_shard(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "sharded", "llama", max_shard_size="40KB")
    shard = sorted(checkpoint.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"names missing files: \\['{shard.name}'\\]"):
        load_model(checkpoint)


def test_unsupported_architecture(tiny_checkpoint, tmp_path):
    checkpoint = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model architecture \['FancyForCausalLM'\]; "
                                         r"supported: \['LlamaForCausalLM', 'MistralForCausalLM'"):
        load_model(checkpoint)


def rewrite_weights(checkpoint, edit) -> None:
    path = checkpoint / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_wrong_shape_names_tensor_and_shapes(tiny_checkpoint, tmp_path):
    checkpoint = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(checkpoint, lambda state: state.update({name: torch.zeros(24, 64)}))
    with pytest.raises(WeightShapeError, match=(
            rf"'{name}' \(parameter 'model.layers.1.self_attn.qkv_proj.weight'\): "
            r"expected shape \(32, 64\), got \(24, 64\)")):
        load_model(checkpoint)


def test_missing_weights_are_listed(tiny_checkpoint, tmp_path):
    checkpoint = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    rewrite_weights(checkpoint, lambda state: [state.pop(name) for name in (
        "model.layers.0.mlp.up_proj.weight", "model.norm.weight")])
    with pytest.raises(ValueError, match=r"missing weights: \['model.layers.0.mlp.gate_up_proj"
                                         r".weight \(shard 1\)', 'model.norm.weight'\]"):
        load_model(checkpoint)


def test_bad_tensor_parallel_size_lists_valid_sizes(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"tensor parallel size 3 does not evenly split this model"
                                         r".*num_key_value_heads=2.*valid tensor parallel sizes: "
                                         r"\[1, 2\]"):
        load_model(tiny_checkpoint("llama"), tp_size=3, tp_rank=0)


def test_unsupported_rope_scaling(tmp_path):
    config = tiny_config("llama", rope_scaling={"rope_type": "fancy", "factor": 2.0})
    with pytest.raises(Unsupported, match=r"unsupported rope_scaling type 'fancy'; supported: "
                                          r"\['default', 'dynamic', 'linear', 'llama3', "
                                          r"'yarn'\]"):
        load_model(config, load_format="dummy")


def test_config_needs_dummy_format():
    with pytest.raises(ValueError, match="needs load_format='dummy'"):
        load_model(tiny_config("llama"))
