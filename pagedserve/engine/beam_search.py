"""Beam search as a driver the engine core advances after every step, beside other requests.

Each round every live beam yields its top 2 x width next tokens (logprobs of the raw model
distribution); the best `width` extensions survive. A survivor is a fork of its parent beam
(all blocks shared; the partial last block is copied on first write), and parents are then
released, so memory grows with the number of distinct suffixes, not with width x length.
Beams that delivered their logprobs wait (paused) for the others of their request; if paused
beams leave a preempted sequence no room, the core asks drivers to release them, and their
children start as new sequences over the same tokens (re-reading the prefix from the prefix
cache where it is enabled).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.scheduler.output import StepResult, TokenLogprobs
from pagedserve.scheduler.request import Request
from pagedserve.scheduler.scheduler import Scheduler


@dataclass
class BeamSequence:
    """One finished or surviving beam."""

    token_ids: list[int]
    cumulative_logprob: float
    text: str = ""
    score: float = 0.0
    """cumulative_logprob / len(token_ids) ** length_penalty; beams are ranked by it."""


@dataclass
class BeamSearchOutput:
    request_id: str
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]
    """Best first; at most beam_width."""


@dataclass
class _Beam:
    sequence_id: str
    token_ids: list[int]
    logprob: float
    released: bool = False
    """Its sequence was aborted to free KV blocks; children start as new sequences."""
    in_prompt: int = 0
    """How many of `token_ids` its sequence holds as prompt (a sequence started for a child of
    a released beam has them all there); forks pass only the rest as outputs."""


def _score(token_ids: list[int], logprob: float, length_penalty: float) -> float:
    return logprob / max(len(token_ids), 1) ** length_penalty


@dataclass
class BeamSearchDriver:
    """One beam-search request: its beams are bare scheduler sequences '<request id>/beam<k>'."""

    request_id: str
    prompt_token_ids: list[int]
    params: BeamSearchParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    active: list[_Beam] = field(default_factory=list)
    done: list[BeamSequence] = field(default_factory=list)
    _delivered: dict[str, TokenLogprobs] = field(default_factory=dict)
    _counter: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        width = self.params.beam_width
        self.step_params = SamplingParams(
            temperature=0.0, logprobs=min(2 * width, SamplingParams.MAX_LOGPROBS),
            max_tokens=self.params.max_tokens + 1, ignore_eos=True)
        if self.params.ignore_eos:
            self.eos_token_ids = frozenset()

    def _new_sequence_id(self) -> str:
        return f"{self.request_id}/beam{next(self._counter)}"

    def start(self, scheduler: Scheduler) -> None:
        sequence_id = self._new_sequence_id()
        scheduler.add_sequence(Request(sequence_id, self.prompt_token_ids, self.step_params))
        self.active = [_Beam(sequence_id, [], 0.0)]

    def owns(self, sequence_id: str) -> bool:
        return any(beam.sequence_id == sequence_id for beam in self.active)

    def on_step(self, scheduler: Scheduler, result: StepResult) -> BeamSearchOutput | None:
        """Take this step's logprobs; once every beam has its own, advance one round. Returns
        the final output when the search ended."""
        for beam in self.active:
            entry = result.logprobs.get(beam.sequence_id)
            if entry is not None and beam.sequence_id not in self._delivered:
                self._delivered[beam.sequence_id] = entry
        if any(beam.sequence_id not in self._delivered for beam in self.active):
            # Other beams need more steps (chunked prefill, max_num_seqs, preemption); a
            # running beam would decode past the token it is forked at.
            for beam in self.active:
                if beam.sequence_id in self._delivered and not beam.released:
                    scheduler.pause(beam.sequence_id)
            return None
        for beam in self.active:
            scheduler.resume(beam.sequence_id)
        self._advance(scheduler)
        self._delivered.clear()
        return None if self.active else self.output()

    def release_paused(self, scheduler: Scheduler) -> bool:
        """Free the blocks of beams that wait with their logprobs in hand; True if any."""
        paused = [beam for beam in self.active
                  if beam.sequence_id in self._delivered and not beam.released]
        for beam in paused:
            scheduler.resume(beam.sequence_id)
            scheduler.abort_request(beam.sequence_id)
            beam.released = True
        return bool(paused)

    def abort(self, scheduler: Scheduler) -> None:
        for beam in self.active:
            if not beam.released:
                scheduler.resume(beam.sequence_id)
                scheduler.abort_request(beam.sequence_id)
        self.active = []

    def _advance(self, scheduler: Scheduler) -> None:
        width = self.params.beam_width
        candidates = []
        for beam in self.active:
            for token_id, logprob in self._delivered[beam.sequence_id].top[:2 * width]:
                candidates.append((beam.logprob + logprob, beam, token_id))
        candidates.sort(key=lambda c: c[0], reverse=True)
        survivors = []
        for logprob, beam, token_id in candidates:
            if len(survivors) == width:
                break
            token_ids = [*beam.token_ids, token_id]
            if (token_id in self.eos_token_ids or len(token_ids) >= self.params.max_tokens
                    or len(self.prompt_token_ids) + len(token_ids) >= self.max_model_len):
                self.done.append(BeamSequence(token_ids, logprob))
                continue
            child_id = self._new_sequence_id()
            if beam.released:
                scheduler.add_sequence(Request(child_id, self.prompt_token_ids + token_ids,
                                               self.step_params))
                survivors.append(_Beam(child_id, token_ids, logprob, in_prompt=len(token_ids)))
            else:
                scheduler.fork_sequence(beam.sequence_id, child_id, token_ids[beam.in_prompt:])
                survivors.append(_Beam(child_id, token_ids, logprob, in_prompt=beam.in_prompt))
        for beam in self.active:
            if not beam.released:
                scheduler.abort_request(beam.sequence_id)
        self.active = survivors

    def output(self) -> BeamSearchOutput:
        """The best `beam_width` beams so far (finished ones and live ones), best first."""
        sequences = self.done + [BeamSequence(b.token_ids, b.logprob) for b in self.active]
        for sequence in sequences:
            sequence.score = _score(sequence.token_ids, sequence.cumulative_logprob,
                                    self.params.length_penalty)
        sequences.sort(key=lambda s: s.score, reverse=True)
        return BeamSearchOutput(self.request_id, self.prompt_token_ids,
                                sequences[:self.params.beam_width])
