"""What a worker returns from one step: plain data, no tensors (crosses process boundaries and
reaches frontends that never import torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

TopLogprobs = list[tuple[int, float]]


@dataclass
class TokenLogprobs:
    """Logprob of one chosen token, its rank (1 = most likely) and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: TopLogprobs


@dataclass
class StepResult:
    """Plain-data result of one step (crosses process boundaries)."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    """request id -> (index of the first prompt token covered, logprobs of consecutive tokens)."""
