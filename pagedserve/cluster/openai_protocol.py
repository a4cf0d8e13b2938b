"""The OpenAI-compatible request bodies (pydantic models): `/v1/completions` and
`/v1/chat/completions`, with OpenAI's fields and vLLM's extra sampling fields, and their
conversion to `SamplingParams`.

Types are pydantic's checks (a wrong one is a 400 naming the field); ranges are
SamplingParams' own, so a value is refused over HTTP exactly as offline and over gRPC. Unknown
fields are refused, as OpenAI does: a misspelt one would otherwise be silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedserve.errors import InvalidArgument
from pagedserve.sampling_params import SamplingParams
from pagedserve.validation import check_text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    include_usage: bool = False
    """Send a last chunk (no choices) with the request's token counts."""


class OpenAIRequest(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str | None = None
    """The served model's name (see GET /v1/models); omitted: the served model."""
    temperature: float | None = None
    """Softmax temperature, >= 0 (0: greedy); default 1."""
    top_p: float | None = None
    """Nucleus sampling mass in (0, 1]; default 1."""
    n: int = 1
    """Completions per prompt (they share the prompt's KV blocks)."""
    stream: bool = False
    """Send server-sent events (`data: {chunk}`) as tokens come, then `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    """Streaming only: `include_usage`."""
    stop: str | list[str] | None = None
    """Strings that end a completion (not included in its text)."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens."""
    presence_penalty: float = 0.0
    """Subtracted from the logits of tokens already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted count times from the logits of generated tokens, in [-2, 2]."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias added to its logit, in [-100, 100]."""
    user: str | None = None
    """The end user's id (accepted; not used)."""
    # vLLM's extra fields (extra_body in the openai client).
    top_k: int | None = None
    """Keep the k most likely tokens (0 or -1: all)."""
    min_p: float | None = None
    """Drop tokens below min_p times the top token's probability, in [0, 1]."""
    repetition_penalty: float | None = None
    """Divide positive (multiply negative) logits of tokens seen so far; > 0."""
    min_tokens: int = 0
    """Generate at least this many tokens before EOS or stop token ids may end a completion."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks: exactly max_tokens tokens)."""
    stop_token_ids: list[int] | None = None
    """Token ids that end a completion, besides EOS."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string in the text."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    return_token_ids: bool = False
    """Add `token_ids` (generated) and `prompt_token_ids` to the choices, as vLLM does."""
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    """Scheduling priority (lower first, under the 'priority' policy); an int32, as over
    gRPC."""
    cache_salt: str | None = None
    """Prefix-cache isolation: only requests with the same salt share cached blocks."""

    def _sampling(self, max_tokens: int | None, logprobs: int | None,
                  output_kind: str) -> SamplingParams:
        fields = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
            if getattr(self, name) is not None}
        return SamplingParams(
            **fields, n=self.n, max_tokens=max_tokens, logprobs=logprobs, stop=self.stop,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=_token_bias(self.logit_bias), min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, output_kind=output_kind)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def param_of(self, field: str | None) -> str | None:
        """The request field behind an error's `field` ('SamplingParams.top_p' -> 'top_p')."""
        if field is None:
            return None
        name = field.rpartition(".")[2]
        return name if name in type(self).model_fields else None


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    """Text, token ids, or a list of either (one request each; choices are indexed
    prompt index * n + completion index)."""
    max_tokens: int | None = 16
    """Most tokens per completion (None: up to the context length)."""
    logprobs: int | None = None
    """Logprobs of each generated token and this many alternatives (0..20)."""
    echo: bool = False
    """Prepend the prompt to the text: not supported (false only)."""
    suffix: str | None = None
    """Text after the completion (insertion): not supported (null only)."""
    best_of: int | None = None
    """Server-side candidates: only equal to n (no ranking is done)."""

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise InvalidArgument("prompt must not be empty", field="prompt")
        return list(prompt)

    def sampling_params(self, output_kind: str) -> SamplingParams:
        if self.echo:
            raise InvalidArgument("echo is not supported; leave it false", field="echo")
        if self.suffix is not None:
            raise InvalidArgument("suffix is not supported; leave it null", field="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidArgument(f"best_of must equal n ({self.n}) or be null, got "
                                  f"{self.best_of}", field="best_of")
        return self._sampling(self.max_tokens, self.logprobs, output_kind)


class ContentPart(BaseModel):
    """One part of a message's content; only text."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One turn. Fields other than these (a previous response's `refusal`, `tool_calls`...)
    are ignored, so a response message can be sent back as it came."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    """Text, or text parts (joined)."""
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        turn = {"role": self.role, "content": content or ""}
        if self.name is not None:
            turn["name"] = self.name
        for text in turn.values():  # the tokenizer takes no lone surrogate ("\ud800")
            check_text("messages", text)
        return turn


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation so far; the model's chat template turns it into the prompt."""
    max_completion_tokens: int | None = None
    """Most tokens per completion (None: up to the context length)."""
    max_tokens: int | None = None
    """The older name of max_completion_tokens (used when that is not given)."""
    logprobs: bool = False
    """Return each generated token's logprob."""
    top_logprobs: int | None = None
    """With logprobs: this many alternatives per token (0..20)."""
    add_generation_prompt: bool = True
    """End the prompt with the template's assistant header (vLLM's field)."""

    def sampling_params(self, output_kind: str) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs: true", field="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, logprobs, output_kind)

    def param_of(self, field: str | None) -> str | None:
        if field == "SamplingParams.logprobs":
            return "top_logprobs"
        if field == "SamplingParams.max_tokens":
            return "max_tokens" if self.max_completion_tokens is None \
                else "max_completion_tokens"
        if field == "prompt":
            return "messages"
        return super().param_of(field)


def _token_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise InvalidArgument(f"logit_bias must be keyed by token ids, got keys "
                              f"{list(bias)[:5]}", field="logit_bias") from None
