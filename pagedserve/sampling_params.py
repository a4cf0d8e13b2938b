"""Per-request sampling and stopping parameters (pure Python; shared by scheduler and sampler)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from pagedserve.validation import check_field, is_finite_number, is_int, is_number

# top_k becomes an int64 tensor in the sampler (2**63 used to overflow it); int32 covers every
# vocabulary, and any top_k >= the vocabulary size keeps every token.
MAX_TOP_K = 2**31 - 1
# Request seeds are 64-bit unsigned, the range of torch.Generator seeds they are mixed into.
MAX_SEED = 2**64 - 1


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
    """Keep the k most likely tokens, k <= 2**31 - 1 (>= vocab size keeps all); 0 or -1: all."""
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
    """Per-request random seed in [0, 2**64 - n]; the same seed gives the same tokens."""
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
        check = partial(check_field, "SamplingParams")
        check("n", is_int(self.n) and self.n >= 1, "an integer >= 1", self.n)
        # Types first, so that a wrong one is named instead of failing a comparison below.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            check(name, is_number(getattr(self, name)), "a number", getattr(self, name))
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            check(name, isinstance(getattr(self, name), bool), "True or False",
                  getattr(self, name))
        check("logit_bias", self.logit_bias is None or isinstance(self.logit_bias, dict),
              "None or a dict of token id -> bias", self.logit_bias)
        check("stop", self.stop is None or isinstance(self.stop, str | list | tuple),
              "None, a string or a list of strings", self.stop)
        check("stop_token_ids",
              self.stop_token_ids is None or isinstance(self.stop_token_ids, list | tuple),
              "None or a list of token ids", self.stop_token_ids)
        check("temperature", is_finite_number(self.temperature) and self.temperature >= 0,
              "a finite number >= 0", self.temperature)
        check("top_p", 0 < self.top_p <= 1, "in (0, 1]", self.top_p)
        check("top_k",
              is_int(self.top_k) and (self.top_k in (-1, 0) or 1 <= self.top_k <= MAX_TOP_K),
              f"-1 or 0 (no limit) or an integer in [1, {MAX_TOP_K}]", self.top_k)
        if self.top_k == -1:
            self.top_k = 0
        check("min_p", 0 <= self.min_p <= 1, "in [0, 1]", self.min_p)
        check("repetition_penalty",
              is_finite_number(self.repetition_penalty) and self.repetition_penalty > 0,
              "a finite number > 0", self.repetition_penalty)
        check("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]",
              self.presence_penalty)
        check("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]",
              self.frequency_penalty)
        if self.logit_bias is not None:
            for token_id, bias in self.logit_bias.items():
                check("logit_bias", is_int(token_id) and token_id >= 0,
                      "keyed by token ids >= 0", token_id)
                check("logit_bias", is_number(bias) and -100 <= bias <= 100,
                      "valued in [-100, 100]", bias)
        # Sequence i of n samples with seed + i, so the largest seed leaves room for n - 1.
        largest_seed = MAX_SEED - (self.n - 1)
        check("seed", self.seed is None or (is_int(self.seed) and 0 <= self.seed <= largest_seed),
              f"None or an integer in [0, {largest_seed}]", self.seed)
        check("max_tokens",
              self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
              "an integer >= 1 or None", self.max_tokens)
        check("min_tokens", is_int(self.min_tokens) and self.min_tokens >= 0, "an integer >= 0",
              self.min_tokens)
        if self.max_tokens is not None:
            check("min_tokens", self.min_tokens <= self.max_tokens,
                  f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            check("stop", all(isinstance(s, str) and s for s in self.stop),
                  "a list of non-empty strings", self.stop)
        if self.stop_token_ids is not None:
            check("stop_token_ids", all(is_int(t) and t >= 0 for t in self.stop_token_ids),
                  "a list of token ids >= 0", self.stop_token_ids)
        check("output_kind", self.output_kind in self.OUTPUT_KINDS,
              f"one of {self.OUTPUT_KINDS}", self.output_kind)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(name, value is None or (is_int(value) and 0 <= value <= self.MAX_LOGPROBS),
                  f"None or an integer in [0, {self.MAX_LOGPROBS}]", value)

    def all_stop_token_ids(self) -> set[int]:
        """Stop token ids set by the user and by the engine."""
        return set(self.stop_token_ids or ()) | set(self.extra_stop_token_ids)

    def check_vocab(self, vocab_size: int) -> None:
        """Reject token ids outside the model's vocabulary, naming the field."""
        for name, ids in (("stop_token_ids", self.stop_token_ids or ()),
                          ("logit_bias", (self.logit_bias or {}).keys())):
            for token_id in ids:
                check_field("SamplingParams", name, token_id < vocab_size,
                            f"token ids < vocab size {vocab_size}", token_id)


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
        check = partial(check_field, "BeamSearchParams")
        check("beam_width", is_int(self.beam_width) and self.beam_width >= 1, "an integer >= 1",
              self.beam_width)
        check("max_tokens", is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1",
              self.max_tokens)
        check("ignore_eos", isinstance(self.ignore_eos, bool), "True or False", self.ignore_eos)
        check("length_penalty", is_finite_number(self.length_penalty), "a finite number",
              self.length_penalty)
