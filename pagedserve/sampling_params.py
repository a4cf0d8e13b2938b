"""Per-request sampling and stopping parameters (pure Python; shared by scheduler and sampler)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _require(ok: bool, name: str, rule: str, value: Any, owner: str = "SamplingParams") -> None:
    if not ok:
        raise ValueError(f"{owner}.{name} must be {rule}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop; validated on construction."""

    n: int = 1
    """Number of output sequences to return for the prompt (>= 1); they share the prompt's KV."""
    temperature: float = 1.0
    """Softmax temperature (>= 0); 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """Divide positive logits (multiply negative) of tokens seen in prompt or output; > 0."""
    presence_penalty: float = 0.0
    """Subtract from logits of tokens already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtract count x this from logits of generated tokens, in [-2, 2]."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value added to its logit before sampling (values in [-100, 100])."""
    seed: int | None = None
    """Per-request random seed; the same seed gives the same tokens."""
    max_tokens: int | None = 16
    """Maximum number of generated tokens (>= 1); None means up to the model's context length."""
    min_tokens: int = 0
    """Generate at least this many tokens before EOS or stop token ids may end the request."""
    stop: list[str] | None = None
    """Strings that end generation when they appear in the output text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (in addition to EOS unless ignore_eos)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string in the returned text."""
    ignore_eos: bool = False
    """Keep generating after the EOS token."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top logprobs per step (0..20)."""
    prompt_logprobs: int | None = None
    """Return logprobs of the prompt tokens and this many top alternatives (0..20)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    output_kind: str = "cumulative"
    """step() reports: 'cumulative' (all so far), 'delta' (only new; streaming), 'final_only'."""
    extra_stop_token_ids: list[int] = field(default_factory=list, repr=False)
    """Filled by the engine (e.g. a chat template's end-of-turn ids); not user facing."""

    MAX_LOGPROBS = 20
    OUTPUT_KINDS = ("cumulative", "delta", "final_only")

    def __post_init__(self) -> None:
        _require(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        # Types first, so that a wrong one is named instead of failing a comparison below.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            _require(_is_number(getattr(self, name)), name, "a number", getattr(self, name))
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            _require(isinstance(getattr(self, name), bool), name, "True or False",
                     getattr(self, name))
        _require(self.logit_bias is None or isinstance(self.logit_bias, dict), "logit_bias",
                 "None or a dict of token id -> bias", self.logit_bias)
        _require(self.stop is None or isinstance(self.stop, str | list | tuple), "stop",
                 "None, a string or a list of strings", self.stop)
        _require(self.stop_token_ids is None or isinstance(self.stop_token_ids, list | tuple),
                 "stop_token_ids", "None or a list of token ids", self.stop_token_ids)
        _require(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature", "a finite number >= 0", self.temperature,
        )
        _require(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _require(
            _is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1),
            "top_k", "-1, 0 (disabled) or a positive integer", self.top_k,
        )
        if self.top_k == -1:
            self.top_k = 0
        _require(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _require(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty", "a finite number > 0", self.repetition_penalty,
        )
        _require(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]",
                 self.presence_penalty)
        _require(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]",
                 self.frequency_penalty)
        if self.logit_bias is not None:
            for token_id, bias in self.logit_bias.items():
                _require(_is_int(token_id) and token_id >= 0, "logit_bias",
                         "keyed by token ids >= 0", token_id)
                _require(_is_number(bias) and -100 <= bias <= 100, "logit_bias",
                         "valued in [-100, 100]", bias)
        _require(self.seed is None or _is_int(self.seed), "seed", "an integer or None",
                 self.seed)
        _require(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens", "an integer >= 1 or None", self.max_tokens,
        )
        _require(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
                 "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None:
            _require(self.min_tokens <= self.max_tokens, "min_tokens",
                     f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            _require(all(isinstance(s, str) and s for s in self.stop), "stop",
                     "a list of non-empty strings", self.stop)
        if self.stop_token_ids is not None:
            _require(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                     "stop_token_ids", "a list of token ids >= 0", self.stop_token_ids)
        _require(self.output_kind in self.OUTPUT_KINDS, "output_kind",
                 f"one of {self.OUTPUT_KINDS}", self.output_kind)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(
                value is None or (_is_int(value) and 0 <= value <= self.MAX_LOGPROBS),
                name, f"None or an integer in [0, {self.MAX_LOGPROBS}]", value,
            )

    def all_stop_token_ids(self) -> set[int]:
        """Stop token ids set by the user and by the engine."""
        return set(self.stop_token_ids or ()) | set(self.extra_stop_token_ids)

    def check_vocab(self, vocab_size: int) -> None:
        """Reject token ids outside the model's vocabulary, naming the field."""
        for name, ids in (("stop_token_ids", self.stop_token_ids or ()),
                          ("logit_bias", (self.logit_bias or {}).keys())):
            for token_id in ids:
                _require(token_id < vocab_size, name, f"token ids < vocab size {vocab_size}",
                         token_id)


@dataclass
class BeamSearchParams:
    """Beam search settings (deterministic; beams share prompt KV blocks by fork)."""

    beam_width: int = 4
    """Number of beams kept after each step (>= 1)."""
    max_tokens: int = 16
    """Maximum number of generated tokens per beam (>= 1)."""
    ignore_eos: bool = False
    """Keep extending beams after EOS."""
    length_penalty: float = 1.0
    """Final score = cumulative logprob / length ** length_penalty."""

    def __post_init__(self) -> None:
        _require(_is_int(self.beam_width) and self.beam_width >= 1, "beam_width",
                 "an integer >= 1", self.beam_width, "BeamSearchParams")
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
                 "an integer >= 1", self.max_tokens, "BeamSearchParams")
        _require(isinstance(self.ignore_eos, bool), "ignore_eos", "True or False",
                 self.ignore_eos, "BeamSearchParams")
        _require(_is_number(self.length_penalty) and math.isfinite(self.length_penalty),
                 "length_penalty", "a finite number", self.length_penalty, "BeamSearchParams")
