"""PyTorch `.bin` checkpoints (pytorch_model.bin, or shards with pytorch_model.bin.index.json)
load with `torch.load(weights_only=True, map_location="cpu")` into exactly the weights of the
safetensors checkpoint, decode greedy-identically, and lose to safetensors when both exist.

transformers 5 no longer writes .bin (`save_pretrained(safe_serialization=False)` writes
safetensors), so `write_bin_checkpoint` writes its layout: `torch.save` of the state dict, and
for shards `pytorch_model-0000i-of-0000n.bin` plus an index with `metadata.total_size` and
`weight_map`. transformers itself loading those files checks the layout.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pagedserve.workers.models import loader
from pagedserve.workers.models.loader import load_model
from tests.engine.engine_utils import HFReference, greedy, make_llm, make_prompts, token_ids
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse)

MAX_TOKENS = 16
PROMPTS = make_prompts((4, 19, 33), seed=7)


def write_bin_checkpoint(source: Path, target: Path, num_shards: int = 1,
                         keep_safetensors: bool = False) -> Path:
    """A copy of the safetensors checkpoint `source` with its weights as .bin file(s)."""
    shutil.copytree(source, target)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(source.glob("*.safetensors")):
        state.update(load_file(path))
    if not keep_safetensors:
        for path in target.glob("*.safetensors*"):
            path.unlink()
    if num_shards == 1:
        torch.save(state, target / "pytorch_model.bin")
        return target
    names = sorted(state)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
        part = {name: state[name] for name in names[shard::num_shards]}
        torch.save(part, target / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (target / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return target


@pytest.fixture(scope="module")
def safetensors_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("st"), "llama", seed=3)


@pytest.fixture(scope="module")
def reference_state(safetensors_checkpoint) -> dict[str, torch.Tensor]:
    return load_model(safetensors_checkpoint, dtype="float32").state_dict()


def assert_same_weights(model, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize("num_shards", [1, 3], ids=["single", "sharded"])
def test_bin_loads_the_same_weights(num_shards, safetensors_checkpoint, reference_state,
                                    tmp_path, monkeypatch):
    checkpoint = write_bin_checkpoint(safetensors_checkpoint, tmp_path / "bin", num_shards)
    assert not list(checkpoint.glob("*.safetensors"))
    assert len(list(checkpoint.glob("pytorch_model*.bin"))) == num_shards
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert_same_weights(load_model(checkpoint, dtype="float32"), reference_state)
    assert calls == [{"weights_only": True, "map_location": "cpu"}] * num_shards
    monkeypatch.undo()
    # transformers reads the files we wrote as the same model (our layout is theirs).
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(safetensors_checkpoint, dtype=torch.float32)
    for (name, a), b in zip(hf_model.state_dict().items(), reference.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_sharded_bin_is_greedy_identical(safetensors_checkpoint, tmp_path):
    checkpoint = write_bin_checkpoint(safetensors_checkpoint, tmp_path / "bin", num_shards=3)
    from_bin = make_llm(checkpoint, num_gpu_blocks_override=64)
    from_safetensors = make_llm(safetensors_checkpoint, num_gpu_blocks_override=64)
    ours = token_ids(from_bin.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False))
    assert ours == token_ids(from_safetensors.generate(PROMPTS, greedy(MAX_TOKENS),
                                                       use_tqdm=False))
    assert ours == HFReference().generate_all(safetensors_checkpoint, PROMPTS, MAX_TOKENS)


def test_safetensors_win_over_bin(safetensors_checkpoint, reference_state, tmp_path,
                                  monkeypatch):
    checkpoint = write_bin_checkpoint(safetensors_checkpoint, tmp_path / "both", num_shards=2,
                                      keep_safetensors=True)
    # Different .bin weights, never to be read.
    for path in checkpoint.glob("*.bin"):
        torch.save({k: torch.zeros_like(v) for k, v in torch.load(path).items()}, path)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called although safetensors exist")

    monkeypatch.setattr(torch, "load", refuse)
    assert [p.suffix for p in loader.checkpoint_files(checkpoint)] == [".safetensors"]
    assert_same_weights(load_model(checkpoint, dtype="float32"), reference_state)


def test_other_bin_files_are_not_weights(safetensors_checkpoint, tmp_path):
    checkpoint = write_bin_checkpoint(safetensors_checkpoint, tmp_path / "bin")
    torch.save({"learning_rate": torch.tensor(1.0)}, checkpoint / "training_args.bin")
    assert [p.name for p in loader.checkpoint_files(checkpoint)] == ["pytorch_model.bin"]


def test_bin_index_naming_a_missing_shard(safetensors_checkpoint, tmp_path):
    checkpoint = write_bin_checkpoint(safetensors_checkpoint, tmp_path / "bin", num_shards=2)
    (checkpoint / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin.index.json in .* names "
                                                r"missing files: \['pytorch_model-00002-of"):
        load_model(checkpoint)


def test_no_weights_at_all(safetensors_checkpoint, tmp_path):
    checkpoint = write_bin_checkpoint(safetensors_checkpoint, tmp_path / "bin")
    (checkpoint / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weight files \(nor "
                                                r"pytorch_model\*\.bin\)"):
        load_model(checkpoint)


class NotATensor:
    """Pickled into a .bin: weights_only loading must refuse to build it."""


def test_bin_with_arbitrary_objects_is_refused(safetensors_checkpoint, tmp_path):
    checkpoint = write_bin_checkpoint(safetensors_checkpoint, tmp_path / "bin")
    state = torch.load(checkpoint / "pytorch_model.bin")
    torch.save({**state, "extra": NotATensor()}, checkpoint / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(checkpoint)
