"""ModelLimits.check_prompt: the same answers on its fast path (plain ints) and its slow one."""

from __future__ import annotations

import enum

import pytest

from pagedserve.engine.limits import ModelLimits
from pagedserve.errors import InvalidArgument

LIMITS = ModelLimits(vocab_size=10, max_model_len=6, max_num_seqs=4)


class Token(enum.IntEnum):
    NINE = 9


@pytest.mark.parametrize("prompt", [[0], [9, 0, 5, 5, 1], [Token.NINE, 3]])
def test_accepted_prompts(prompt):
    LIMITS.check_prompt(prompt)


@pytest.mark.parametrize(("prompt", "message"), [
    ([3, 10, 4, -1, 11], r"integers in \[0, 10\), got \[10, -1, 11\]"),
    ([True, 2], r"integers in \[0, 10\), got \[True\]"),
    ([1, 2.0], r"integers in \[0, 10\), got \[2.0\]"),
    ([Token.NINE, -3], r"integers in \[0, 10\), got \[-3\]"),
    ([1] * 6, r"prompt has 6 tokens; it must be shorter than max_model_len \(6\)"),
    ([99] * 7, r"prompt has 7 tokens"),  # the length is checked first
    ([], "at least one token"),
])
def test_refused_prompts_name_the_problem(prompt, message):
    with pytest.raises(InvalidArgument, match=message) as caught:
        LIMITS.check_prompt(prompt)
    assert caught.value.field == "prompt"
