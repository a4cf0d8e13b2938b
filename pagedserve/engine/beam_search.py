"""Beam search on the engine's bare sequences: beams are forked sequences sharing KV blocks.

Each step every live beam yields its top 2 x width next tokens (logprobs of the raw model
distribution); the best `width` extensions survive. A survivor is a fork of its parent beam
(all blocks shared; the partial last block is copied on first write), and parents are then
released, so memory grows with the number of distinct suffixes, not with width x length.
Beams that delivered their logprobs wait (paused) for the others; if the paused ones leave a
preempted beam no room, they are released early and their children start as new sequences
over the same tokens (re-reading the prefix from the prefix cache where it is enabled).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from pagedserve.engine.llm_engine import NoProgressError
from pagedserve.sampling_params import BeamSearchParams, SamplingParams


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


@dataclass
class _Group:
    prompt_token_ids: list[int]
    active: list[_Beam]
    done: list[BeamSequence] = field(default_factory=list)


def _score(token_ids: list[int], logprob: float, length_penalty: float) -> float:
    return logprob / max(len(token_ids), 1) ** length_penalty


def run_beam_search(engine, prompts: list[str | list[int]], params: BeamSearchParams,
                    id_prefix: str) -> list[BeamSearchOutput]:
    """Beam search for every prompt at once on `engine` (an LLMEngine)."""
    width = params.beam_width
    eos_ids = set() if params.ignore_eos else set(engine.eos_token_ids)
    step_params = SamplingParams(temperature=0.0, logprobs=min(2 * width, 20),
                                 max_tokens=params.max_tokens + 1, ignore_eos=True)
    counter = itertools.count()
    groups = []
    # Every prompt is checked before any is queued; a later failure aborts the queued ones.
    prompt_token_ids = [engine.prompt_token_ids(prompt) for prompt in prompts]
    try:
        for token_ids in prompt_token_ids:
            sequence_id = f"{id_prefix}-{next(counter)}"
            engine.add_sequence(sequence_id, token_ids, step_params)
            groups.append(_Group(token_ids, [_Beam(sequence_id, [], 0.0)]))
        while any(group.active for group in groups):
            pending = {beam.sequence_id for group in groups for beam in group.active}
            logprobs = {}
            while pending:
                try:
                    engine.step()
                except NoProgressError:
                    # Paused beams hold blocks a preempted beam needs back. Their logprobs are
                    # in hand: release them; their children re-read the prefix (from the
                    # prefix cache where enabled) as new sequences.
                    paused = [beam for group in groups for beam in group.active
                              if beam.sequence_id in logprobs and not beam.released]
                    if not paused:
                        raise
                    engine.resume_paused()
                    for beam in paused:
                        engine.abort_sequence(beam.sequence_id)
                        beam.released = True
                    continue
                for sequence_id, entry in engine.last_result.logprobs.items():
                    if sequence_id in pending:
                        logprobs[sequence_id] = entry
                        pending.discard(sequence_id)
                        if pending:
                            # Other beams may need more steps (chunked prefill, max_num_seqs,
                            # preemption); a running beam would decode past the token it is
                            # forked at, and a fork must agree with every computed token.
                            engine.pause_sequence(sequence_id)
            engine.resume_paused()
            for group in groups:
                _advance(group, logprobs, engine, width, eos_ids, params, id_prefix, counter,
                         engine.max_model_len, step_params)
    finally:
        engine.resume_paused()
        for group in groups:
            for beam in group.active:
                if not beam.released:
                    engine.abort_sequence(beam.sequence_id)
    return [_finish(group, width, params.length_penalty, engine.tokenizer) for group in groups]


def _advance(group: _Group, logprobs, engine, width: int, eos_ids: set[int],
             params: BeamSearchParams, id_prefix: str, counter, max_model_len: int,
             step_params: SamplingParams) -> None:
    candidates = []
    for beam in group.active:
        for token_id, logprob in logprobs[beam.sequence_id].top[:2 * width]:
            candidates.append((beam.logprob + logprob, beam, token_id))
    candidates.sort(key=lambda c: c[0], reverse=True)
    survivors = []
    for logprob, beam, token_id in candidates:
        if len(survivors) == width:
            break
        token_ids = [*beam.token_ids, token_id]
        if (token_id in eos_ids or len(token_ids) >= params.max_tokens
                or len(group.prompt_token_ids) + len(token_ids) >= max_model_len):
            group.done.append(BeamSequence(token_ids, logprob))
            continue
        child_id = f"{id_prefix}-{next(counter)}"
        if beam.released:
            engine.add_sequence(child_id, group.prompt_token_ids + token_ids, step_params)
            survivors.append(_Beam(child_id, token_ids, logprob, in_prompt=len(token_ids)))
        else:
            engine.fork_sequence(beam.sequence_id, child_id, token_ids[beam.in_prompt:])
            survivors.append(_Beam(child_id, token_ids, logprob, in_prompt=beam.in_prompt))
    for beam in group.active:
        if not beam.released:
            engine.abort_sequence(beam.sequence_id)
    group.active = survivors


def _finish(group: _Group, width: int, length_penalty: float, tokenizer) -> BeamSearchOutput:
    sequences = group.done + [BeamSequence(b.token_ids, b.logprob) for b in group.active]
    for sequence in sequences:
        sequence.score = _score(sequence.token_ids, sequence.cumulative_logprob, length_penalty)
        if tokenizer is not None:
            sequence.text = tokenizer.decode(sequence.token_ids, skip_special_tokens=True)
    sequences.sort(key=lambda s: s.score, reverse=True)
    return BeamSearchOutput(group.prompt_token_ids, sequences[:width])
