"""Seeded sampling is reproducible and independent of the batch; n > 1 forks sequences that
share the prompt's blocks (copy-on-write), child k seeded with seed + k."""

from __future__ import annotations

import pytest

from pagedserve.sampling_params import SamplingParams
from tests.engine.engine_utils import (
    StepSpy,
    assert_no_leaks,
    greedy,
    make_llm,
    make_prompts,
    token_ids,
)

PROMPTS = make_prompts((5, 10, 23), seed=5)
MAX_TOKENS = 16


def sampled(seed: int | None, **kwargs) -> SamplingParams:
    kwargs.setdefault("temperature", 1.0)
    return SamplingParams(seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return make_llm(checkpoint("llama"), num_gpu_blocks_override=128)


def run_one(llm, prompt, params) -> list[int]:
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    return output.outputs[0].token_ids


def test_same_seed_same_tokens_across_calls(llm):
    first = run_one(llm, PROMPTS[1], sampled(7))
    second = run_one(llm, PROMPTS[1], sampled(7))
    assert first == second
    assert len(first) == MAX_TOKENS
    assert_no_leaks(llm)


def test_seeded_request_independent_of_batch(llm):
    params = sampled(11, top_k=50, top_p=0.9)
    alone = run_one(llm, PROMPTS[1], params)
    others = [sampled(None), sampled(3, temperature=0.7), greedy(MAX_TOKENS)]
    batch = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]],
                         [others[0], params, others[1], others[2]], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    # ... and in another position of a different batch.
    batch = llm.generate([PROMPTS[2], PROMPTS[1]], [others[1], params], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    assert_no_leaks(llm)


def test_different_seeds_differ(llm):
    outputs = {seed: tuple(run_one(llm, PROMPTS[0], sampled(seed))) for seed in range(4)}
    assert len(set(outputs.values())) == 4


def test_sampling_is_not_greedy(llm):
    greedy_ids = run_one(llm, PROMPTS[0], greedy(MAX_TOKENS))
    samples = [run_one(llm, PROMPTS[0], sampled(seed, temperature=1.5)) for seed in range(3)]
    assert any(s != greedy_ids for s in samples)


@pytest.mark.parametrize("engine_args", [
    {"num_gpu_blocks_override": 14},
    {"num_gpu_blocks_override": 14, "swap_space_gib": 1e-4},
    {"num_gpu_blocks_override": 128, "max_num_batched_tokens": 4},
], ids=["recompute", "swap", "chunked"])
def test_seeded_sampling_survives_preemption_and_chunking(llm, checkpoint, engine_args):
    reference = [run_one(llm, p, sampled(100 + i)) for i, p in enumerate(PROMPTS)]
    small = make_llm(checkpoint("llama"), **engine_args)
    outputs = small.generate(PROMPTS, [sampled(100 + i) for i in range(len(PROMPTS))],
                             use_tqdm=False)
    assert token_ids(outputs) == reference
    if "max_num_batched_tokens" not in engine_args:
        assert small.engine.scheduler.num_preemptions > 0
    assert_no_leaks(small)


def test_n_greedy_gives_identical_hf_sequences(llm, checkpoint, hf):
    path = checkpoint("llama")
    for prompt in (PROMPTS[1], [17]):  # a one-token prompt forks before any prefill
        (output,) = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=10,
                                                         ignore_eos=True), use_tqdm=False)
        expected = hf.generate(path, prompt, 10)
        assert [o.index for o in output.outputs] == [0, 1, 2]
        assert [o.token_ids for o in output.outputs] == [expected] * 3
        assert all(o.finish_reason == "length" for o in output.outputs)
        assert output.usage.completion_tokens == 30
    assert_no_leaks(llm)


def test_n_seeded_child_k_equals_seed_plus_k(llm):
    prompt = PROMPTS[1]  # 10 tokens: the shared partial block (block size 4) is copied on write
    params = sampled(40, n=3, temperature=1.2)
    with StepSpy(llm) as log:
        (output,) = llm.generate([prompt], params, use_tqdm=False)
    assert log.copies >= 2  # 3 children share the partial last block: two of them copy it
    assert log.max_ref_count >= 3  # prompt blocks shared by all three children
    singles = [run_one(llm, prompt, sampled(40 + k, temperature=1.2)) for k in range(3)]
    assert [o.token_ids for o in output.outputs] == singles
    assert len({tuple(s) for s in singles}) == 3
    assert_no_leaks(llm)


@pytest.mark.parametrize("swap_space_gib", [0.0, 1e-4], ids=["recompute", "swap"])
def test_n_under_preemption_and_with_logprobs(swap_space_gib, checkpoint, hf):
    path = checkpoint("llama")
    small = make_llm(path, num_gpu_blocks_override=16, max_num_batched_tokens=8,
                     swap_space_gib=swap_space_gib)
    params = SamplingParams(n=4, temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = make_prompts((9, 14), seed=6)
    outputs = small.generate(prompts, params, use_tqdm=False)
    for output, prompt in zip(outputs, prompts, strict=True):
        expected = hf.generate(path, prompt, 12)
        for completion in output.outputs:
            assert completion.token_ids == expected
            assert [e.token_id for e in completion.logprobs] == expected
            assert completion.cumulative_logprob == pytest.approx(
                sum(e.logprob for e in completion.logprobs))
    assert small.engine.scheduler.num_preemptions > 0
    assert_no_leaks(small)


def test_n_seeded_under_swap_matches_roomy_engine(llm, checkpoint):
    params = [sampled(60 + i, n=3, temperature=1.3) for i in range(len(PROMPTS))]
    roomy = llm.generate(PROMPTS, params, use_tqdm=False)
    small = make_llm(checkpoint("llama"), num_gpu_blocks_override=14, swap_space_gib=1e-4)
    with StepSpy(small) as log:
        tight = small.generate(PROMPTS, params, use_tqdm=False)
    assert log.swap_out > 0
    assert [[c.token_ids for c in o.outputs] for o in tight] == \
        [[c.token_ids for c in o.outputs] for o in roomy]
    assert_no_leaks(small)


def test_seeded_sampling_with_all_filters_and_penalties(llm):
    params = sampled(5, temperature=0.8, top_k=20, top_p=0.8, min_p=0.05,
                     repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5,
                     logit_bias={7: 3.0})
    first = run_one(llm, PROMPTS[2], params)
    batch = llm.generate(PROMPTS, [sampled(1), sampled(2), params], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == first
    assert_no_leaks(llm)
