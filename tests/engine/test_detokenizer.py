"""Incremental detokenization with the tiny test model's byte-level tokenizer: multi-byte
characters split over tokens, stop strings across token boundaries."""

from __future__ import annotations

import pytest

from pagedserve.engine.detokenizer import IncrementalDetokenizer

TEXT = "héllo wörld 😀 — naïve ✓ end"


@pytest.fixture(scope="module")
def tokenizer(tiny_text_llm):
    return tiny_text_llm.get_tokenizer()


def push_all(tokenizer, text, stop=None, include=False, prompt="ab"):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), stop, include, True)
    ids = tokenizer.encode(text)
    matched = None
    for count, token_id in enumerate(ids, 1):
        matched = detok.push(token_id)
        assert "\ufffd" not in detok.text  # partial characters are held back
        if matched is not None:
            return detok, matched, count
    return detok, matched, len(ids)


def test_multibyte_text_grows_to_the_full_decode(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT)  # byte-level: multi-byte characters span several tokens
    detok, matched, _ = push_all(tokenizer, TEXT)
    assert matched is None and detok.text == TEXT


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop", ["wö", "😀", "d 😀 —", "end"])
def test_stop_strings_with_multibyte_characters(tokenizer, stop, include):
    detok, matched, count = push_all(tokenizer, TEXT, [stop, "zzz"], include)
    index = TEXT.index(stop)
    assert matched == stop
    assert detok.text == (TEXT[:index + len(stop)] if include else TEXT[:index])
    # Stopped on the very token that completed the stop string.
    assert count == len(tokenizer.encode(TEXT[:index + len(stop)]))


def test_check_stop_false_defers_matching(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [5], ["ll"], False, True)
    ids = tokenizer.encode("hello hello")
    results = []
    for i, token_id in enumerate(ids):
        results.append(detok.push(token_id, check_stop=i >= 6))
        if results[-1] is not None:
            break
    # The first "ll" ends before checking starts; the second one stops it.
    assert results == [None] * 9 + ["ll"]
    assert detok.text == "hello he"
