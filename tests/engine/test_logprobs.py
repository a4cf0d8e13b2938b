"""Sampled-token and prompt logprobs equal transformers' log_softmax (raw distribution)."""

from __future__ import annotations

import pytest

from pagedserve.sampling_params import SamplingParams
from tests.engine.engine_utils import assert_no_leaks, make_llm, make_prompts

PROMPTS = make_prompts((1, 6, 13, 30), seed=8)
TOL = 1e-4


def check_sample_logprobs(completion, full_logprobs, num_prompt: int, k: int) -> None:
    assert len(completion.logprobs) == len(completion.token_ids)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs,
                                              strict=True)):
        row = full_logprobs[num_prompt - 1 + step]
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(row[token].item(), abs=TOL)
        assert entry.rank == 1  # greedy picks the most likely token
        assert len(entry.top) == k
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
        assert entry.top[0][0] == token
        for token_id, value in entry.top:
            assert value == pytest.approx(row[token_id].item(), abs=TOL)
        expected_top = row.topk(k).indices.tolist()
        assert [t for t, _ in entry.top] == expected_top
    assert completion.cumulative_logprob == pytest.approx(
        sum(full_logprobs[num_prompt - 1 + i][t].item()
            for i, t in enumerate(completion.token_ids)), abs=10 * TOL)


def check_prompt_logprobs(output, full_logprobs, k: int) -> None:
    prompt = output.prompt_token_ids
    assert len(output.prompt_logprobs) == len(prompt)
    assert output.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry = output.prompt_logprobs[position]
        row = full_logprobs[position - 1]
        assert entry.token_id == prompt[position]
        assert entry.logprob == pytest.approx(row[prompt[position]].item(), abs=TOL)
        assert entry.rank == int((row > row[prompt[position]]).sum()) + 1
        assert len(entry.top) == k
        assert [t for t, _ in entry.top] == row.topk(k).indices.tolist()
        for token_id, value in entry.top:
            assert value == pytest.approx(row[token_id].item(), abs=TOL)


@pytest.mark.parametrize("engine_args", [
    {"num_gpu_blocks_override": 128},
    {"num_gpu_blocks_override": 128, "max_num_batched_tokens": 8},
    {"num_gpu_blocks_override": 16},
], ids=["plain", "chunked-prefill", "preemption"])
def test_logprobs_match_hf(engine_args, checkpoint, hf):
    path = checkpoint("qwen2")
    llm = make_llm(path, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3,
                            prompt_logprobs=4)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for output, prompt in zip(outputs, PROMPTS, strict=True):
        completion = output.outputs[0]
        assert completion.token_ids == hf.generate(path, prompt, 10)
        full = hf.log_softmax(path, prompt + completion.token_ids)
        check_sample_logprobs(completion, full, len(prompt), 3)
        check_prompt_logprobs(output, full, 4)
    if engine_args["num_gpu_blocks_override"] == 16:
        assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm)


def test_logprobs_zero_and_mixed_batch(checkpoint, hf):
    """logprobs=0 gives only the chosen token; requests without logprobs get None; a request
    with prompt_logprobs is not served from the prefix cache (it needs every position)."""
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=128)
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=0,
                             logprobs=20)]
    prompt = PROMPTS[3]
    llm.generate([prompt], params[1], use_tqdm=False)  # fills the prefix cache
    outputs = llm.generate([prompt] * 3, params, use_tqdm=False)
    full = hf.log_softmax(path, prompt + outputs[0].outputs[0].token_ids)
    first, second, third = outputs
    assert all(e.top == [] for e in first.outputs[0].logprobs)
    assert first.outputs[0].logprobs[0].logprob == pytest.approx(
        full[len(prompt) - 1][first.outputs[0].token_ids[0]].item(), abs=TOL)
    assert second.outputs[0].logprobs is None and second.prompt_logprobs is None
    assert second.outputs[0].cumulative_logprob is None
    assert second.metrics.num_cached_tokens > 0
    assert third.metrics.num_cached_tokens == 0
    check_prompt_logprobs(third, full, 0)
    check_sample_logprobs(third.outputs[0], full, len(prompt), 20)
    assert_no_leaks(llm)


def test_sampled_token_logprob_and_rank(checkpoint, hf):
    """With temperature > 0 the reported logprob is still the raw model's, with its rank."""
    path = checkpoint("llama")
    llm = make_llm(path, num_gpu_blocks_override=128)
    params = SamplingParams(temperature=2.0, seed=3, max_tokens=12, ignore_eos=True, logprobs=2)
    (output,) = llm.generate([PROMPTS[2]], params, use_tqdm=False)
    completion = output.outputs[0]
    full = hf.log_softmax(path, PROMPTS[2] + completion.token_ids)
    ranks = []
    for step, entry in enumerate(completion.logprobs):
        row = full[len(PROMPTS[2]) - 1 + step]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=TOL)
        assert entry.rank == int((row > row[entry.token_id]).sum()) + 1
        ranks.append(entry.rank)
    assert max(ranks) > 1  # temperature 2 does pick less likely tokens
    assert_no_leaks(llm)
