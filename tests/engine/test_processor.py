"""Prompt parsing and frontend checks (hostile inputs to `LLM.generate` and the processor)."""

from __future__ import annotations

import numpy as np
import pytest

from pagedserve.engine.processor import Processor, normalize_prompts
from pagedserve.errors import InvalidArgument, InvalidType


@pytest.mark.parametrize(("prompts", "expected"), [
    ("hi", ["hi"]),
    ([5, 6], [[5, 6]]),
    ({"prompt": "hi"}, ["hi"]),
    ({"prompt_token_ids": [7]}, [[7]]),
    (["a", [5], {"prompt": "b"}], ["a", [5], "b"]),
    ([], []),
])
def test_prompts_are_normalized(prompts, expected):
    assert normalize_prompts(prompts) == expected


@pytest.mark.parametrize(("prompts", "message"), [
    (None, "prompts must be a string, a list of token ids, or a dict with 'prompt' or "
           "'prompt_token_ids', or a list of those, got NoneType"),
    (5, "prompts must be .*, got int"),
    ((5, 6), "prompts must be .*, got tuple"),
    (b"hello", "prompts must be .*, got bytes"),
    (np.array([5, 6]), "prompts must be .*, got ndarray"),
    ([(5, 6)], r"prompts\[0\] must be a string, a list of token ids, or a dict .*, got tuple"),
    (["ok", b"x"], r"prompts\[1\] must be .*, got bytes"),
])
def test_other_prompt_types_are_refused_naming_the_argument(prompts, message):
    with pytest.raises(InvalidType, match=f"^{message}$"):
        normalize_prompts(prompts)


@pytest.mark.parametrize("prompt", [[[True, 5]], [[5, 2.0]], [[5, "6"]], [[None]]])
def test_token_ids_must_be_integers_not_bools(prompt):
    with pytest.raises(InvalidType, match=r"^prompts\[0\]: prompt_token_ids must be integers"):
        normalize_prompts(prompt)


def test_a_dict_without_a_prompt_is_refused():
    with pytest.raises(InvalidArgument, match=r"^prompts\[0\] must have 'prompt' or "
                                              r"'prompt_token_ids'$"):
        normalize_prompts([{"text": "hi"}])


class _Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 200 for c in text]


def test_a_lone_surrogate_is_refused_before_the_tokenizer_sees_it():
    processor = Processor(_Tokenizer())
    assert processor.prompt_token_ids("ok") == [111, 107]
    with pytest.raises(InvalidArgument, match="^prompt is not valid Unicode text "
                                              r"\(surrogates not allowed at position 2\)"):
        processor.prompt_token_ids("ab\ud800c")


def test_text_without_a_tokenizer_names_the_way_out():
    with pytest.raises(InvalidArgument, match="pass prompt_token_ids instead of text"):
        Processor(None).prompt_token_ids("hi")


def test_params_of_the_wrong_type_are_refused():
    with pytest.raises(InvalidType, match="^params must be SamplingParams or "
                                          "BeamSearchParams, got dict$"):
        Processor(_Tokenizer()).make_request("r", [5], {"temperature": 0})
