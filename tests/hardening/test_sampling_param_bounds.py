"""Sampling parameters that become tensors or generator seeds are bounded when constructed, and
errors are `errors.InvalidArgument` (a ValueError) from the shared validation helpers."""

from __future__ import annotations

import re

import pytest
import torch

from pagedserve.errors import InvalidArgument
from pagedserve.sampling_params import MAX_SEED, MAX_TOP_K, BeamSearchParams, SamplingParams
from pagedserve.workers.sampler import sample
from pagedserve.workers.sampling_batch import SamplingBatch

VOCAB = 50
TOP_K_RULE = "-1 or 0 (no limit) or an integer in [1, 2147483647]"


def test_bounds_are_the_documented_ones():
    assert MAX_TOP_K == 2_147_483_647
    assert MAX_SEED == 18_446_744_073_709_551_615


@pytest.mark.parametrize("top_k", [2**63, 2**31, -2, True, 3.0])
def test_top_k_outside_its_range_is_refused(top_k):
    message = f"SamplingParams.top_k must be {TOP_K_RULE}, got {top_k!r}"
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        SamplingParams(top_k=top_k)


@pytest.mark.parametrize(("top_k", "stored"), [(-1, 0), (0, 0), (1, 1), (MAX_TOP_K, MAX_TOP_K)])
def test_top_k_inside_its_range_is_kept(top_k, stored):
    assert SamplingParams(top_k=top_k).top_k == stored


def _batch(**params) -> SamplingBatch:
    return SamplingBatch.from_requests([(SamplingParams(**params), [1, 2], [])], VOCAB)


@pytest.mark.parametrize("top_k", [VOCAB, VOCAB + 1, MAX_TOP_K])
def test_top_k_at_or_beyond_the_vocabulary_means_no_limit(top_k):
    batch = _batch(top_k=top_k, seed=7)
    assert batch.top_k is None  # the filter is skipped, as for top_k=0
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))
    limited = sample(logits, batch).token_ids.tolist()
    assert limited == sample(logits, _batch(top_k=0, seed=7)).token_ids.tolist()


def test_top_k_below_the_vocabulary_still_filters():
    batch = _batch(top_k=VOCAB - 1)
    assert batch.top_k.tolist() == [VOCAB - 1]
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 10.0
    assert sample(logits, _batch(top_k=1, seed=5)).token_ids.tolist() == [3]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seed": -1}, "SamplingParams.seed must be None or an integer in "
                   "[0, 18446744073709551615], got -1"),
    ({"seed": 2**64}, "SamplingParams.seed must be None or an integer in "
                      "[0, 18446744073709551615], got 18446744073709551616"),
    # Sequence i of n samples with seed + i, so n = 3 leaves room for two more seeds.
    ({"seed": 2**64 - 2, "n": 3}, "SamplingParams.seed must be None or an integer in "
                                  "[0, 18446744073709551613], got 18446744073709551614"),
    ({"seed": 1.5}, "SamplingParams.seed must be None or an integer in "
                    "[0, 18446744073709551615], got 1.5"),
    ({"seed": False}, "SamplingParams.seed must be None or an integer in "
                      "[0, 18446744073709551615], got False"),
])
def test_seed_outside_its_range_is_refused(kwargs, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(("seed", "n"), [(0, 1), (MAX_SEED, 1), (MAX_SEED - 2, 3)])
def test_largest_seeds_sample_without_overflow(seed, n):
    params = SamplingParams(seed=seed, n=n)
    # The largest child seed (seed + n - 1) still makes a generator and samples.
    child = SamplingParams(seed=seed + n - 1)
    batch = SamplingBatch.from_requests([(child, [1], [4, 5])], VOCAB)
    assert batch.generators[0] is not None
    assert sample(torch.randn(1, VOCAB), batch).token_ids.shape == (1,)
    assert params.seed == seed


@pytest.mark.parametrize(("field", "kwargs"), [
    ("logit_bias", {"logit_bias": {2**63: 1.0}}),
    ("stop_token_ids", {"stop_token_ids": [2**63]}),
])
def test_huge_token_ids_are_refused_against_the_vocabulary(field, kwargs):
    """Token ids are bounded by the vocabulary (check_vocab, before any tensor is built)."""
    params = SamplingParams(**kwargs)
    message = (f"SamplingParams.{field} must be token ids < vocab size {VOCAB}, "
               f"got {2**63}")
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        params.check_vocab(VOCAB)


def test_huge_token_ids_never_reach_a_tensor():
    """Even without check_vocab the batch refuses them with a ValueError, not an overflow."""
    params = SamplingParams(logit_bias={2**63: 1.0}, stop_token_ids=[2**64], min_tokens=2)
    with pytest.raises(ValueError, match=re.escape(f"must be < vocab size {VOCAB}, got "
                                                   f"[{2**63}, {2**64}]")):
        SamplingBatch.from_requests([(params, [1], [])], VOCAB)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 0}, "SamplingParams.n must be an integer >= 1, got 0"),
    ({"temperature": float("inf")}, "SamplingParams.temperature must be a finite number >= 0, "
                                    "got inf"),
    ({"top_p": float("nan")}, "SamplingParams.top_p must be in (0, 1], got nan"),
    ({"logit_bias": {1: float("nan")}}, "SamplingParams.logit_bias must be valued in "
                                        "[-100, 100], got nan"),
    ({"repetition_penalty": float("inf")}, "SamplingParams.repetition_penalty must be a "
                                           "finite number > 0, got inf"),
])
def test_sampling_params_errors_are_invalid_argument(kwargs, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"beam_width": 0}, "BeamSearchParams.beam_width must be an integer >= 1, got 0"),
    ({"max_tokens": True}, "BeamSearchParams.max_tokens must be an integer >= 1, got True"),
    ({"ignore_eos": 1}, "BeamSearchParams.ignore_eos must be True or False, got 1"),
    ({"length_penalty": float("inf")}, "BeamSearchParams.length_penalty must be a finite "
                                       "number, got inf"),
])
def test_beam_search_params_errors_are_invalid_argument(kwargs, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        BeamSearchParams(**kwargs)
