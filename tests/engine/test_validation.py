"""Bad input is rejected with the field named, and the engine keeps working without leaks."""

from __future__ import annotations

import math

import pytest

from pagedserve.config import EngineConfig
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from tests.engine.engine_utils import (
    MAX_TOKENS,
    VOCAB,
    assert_no_leaks,
    greedy,
    make_llm,
    make_prompts,
    token_ids,
)

PROMPTS = make_prompts((5, 12), seed=9)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return make_llm(checkpoint("llama"), num_gpu_blocks_override=64, max_model_len=64)


@pytest.fixture(scope="module")
def expected(checkpoint, hf):
    return hf.generate_all(checkpoint("llama"), PROMPTS, MAX_TOKENS)


def still_works(llm, expected) -> None:
    assert_no_leaks(llm)
    assert token_ids(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == expected
    assert_no_leaks(llm)


@pytest.mark.parametrize(("field", "kwargs"), [
    ("n", {"n": 0}),
    ("temperature", {"temperature": -0.5}),
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": math.inf}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_p", {"top_p": math.nan}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": 2.5}),
    ("min_p", {"min_p": 1.5}),
    ("min_p", {"min_p": math.nan}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": -3.0}),
    ("frequency_penalty", {"frequency_penalty": math.nan}),
    ("logit_bias", {"logit_bias": {-1: 1.0}}),
    ("logit_bias", {"logit_bias": {3: 101.0}}),
    ("logit_bias", {"logit_bias": {3: math.nan}}),
    ("seed", {"seed": 1.5}),
    ("max_tokens", {"max_tokens": 0}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 20, "max_tokens": 10}),
    ("stop", {"stop": [""]}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("logprobs", {"logprobs": 21}),
    ("prompt_logprobs", {"prompt_logprobs": -1}),
])
def test_bad_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(("field", "kwargs"), [
    ("beam_width", {"beam_width": 0}),
    ("max_tokens", {"max_tokens": 0}),
])
def test_bad_beam_search_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"BeamSearchParams\.{field}\b"):
        BeamSearchParams(**kwargs)


@pytest.mark.parametrize(("field", "kwargs"), [
    ("block_size", {"block_size": 3}),
    ("dtype", {"dtype": "float64"}),
    ("device", {"device": "tpu"}),
    ("swap_space_gib", {"swap_space_gib": -1.0}),
    ("num_gpu_blocks_override", {"num_gpu_blocks_override": 0}),
    ("max_num_batched_tokens", {"max_num_batched_tokens": 0}),
    ("max_num_seqs", {"max_num_seqs": 0}),
    ("gpu_memory_utilization", {"gpu_memory_utilization": 1.5}),
])
def test_bad_engine_config_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


@pytest.mark.parametrize(("match", "prompt", "params"), [
    ("prompt_token_ids", [5, VOCAB], None),
    ("prompt_token_ids", [-1, 5], None),
    ("prompt_token_ids", [5, 2.0], None),
    ("at least one token", [], None),
    ("max_model_len", list(range(3, 67)), None),
    ("logit_bias", [5, 6], SamplingParams(logit_bias={VOCAB: 1.0})),
    ("stop_token_ids", [5, 6], SamplingParams(stop_token_ids=[VOCAB + 7])),
    ("tokenizer", [5, 6], SamplingParams(stop=["x"])),  # no tokenizer in the tiny checkpoint
    ("no tokenizer", "some text", None),
])
def test_bad_requests_rejected_and_engine_recovers(llm, expected, match, prompt, params):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt if isinstance(prompt, str) else [prompt], params, use_tqdm=False)
    still_works(llm, expected)


def test_bad_request_in_the_middle_of_a_batch(llm, expected):
    """The good requests queued before the bad one are withdrawn, not left running."""
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([PROMPTS[0], PROMPTS[1], [1, VOCAB + 1]], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(PROMPTS, [greedy(), SamplingParams(logit_bias={10 ** 6: 1.0})],
                     use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(PROMPTS, [greedy()], use_tqdm=False)
    still_works(llm, expected)


@pytest.mark.parametrize(("match", "bad_prompt"), [
    ("prompt_token_ids", [VOCAB]),  # out of vocabulary: used to crash in the embedding
    ("prompt_token_ids", [4, -3]),
    ("max_model_len", list(range(3, 67))),  # used to leave the first prompt's beam queued
])
def test_bad_beam_search_prompt_rejected_without_leaks(llm, expected, match, bad_prompt):
    with pytest.raises(ValueError, match=match):
        llm.beam_search([PROMPTS[0], bad_prompt], BeamSearchParams(beam_width=2, max_tokens=3))
    still_works(llm, expected)


def test_abort_mid_generation_frees_blocks(llm, expected):
    engine = llm.engine
    engine.add_request("abort-me", PROMPTS[1], SamplingParams(max_tokens=30, ignore_eos=True,
                                                              n=2))
    engine.add_request("keep-me", PROMPTS[0], greedy())
    for _ in range(3):
        engine.step()
    assert engine.scheduler.kv.num_free_blocks < engine.scheduler.kv.pool.num_blocks
    engine.abort_request("abort-me")
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["keep-me"]
    assert finished[0].outputs[0].token_ids == expected[0]
    still_works(llm, expected)


def test_duplicate_request_id_rejected(llm, expected):
    engine = llm.engine
    engine.add_request("dup", PROMPTS[0], greedy())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", PROMPTS[1], greedy())
    while engine.has_unfinished_requests():
        engine.step()
    still_works(llm, expected)


def test_logit_bias_and_stop_token_ids_take_effect(llm):
    (forced,) = llm.generate([PROMPTS[0]], greedy(max_tokens=4, logit_bias={77: 100.0}),
                             use_tqdm=False)
    assert forced.outputs[0].token_ids == [77] * 4
    (stopped,) = llm.generate([PROMPTS[0]], greedy(max_tokens=8, logit_bias={77: 100.0},
                                                   stop_token_ids=[77]), use_tqdm=False)
    assert stopped.outputs[0].token_ids == [77]
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == 77
    assert_no_leaks(llm)


def test_swap_space_smaller_than_one_block_names_swap_space(checkpoint):
    with pytest.raises(ValueError, match="swap_space_gib"):
        make_llm(checkpoint("llama"), num_gpu_blocks_override=64, swap_space_gib=1e-12)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scheduling_policy": "lifo"}, r"EngineConfig.scheduling_policy must be one of "
                                    r"\('fcfs', 'priority'\), got 'lifo'"),
    ({"seed": "x"}, "EngineConfig.seed must be an integer, got 'x'"),
    ({"max_model_len": 1}, "EngineConfig.max_model_len must be None or an integer >= 2, got 1"),
    ({"enforce_eager": "no"}, "EngineConfig.enforce_eager must be True or False, got 'no'"),
    ({"enable_prefix_caching": 1}, "EngineConfig.enable_prefix_caching must be True or False"),
])
def test_engine_config_names_the_bad_field(kwargs, message):
    from pagedserve.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        EngineConfig(**kwargs)


def test_a_token_budget_below_max_model_len_without_chunking_is_refused(checkpoint):
    with pytest.raises(ValueError, match=r"EngineConfig.max_num_batched_tokens must be >= "
                                         r"max_model_len \(64\) when enable_chunked_prefill is "
                                         r"False, got 32"):
        make_llm(checkpoint("llama"), max_model_len=64, max_num_batched_tokens=32,
                 enable_chunked_prefill=False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"length_penalty": float("nan")}, "BeamSearchParams.length_penalty must be a finite number"),
    ({"ignore_eos": "yes"}, "BeamSearchParams.ignore_eos must be True or False, got 'yes'"),
    ({"beam_width": True}, "BeamSearchParams.beam_width must be an integer >= 1, got True"),
])
def test_beam_search_params_name_the_bad_field(kwargs, message):

    with pytest.raises(ValueError, match=message):
        BeamSearchParams(**kwargs)
