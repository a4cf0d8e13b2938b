"""Incremental detokenization and stop strings for one output sequence.

Decoding token by token breaks multi-byte characters and tokenizers that merge spaces, so the
text of new tokens is taken as decode(prefix + new) minus decode(prefix) over a short window of
earlier tokens, and held back while it ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from typing import Any

_WINDOW = 6
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Text of one sequence's output tokens, grown a token at a time, with stop strings."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str] | None,
                 include_stop_str_in_output: bool, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.stop = stop or []
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        self.tokens = list(prompt_token_ids[-_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.stop_matched: str | None = None

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special)

    def push(self, token_id: int, check_stop: bool = True) -> str | None:
        """Add one token; returns the matched stop string once the text hits one."""
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE):
            return None
        new_text = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += new_text
        return self._find_stop(search_from) if check_stop else None

    def flush(self) -> str:
        """Final text: tokens held back as an incomplete character are decoded as they are."""
        if self.stop_matched is None and self.read_offset < len(self.tokens):
            prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
            self.text += self._decode(self.tokens[self.prefix_offset:])[len(prefix_text):]
            self.read_offset = len(self.tokens)
        return self.text

    def _find_stop(self, search_from: int) -> str | None:
        best = None
        for stop in self.stop:
            index = self.text.find(stop, search_from)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.text = self.text[:index + len(stop)] if self.include_stop else self.text[:index]
        self.stop_matched = stop
        return stop
