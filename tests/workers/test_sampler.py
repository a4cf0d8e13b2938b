"""Batched sampler: exact results where the answer is determined, statistics where it is not."""

from __future__ import annotations

import pytest
import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.workers.sampler import apply_penalties, compute_prompt_logprobs, sample
from pagedserve.workers.sampling_batch import SamplingBatch, SamplingRequest

VOCAB = 50


def make_batch(params: list[SamplingParams], prompts=None, outputs=None, vocab=VOCAB,
               **kwargs) -> SamplingBatch:
    prompts = prompts or [[1, 2, 3]] * len(params)
    outputs = outputs or [[]] * len(params)
    return SamplingBatch.from_requests(
        [SamplingRequest(p, prompt, output) for p, prompt, output in
         zip(params, prompts, outputs, strict=True)], vocab, **kwargs)


def random_logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


CHI_SQUARE_3_DOF_P999 = 16.27  # 99.9% quantile with 3 degrees of freedom


def test_greedy_is_argmax():
    logits = random_logits(6)
    out = sample(logits, make_batch([SamplingParams(temperature=0)] * 6))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None


def test_greedy_ties_and_nan_pick_what_argmax_picks():
    # (the CPU path takes max's indices, not argmax: the first maximum, NaN as the maximum)
    logits = torch.randint(0, 3, (64, VOCAB), generator=torch.Generator().manual_seed(5)).float()
    logits[3, [7, 40]] = float("nan")
    logits[4] = float("-inf")
    logits[4, [9, 30]] = 2.0
    out = sample(logits, make_batch([SamplingParams(temperature=0)] * 64))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids[3] == 7 and out.token_ids[4] == 9


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=2.0, top_p=1e-6),
    SamplingParams(temperature=1.0, min_p=1.0),
], ids=["top_k=1", "tiny top_p", "min_p=1"])
def test_filters_that_leave_one_token_equal_greedy(params):
    logits = random_logits(64, seed=1)
    out = sample(logits, make_batch([params] * 64), generator=seeded())
    assert torch.equal(out.token_ids, logits.argmax(-1))


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def sample_many(params: SamplingParams, rows: int = 20000) -> torch.Tensor:
    logits = PROBS.log().expand(rows, -1).clone()
    return sample(logits, make_batch([params] * rows, vocab=4), generator=seeded()).token_ids


def test_sampled_distribution_matches_softmax():
    tokens = sample_many(SamplingParams(temperature=1.0))
    assert chi_square(tokens, PROBS) < CHI_SQUARE_3_DOF_P999


def test_temperature_sharpens_distribution():
    tokens = sample_many(SamplingParams(temperature=0.5))
    assert chi_square(tokens, PROBS**2 / (PROBS**2).sum()) < CHI_SQUARE_3_DOF_P999


@pytest.mark.parametrize(("params", "kept"), [
    (SamplingParams(top_k=2), [0, 1]),
    (SamplingParams(top_p=0.7), [0, 1]),  # mass before token 2 is 0.8 > 0.7
    (SamplingParams(top_p=0.85), [0, 1, 2]),
    (SamplingParams(min_p=0.2), [0, 1, 2]),  # 0.05 < 0.2 * 0.5
    (SamplingParams(top_k=3, top_p=0.7), [0, 1]),
])
def test_filters_keep_the_right_tokens_in_proportion(params, kept):
    tokens = sample_many(params, rows=8000)
    assert sorted(tokens.unique().tolist()) == kept
    renormalised = PROBS[kept] / PROBS[kept].sum()
    counts = torch.bincount(tokens, minlength=4)[kept].double()
    assert torch.allclose(counts / len(tokens), renormalised.double(), atol=0.03)


def test_penalties_on_a_hand_built_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    batch = make_batch([params], prompts=[[0, 1]], outputs=[[3, 3, 2]], vocab=5)
    expected = torch.tensor([[
        2.0 / 2,  # prompt token, positive logit: divided
        -1.0 * 2,  # prompt token, negative logit: multiplied
        0.5 / 2 - 0.25 * 1 - 0.5,  # generated once
        3.0 / 2 - 0.25 * 2 - 0.5,  # generated twice
        -2.0,  # never seen
    ]])
    assert torch.equal(apply_penalties(logits, batch), expected)


def test_penalties_are_per_row():
    logits = torch.zeros(2, 5) + 1.0
    batch = make_batch([SamplingParams(frequency_penalty=1.0), SamplingParams()],
                       outputs=[[4, 4], [4, 4]], vocab=5)
    penalised = apply_penalties(logits, batch)
    assert penalised[0].tolist() == [1.0, 1.0, 1.0, 1.0, -1.0]
    assert penalised[1].tolist() == [1.0] * 5


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    batch = make_batch([SamplingParams(temperature=0, repetition_penalty=1.5)],
                       prompts=[[0]], vocab=3)
    assert sample(logits, batch).token_ids.tolist() == [1]


def test_logit_bias_forces_a_token():
    logits = random_logits(8, seed=2)
    params = [SamplingParams(temperature=t, logit_bias={7: 100.0}) for t in (0, 1.0, 1.5, 0.7)]
    out = sample(logits[:4], make_batch(params), generator=seeded())
    assert out.token_ids.tolist() == [7, 7, 7, 7]


def test_min_tokens_blocks_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 7.0]] * 3)
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    batch = SamplingBatch.from_requests(
        [(params, [0], []), (params, [0], [1]), (params, [0], [1, 1])], 5, eos_token_ids=[2])
    assert sample(logits, batch).token_ids.tolist() == [4, 4, 2]


def test_seeded_sampling_is_independent_of_batch_composition():
    target = SamplingParams(temperature=1.0, seed=42)
    logits = random_logits(5, seed=3)
    alone = sample(logits[2:3], make_batch([target], outputs=[[5, 6]])).token_ids
    others = [SamplingParams(temperature=0.8), SamplingParams(temperature=0),
              target, SamplingParams(temperature=1.3, seed=7), SamplingParams(top_k=3)]
    for batch_seed in range(5):
        mixed = sample(logits, make_batch(others, outputs=[[1]] * 2 + [[5, 6]] + [[]] * 2),
                       generator=torch.Generator().manual_seed(batch_seed)).token_ids
        assert mixed[2] == alone[0]


def test_seeded_sampling_varies_by_step_and_seed():
    logits = torch.zeros(1, VOCAB)  # uniform: any repetition would be a coincidence
    tokens = {(seed, step): sample(logits, make_batch(
        [SamplingParams(seed=seed)], outputs=[[0] * step])).token_ids.item()
        for seed in (1, 2) for step in range(6)}
    assert len(set(tokens.values())) > 6


def test_seeded_rows_follow_the_softmax():
    rows = 6000
    logits = PROBS.log().expand(rows, -1).clone()
    batch = make_batch([SamplingParams(seed=seed) for seed in range(rows)], vocab=4)
    assert chi_square(sample(logits, batch).token_ids, PROBS) < CHI_SQUARE_3_DOF_P999


def test_explicit_generators_are_used_and_advance():
    logits = random_logits(1, seed=4)

    def draw(generator: torch.Generator) -> list[int]:
        # A new batch every step, as the engine builds; the generator carries the state.
        return [sample(logits, SamplingBatch.from_requests(
            [(SamplingParams(), [1], [], generator)], VOCAB)).token_ids.item() for _ in range(8)]

    first, second = draw(torch.Generator().manual_seed(9)), draw(torch.Generator().manual_seed(9))
    assert first == second and len(set(first)) > 1


def test_logprobs_are_from_the_raw_distribution():
    logits = random_logits(3, seed=5)
    params = [SamplingParams(temperature=0.7, logprobs=2, repetition_penalty=1.3),
              SamplingParams(temperature=0, logprobs=5, logit_bias={3: 50.0}),
              SamplingParams(temperature=1.0)]
    out = sample(logits, make_batch(params), generator=seeded())
    expected = torch.log_softmax(logits, dim=-1)
    lp = out.logprobs
    assert lp.top_logprobs.shape == (3, 5)
    assert torch.equal(lp.token_ids, out.token_ids)
    assert torch.equal(lp.token_logprobs, expected.gather(1, out.token_ids[:, None])[:, 0])
    assert torch.equal(lp.top_logprobs, expected.topk(5).values)
    assert torch.equal(lp.top_token_ids, expected.topk(5).indices)
    assert out.token_ids[1] == 3
    order = expected.argsort(dim=-1, descending=True)
    for row in range(3):
        rank = (order[row] == out.token_ids[row]).nonzero().item() + 1
        assert lp.token_ranks[row] == rank


def test_prompt_logprobs():
    logits = random_logits(4, seed=6)
    next_tokens = torch.tensor([3, 0, 49, 7])
    result = compute_prompt_logprobs(logits, next_tokens, num_top=2)
    expected = torch.log_softmax(logits, dim=-1)
    assert torch.equal(result.token_logprobs, expected[torch.arange(4), next_tokens])
    assert torch.equal(result.top_logprobs, expected.topk(2).values)
    assert torch.equal(result.top_token_ids, expected.topk(2).indices)
    assert torch.equal(result.token_ranks, (expected > result.token_logprobs[:, None]).sum(-1) + 1)


def test_all_greedy_batch_skips_sampling_tensors():
    batch = make_batch([SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.1)] * 2)
    assert batch.all_greedy
    assert batch.top_k is None and batch.top_p is None and batch.min_p is None
    assert batch.prompt_token_ids is None and batch.output_token_ids is None


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"logits must be \[2, 50\], got \(2, 49\)"):
        sample(torch.zeros(2, 49), make_batch([SamplingParams()] * 2))
    with pytest.raises(ValueError, match="must be < vocab size 50, got \\[50\\]"):
        make_batch([SamplingParams(logit_bias={50: 1.0})])


def test_tiny_temperature_is_greedy():
    logits = random_logits(4, seed=8) * 100
    out = sample(logits, make_batch([SamplingParams(temperature=1e-9)] * 4), generator=seeded())
    assert torch.equal(out.token_ids, logits.argmax(-1))
