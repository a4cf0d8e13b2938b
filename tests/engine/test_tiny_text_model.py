"""Text in, text out with the tiny byte-level test model (one token per byte): stop
strings, stop token ids, min_tokens, max_tokens and chat."""

from __future__ import annotations

import string

import pytest

from pagedserve.sampling_params import SamplingParams
from tests.engine.engine_utils import assert_no_leaks

PROMPT = "The quick brown fox"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def llm(tiny_text_llm):
    return tiny_text_llm


@pytest.fixture(scope="module")
def letters_bias(llm) -> dict[int, float]:
    """Push the (random) model towards lowercase letters so its text is readable ASCII."""
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(list(string.ascii_lowercase))
    assert len(set(ids)) == 26
    return dict.fromkeys(ids, 30.0)


def params(letters_bias, **kwargs) -> SamplingParams:
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return SamplingParams(temperature=4.0, seed=21, logit_bias=letters_bias, **kwargs)


def run(llm, sampling_params, prompt=PROMPT):
    (output,) = llm.generate([prompt], sampling_params, use_tqdm=False)
    assert output.finished
    return output.outputs[0]


@pytest.fixture(scope="module")
def reference(llm, letters_bias):
    """The unstopped output: text, token ids and a stop string drawn from its middle."""
    completion = run(llm, params(letters_bias))
    text = completion.text
    assert len(completion.token_ids) == MAX_TOKENS and completion.finish_reason == "length"
    assert text == llm.get_tokenizer().decode(completion.token_ids)
    assert len(text) == MAX_TOKENS and set(text) <= set(string.ascii_lowercase)
    stop = next_new_trigram(text, 8)
    return completion, stop, text.index(stop)


def next_new_trigram(text: str, start: int) -> str:
    """The first 3-character substring whose first occurrence is at or after `start`."""
    for j in range(start, len(text) - 2):
        if text.index(text[j:j + 3]) == j:
            return text[j:j + 3]
    raise AssertionError(f"no new trigram after {start} in {text!r}")


def test_text_prompt_round_trip(llm, reference):
    (output,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5),
                             use_tqdm=False)
    assert output.prompt == PROMPT
    assert output.prompt_token_ids == llm.get_tokenizer().encode(PROMPT)
    assert len(output.outputs[0].token_ids) <= 5
    assert_no_leaks(llm)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string(llm, letters_bias, reference, include):
    completion, stop, index = reference
    out = run(llm, params(letters_bias, stop=[stop], include_stop_str_in_output=include))
    expected_text = completion.text[:index + len(stop)] if include else completion.text[:index]
    assert out.text == expected_text
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    # One byte per token: generation ended on the token that completed the stop string.
    assert out.token_ids == completion.token_ids[:index + len(stop)]
    assert_no_leaks(llm)


def test_earliest_of_several_stop_strings_wins(llm, letters_bias, reference):
    completion, stop, index = reference
    later = next_new_trigram(completion.text, index + 1)
    out = run(llm, params(letters_bias, stop=[later, stop]))
    assert out.text == completion.text[:index]
    assert out.stop_reason == stop
    assert_no_leaks(llm)


def test_stop_string_never_seen_runs_to_max_tokens(llm, letters_bias, reference):
    completion, _, _ = reference
    out = run(llm, params(letters_bias, stop=["ZZ", "0"]))
    assert out.text == completion.text and out.finish_reason == "length"
    assert out.stop_reason is None
    out = run(llm, params(letters_bias, max_tokens=7))
    assert out.token_ids == completion.token_ids[:7] and out.finish_reason == "length"
    assert out.text == completion.text[:7]


def test_stop_string_with_min_tokens(llm, letters_bias, reference):
    completion, stop, index = reference
    min_tokens = index + len(stop) + 2
    out = run(llm, params(letters_bias, stop=[stop], min_tokens=min_tokens))
    assert len(out.token_ids) >= min_tokens
    rest = completion.text.find(stop, min_tokens - len(stop))
    if rest >= 0:  # the first occurrence ending at or after token min_tokens stops it
        assert out.finish_reason == "stop" and out.text == completion.text[:rest]
    else:
        assert out.finish_reason == "length" and out.text == completion.text
    assert_no_leaks(llm)


def test_stop_token_ids(llm, letters_bias, reference):
    completion, _, _ = reference
    token = completion.token_ids[6]
    position = completion.token_ids.index(token)
    out = run(llm, params(letters_bias, stop_token_ids=[token]))
    assert out.token_ids == completion.token_ids[:position + 1]
    assert out.finish_reason == "stop" and out.stop_reason == token
    assert_no_leaks(llm)


def test_stop_token_ids_blocked_until_min_tokens(llm, letters_bias, reference):
    completion, _, _ = reference
    token = completion.token_ids[6]
    min_tokens = completion.token_ids.index(token) + 3
    out = run(llm, params(letters_bias, stop_token_ids=[token], min_tokens=min_tokens))
    assert len(out.token_ids) >= min_tokens
    assert token not in out.token_ids[:min_tokens]
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == token and out.stop_reason == token
        assert token not in out.token_ids[:-1]
    else:
        assert len(out.token_ids) == MAX_TOKENS
    assert_no_leaks(llm)


def test_eos_stops_unless_ignored(llm):
    eos = llm.get_tokenizer().eos_token_id
    force_eos = {eos: 100.0}
    out = run(llm, SamplingParams(temperature=0, max_tokens=10, logit_bias=force_eos))
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    assert out.text == ""  # special tokens are skipped
    out = run(llm, SamplingParams(temperature=0, max_tokens=4, logit_bias=force_eos,
                                  ignore_eos=True))
    assert out.token_ids == [eos] * 4 and out.finish_reason == "length"
    out = run(llm, SamplingParams(temperature=0, max_tokens=6, logit_bias=force_eos,
                                  min_tokens=3))
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos
    assert eos not in out.token_ids[:3] and out.finish_reason == "stop"
    assert_no_leaks(llm)


def test_stop_strings_per_sequence_with_n(llm, letters_bias, reference):
    completion, stop, index = reference
    (output,) = llm.generate([PROMPT], params(letters_bias, n=2, stop=[stop]), use_tqdm=False)
    first, second = output.outputs
    assert first.text == completion.text[:index] and first.stop_reason == stop
    assert second.token_ids != first.token_ids  # seed + 1
    assert_no_leaks(llm)


def test_chat(llm):
    (output,) = llm.chat([{"role": "user", "content": "hi"}],
                         SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode(output.prompt_token_ids) == "<s>user: hi\n<s>assistant: "
    completion = output.outputs[0]
    assert completion.finished and 1 <= len(completion.token_ids) <= 8
    assert isinstance(completion.text, str)
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    outputs = llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                       SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(outputs) == 2 and all(o.finished for o in outputs)
    assert_no_leaks(llm)
