"""FP8 KV cache in the worker and the engine: the config field, pool sizing, checkpoint scales,
where scales come from, and the tiny model end to end on CPU against the same model with
`kv_cache_dtype="auto"`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve.config import EngineConfig
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import ConfigError
from pagedserve.workers import kv_pool
from pagedserve.workers.kv_pool import (
    allocate_kv_cache_for_config,
    bytes_per_block,
    kv_cache_torch_dtype,
    num_blocks_for_budget,
)
from pagedserve.workers.kv_scales import attention_layers, prepare_kv_scales
from pagedserve.workers.models.loader import llama_8b_config, llama_70b_config, load_model
from tests.engine.engine_utils import StepSpy, assert_no_leaks, greedy, make_llm, make_prompts
from tests.helpers.tiny_models import save_tiny_checkpoint, tiny_config
from tests.helpers.torch_threads import one_torch_thread  # noqa: F401 (autouse)

F8 = torch.float8_e4m3fn
PROMPTS = make_prompts((1, 3, 8, 17, 29, 40, 5, 12, 33, 21, 9, 26, 50, 60, 7, 44), seed=1)
MAX_TOKENS = 16


def test_kv_cache_dtype_is_validated():
    assert EngineConfig().kv_cache_dtype == "auto"
    with pytest.raises(ConfigError, match=r"kv_cache_dtype.*one of \('auto', 'fp8'\).*'int8'"):
        EngineConfig(kv_cache_dtype="int8")
    with pytest.raises(ConfigError, match="calculate_kv_scales"):
        EngineConfig(calculate_kv_scales=1)
    assert kv_cache_torch_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.bfloat16) == F8


def test_fp8_is_refused_without_float8_dtypes(monkeypatch):
    monkeypatch.setattr(kv_pool, "has_fp8", lambda: False)
    with pytest.raises(ConfigError, match=r"kv_cache_dtype='fp8' needs torch.float8_e4m3fn"):
        kv_cache_torch_dtype("fp8", torch.bfloat16)


@pytest.mark.parametrize("tp_size", [1, 2, 8])
def test_fp8_blocks_are_half_the_bytes_so_twice_the_blocks_fit(tp_size):
    for config in (llama_8b_config(), llama_70b_config()):
        bf16 = bytes_per_block(config, 16, torch.bfloat16, tp_size=tp_size)
        fp8 = bytes_per_block(config, 16, F8, tp_size=tp_size)
        assert 2 * fp8 == bf16
        budget = 70 * 2**30 + 12345
        assert num_blocks_for_budget(budget, config, 16, F8, tp_size) == budget // fp8
        assert num_blocks_for_budget(budget, config, 16, F8, tp_size) >= 2 * \
            num_blocks_for_budget(budget, config, 16, torch.bfloat16, tp_size)
    # 8B at TP=1: 32 layers x 16 tokens x (K, V) x 8 heads x 128 dims x 1 byte = 1 MiB.
    assert bytes_per_block(llama_8b_config(), 16, F8) == 2**20


def test_fp8_pool_is_allocated_zeroed_in_e4m3():
    caches = allocate_kv_cache_for_config(tiny_config("llama"), num_blocks=3, block_size=4,
                                          dtype=F8, device="cpu")
    for key_cache, value_cache in caches:
        assert key_cache.dtype == value_cache.dtype == F8
        assert not key_cache.view(torch.uint8).any()


def _with_tensors(directory: Path, extra: dict[str, torch.Tensor]) -> Path:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    tensors.update(extra)
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


def _scales(model) -> list[tuple[float, float]]:
    return [(layer.k_scale.item(), layer.v_scale.item()) for layer in attention_layers(model)]


def test_checkpoint_scales_are_read_under_every_name(tmp_path):
    directory = _with_tensors(save_tiny_checkpoint(tmp_path / "a"), {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.5),
        "model.layers.0.self_attn.v_scale": torch.tensor([0.25]),
        "model.layers.1.self_attn.kv_scale": torch.tensor(0.125),  # AutoFP8: both
    })
    model = load_model(directory)
    assert _scales(model) == [(0.5, 0.25), (0.125, 0.125)]
    assert prepare_kv_scales(model, "fp8", calculate=True) == "checkpoint"
    assert not any(layer.calibrate_kv_scales for layer in attention_layers(model))
    modelopt = _with_tensors(save_tiny_checkpoint(tmp_path / "b"), {
        "model.layers.1.self_attn.k_proj.output_scale": torch.tensor([0.5, 2.0]),  # per head
        "model.layers.1.self_attn.v_proj.output_scale": torch.tensor(3.0),
    })
    model = load_model(modelopt)
    assert _scales(model) == [(1.0, 1.0), (2.0, 3.0)]  # per-head scales become the largest
    assert attention_layers(model)[0].checkpoint_kv_scales == set()


@pytest.mark.parametrize(("name", "value", "message"), [
    ("model.layers.0.self_attn.k_scale", torch.tensor(0.0), "finite scales > 0"),
    ("model.layers.0.self_attn.v_scale", torch.tensor(float("inf")), "finite scales > 0"),
    ("model.layers.7.self_attn.k_scale", torch.tensor(1.0), "layer the model does not have"),
])
def test_bad_checkpoint_scales_are_refused(tmp_path, name, value, message):
    directory = _with_tensors(save_tiny_checkpoint(tmp_path), {name: value})
    with pytest.raises(ValueError, match=message):
        load_model(directory)


def test_missing_scales_calibrate_or_default_with_a_warning(tmp_path, caplog):
    model = load_model(save_tiny_checkpoint(tmp_path))
    assert prepare_kv_scales(model, "auto", calculate=False) == "unused"
    with caplog.at_level(logging.WARNING, logger="pagedserve.workers.kv_scales"):
        assert prepare_kv_scales(model, "fp8", calculate=False) == "default"
    assert "no k/v scales for 2 of 2 layers; using 1.0" in caplog.text
    assert "calculate_kv_scales=True" in caplog.text
    assert prepare_kv_scales(model, "fp8", calculate=True) == "calibration"
    assert all(layer.calibrate_kv_scales for layer in attention_layers(model))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("fp8-llama"), "llama")


@pytest.fixture(scope="module")
def auto_run(checkpoint):
    """Greedy tokens of the model-dtype KV cache, and its teacher-forced logprobs on them."""
    llm = make_llm(checkpoint, num_gpu_blocks_override=256)
    tokens = [o.outputs[0].token_ids
              for o in llm.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)]
    forced = _teacher_forced(llm, tokens)
    assert_no_leaks(llm)
    llm.shutdown()
    return tokens, forced


def _teacher_forced(llm, tokens):
    """Per prompt, the (logprob, top token) at each of `tokens`' positions, computed from the
    prompt plus the reference tokens (prompt logprobs: every position attends through the
    paged cache, so quantized K/V matter, and a flip does not derail the positions after it)."""
    sequences = [prompt + list(generated) for prompt, generated in zip(PROMPTS, tokens,
                                                                       strict=True)]
    outputs = llm.generate(sequences, SamplingParams(temperature=0.0, max_tokens=1,
                                                     prompt_logprobs=1), use_tqdm=False)
    return [[(entry.logprob, entry.top[0][0]) for entry in output.prompt_logprobs[len(prompt):]]
            for output, prompt in zip(outputs, PROMPTS, strict=True)]


@pytest.mark.parametrize("calculate_kv_scales", [False, True], ids=["scale-1", "calibrated"])
def test_fp8_engine_tracks_the_auto_engine(checkpoint, auto_run, calculate_kv_scales):
    reference_tokens, reference_forced = auto_run
    llm = make_llm(checkpoint, num_gpu_blocks_override=256, kv_cache_dtype="fp8",
                   calculate_kv_scales=calculate_kv_scales)
    info = llm.engine.model_info()
    assert info["kv_cache_dtype"] == "float8_e4m3fn"
    assert info["kv_cache_capacity_tokens"] == 256 * 4
    worker = llm.engine.executor.worker
    assert {cache.dtype for pair in worker.runner.kv_caches for cache in pair} == {F8}
    layers = attention_layers(worker.model)
    tokens = [o.outputs[0].token_ids
              for o in llm.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)]
    forced = _teacher_forced(llm, reference_tokens)
    if calculate_kv_scales:  # the first prefill set every layer's scales
        assert not any(layer.calibrate_kv_scales for layer in layers)
        assert all(layer.k_scale.item() != 1.0 and layer.v_scale.item() != 1.0
                   for layer in layers)
    assert_no_leaks(llm)
    llm.shutdown()
    pairs = [(ours, theirs) for ours_row, theirs_row in zip(forced, reference_forced, strict=True)
             for ours, theirs in zip(ours_row, theirs_row, strict=True)]
    top_agreement = sum(ours[1] == theirs[1] for ours, theirs in pairs) / len(pairs)
    logprob_diffs = [abs(ours[0] - theirs[0]) for ours, theirs in pairs]
    # Measured on this random tiny model (flat distributions, the hardest case): 0.88-0.91 of
    # the positions keep their top token and the mean |d logprob| is 0.06 (max 0.44).
    assert top_agreement >= 0.8
    assert sum(logprob_diffs) / len(pairs) <= 0.1
    assert max(logprob_diffs) > 1e-3  # the cache really is quantized
    # Free-running greedy: the first token comes from the prefill alone (13-15 of 16 agree).
    assert sum(ours[0] == theirs[0] for ours, theirs in zip(tokens, reference_tokens,
                                                              strict=True)) >= 12


def test_fp8_blocks_survive_swap_preemption_byte_for_byte(checkpoint):
    # Swapping moves the quantized bytes unchanged, so a tight pool that preempts by swapping
    # gives exactly the greedy tokens of an ample fp8 pool.
    ample = make_llm(checkpoint, num_gpu_blocks_override=256, kv_cache_dtype="fp8")
    expected = [o.outputs[0].token_ids for o in ample.generate(make_prompts(), greedy(),
                                                               use_tqdm=False)]
    ample.shutdown()
    tight = make_llm(checkpoint, num_gpu_blocks_override=28, swap_space_gib=1e-4,
                     kv_cache_dtype="fp8")
    with StepSpy(tight) as log:
        outputs = tight.generate(make_prompts(), greedy(), use_tqdm=False)
    assert log.swap_out > 0 and log.swap_in == log.swap_out
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert_no_leaks(tight)
    tight.shutdown()


@pytest.mark.parametrize("tp_size", [1, 2])
def test_worker_holds_twice_the_bf16_blocks_per_rank(checkpoint, tp_size):
    from pagedserve.workers.worker import Worker

    def blocks(kv_cache_dtype):
        config = EngineConfig(dtype="bfloat16", kv_cache_dtype=kv_cache_dtype,
                              kv_cache_memory_gib=2**-10, tensor_parallel_size=tp_size)
        worker = Worker(config, str(checkpoint), "cpu", rank=tp_size - 1, world_size=tp_size)
        return worker.num_gpu_blocks(2048), worker.describe()["kv_cache_dtype"]

    (bf16, bf16_name), (fp8, fp8_name) = blocks("auto"), blocks("fp8")
    assert (bf16_name, fp8_name) == ("bfloat16", "float8_e4m3fn")
    # 1 MiB per rank; a block is 2 layers x 16 tokens x (K, V) x 2 / tp KV heads x 16 dims:
    # 4096 / tp bytes in bf16, 2048 / tp in fp8.
    assert (bf16, fp8) == (256 * tp_size, 512 * tp_size)


def test_model_info_carries_the_kv_dtype_and_capacity_over_the_wire(checkpoint):
    from pagedserve.client.results import ModelInfo
    from pagedserve.cluster.coordinator_server import model_info_to_proto

    llm = make_llm(checkpoint, num_gpu_blocks_override=64, kv_cache_dtype="fp8")
    engine_info = llm.engine.model_info()
    llm.shutdown()
    info = {"model": "m", "eos_token_ids": [2], "tensor_parallel_size": 1, "max_num_seqs": 8,
            "num_gpu_blocks": 64, **engine_info}
    received = ModelInfo.from_proto(model_info_to_proto(info))
    assert (received.kv_cache_dtype, received.kv_cache_capacity_tokens) == ("float8_e4m3fn", 256)
    assert received.num_kv_blocks * received.block_size == received.kv_cache_capacity_tokens
