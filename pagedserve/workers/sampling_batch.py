"""Per-request sampling settings of one step, packed into device tensors for the sampler.

Everything the sampler does is vectorised over these tensors; features no request in the batch
uses are left as None so the sampler skips them (a greedy-only batch costs one argmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pagedserve.sampling_params import SamplingParams
from pagedserve.workers.transfer import to_device

_MASK64 = (1 << 64) - 1
# Below this, logits / temperature can overflow to inf (and inf - inf = NaN); such a temperature
# is greedy for every practical purpose, so it is treated as 0.
MIN_SAMPLING_TEMPERATURE = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < MIN_SAMPLING_TEMPERATURE


class SamplingRequest(NamedTuple):
    """One row of the batch: a request's params and its tokens so far (a plain tuple works)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None


def step_seed(seed: int, step: int) -> int:
    """A well-mixed 64-bit seed for output position `step` of a request seeded with `seed`.

    Deriving the generator from (seed, step) instead of keeping one stateful generator per
    request makes seeded sampling depend only on the request itself: it survives preemption
    with recomputation and needs no state on the workers. (SplitMix64 finaliser.)
    """
    x = (seed * 0x9E3779B97F4A7C15 + step) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(row) for row in rows), default=0)
    return to_device([list(row) + [pad] * (width - len(row)) for row in rows], torch.int64,
                     device).reshape(len(rows), width)


def _adjustment_tensors(adjustments: list[tuple[int, int, float]], device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, token_ids, values = zip(*adjustments, strict=True)
    return (to_device(rows, torch.int64, device), to_device(token_ids, torch.int64, device),
            to_device(values, torch.float32, device))


@dataclass
class SamplingBatch:
    """Column-wise view of a step's sampling settings; build with `from_requests`.

    Token-id matrices are padded with `vocab_size` (one past the last real id) so scatters into
    a [N, vocab_size + 1] buffer drop the padding in the extra column.
    """

    vocab_size: int
    temperature: torch.Tensor  # f32 [N]; 0 = greedy (also set for tiny temperatures)
    top_k: torch.Tensor | None  # int64 [N]; vocab_size = off
    top_p: torch.Tensor | None  # f32 [N]; 1 = off
    min_p: torch.Tensor | None  # f32 [N]; 0 = off
    repetition_penalty: torch.Tensor | None  # f32 [N]; 1 = off
    presence_penalty: torch.Tensor | None  # f32 [N]
    frequency_penalty: torch.Tensor | None  # f32 [N]
    prompt_token_ids: torch.Tensor | None  # int64 [N, max_prompt_len] (repetition penalty only)
    output_token_ids: torch.Tensor | None  # int64 [N, max_output_len]
    logit_adjust: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, token ids, add
    generators: list[torch.Generator | None]  # per row; None = the batch-wide generator
    max_num_logprobs: int | None  # largest `logprobs` requested; None = nobody asked
    all_greedy: bool

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_requests(cls, requests: Sequence[SamplingRequest | tuple], vocab_size: int,
                      device: torch.device | str = "cpu",
                      eos_token_ids: Sequence[int] = ()) -> SamplingBatch:
        """Pack `requests` (one row each, in logits row order).

        Seeded rows without an explicit generator get one seeded with `step_seed(seed,
        len(output_token_ids))`. `eos_token_ids` are blocked, together with each request's stop
        token ids, until it has `min_tokens` outputs.
        """
        device = torch.device(device)
        requests = [SamplingRequest(*request) for request in requests]
        params = [request.params for request in requests]

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return to_device(values, dtype, device)

        def optional(values: list[float], off: float, dtype=torch.float32) -> torch.Tensor | None:
            return column(values, dtype) if any(v != off for v in values) else None

        greedy = [is_greedy(p) for p in params]
        temperatures = [0.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
        # Filters only matter for sampled rows (greedy rows take the argmax regardless), so
        # greedy rows get the "off" value and a greedy-only batch skips the filters entirely.
        # A top_k beyond the vocabulary keeps every token, i.e. is "off" too.
        top_k = [min(p.top_k, vocab_size) if p.top_k > 0 and not is_greedy(p) else vocab_size
                 for p in params]
        top_p = [1.0 if is_greedy(p) else p.top_p for p in params]
        min_p = [0.0 if is_greedy(p) else p.min_p for p in params]
        repetition = [p.repetition_penalty for p in params]
        presence = [p.presence_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        uses_repetition = any(r != 1.0 for r in repetition)
        uses_counts = any(v != 0.0 for v in presence + frequency)

        adjustments: list[tuple[int, int, float]] = []  # (row, token id, value added)
        for row, request in enumerate(requests):
            p = request.params
            adjustments += [(row, token_id, float(bias))
                            for token_id, bias in (p.logit_bias or {}).items()]
            if len(request.output_token_ids) < p.min_tokens:
                blocked = p.all_stop_token_ids() | set(() if p.ignore_eos else eos_token_ids)
                adjustments += [(row, token_id, float("-inf")) for token_id in sorted(blocked)]
        too_large = [token_id for _, token_id, _ in adjustments if token_id >= vocab_size]
        if too_large:
            raise ValueError(f"logit_bias / stop token ids must be < vocab size {vocab_size}, "
                             f"got {too_large}")

        generators: list[torch.Generator | None] = []
        for request in requests:
            generator, seed = request.generator, request.params.seed
            if is_greedy(request.params):  # draws nothing, so must not advance a generator
                generator = None
            elif generator is None and seed is not None:
                generator = torch.Generator(device).manual_seed(
                    step_seed(seed, len(request.output_token_ids)))
            generators.append(generator)

        requested_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            vocab_size=vocab_size,
            temperature=column(temperatures),
            top_k=optional(top_k, vocab_size, torch.int64),
            top_p=optional(top_p, 1.0),
            min_p=optional(min_p, 0.0),
            repetition_penalty=column(repetition) if uses_repetition else None,
            presence_penalty=column(presence) if uses_counts else None,
            frequency_penalty=column(frequency) if uses_counts else None,
            prompt_token_ids=_padded([r.prompt_token_ids for r in requests], vocab_size, device)
            if uses_repetition else None,
            output_token_ids=_padded([r.output_token_ids for r in requests], vocab_size, device)
            if uses_repetition or uses_counts else None,
            logit_adjust=_adjustment_tensors(adjustments, device) if adjustments else None,
            generators=generators,
            max_num_logprobs=max(requested_logprobs) if requested_logprobs else None,
            all_greedy=all(greedy),
        )
