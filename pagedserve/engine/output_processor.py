"""The frontend's second half: core updates (token ids) to `RequestOutput`s (text).

Per request it keeps the completions, one incremental detokenizer per sequence, the timing, and
what earlier deltas carried; it finds stop strings (the caller then finishes the sequence at the
core, which frees its blocks) and reports each request in its `output_kind`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from pagedserve.engine.beam_search import BeamSearchOutput
from pagedserve.engine.core import EngineCoreOutputs, SequenceUpdate
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.output import TokenLogprobs
from pagedserve.scheduler.scheduler import child_request_id


@dataclass
class _Tracked:
    """Frontend state of one user request (all of its n sequences)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    outputs: list[CompletionOutput]
    detokenizers: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_finished: int = 0
    # Per completion, how many tokens / characters / logprob entries earlier deltas carried.
    sent: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.outputs)

    def report(self) -> RequestOutput | None:
        """This step's output in the request's `output_kind`; None when there is nothing to say."""
        kind = self.params.output_kind
        if kind == "final_only" and not self.finished:
            return None
        return self.delta() if kind == "delta" else self.snapshot()

    def delta(self) -> RequestOutput:
        """What is new since the last delta. While a sequence runs, the last (longest stop
        string - 1) characters stay back: a stop string completing later may remove them."""
        first = not self.sent
        if first:
            self.sent = [(0, 0, 0)] * len(self.outputs)
        hold_back = max((len(stop) for stop in self.params.stop or ()), default=1) - 1
        completions = []
        for index, completion in enumerate(self.outputs):
            tokens_sent, text_sent, logprobs_sent = self.sent[index]
            text_end = len(completion.text)
            if not completion.finished:
                text_end = max(text_sent, text_end - hold_back)
            logprobs = completion.logprobs
            completions.append(dataclasses.replace(
                completion,
                token_ids=completion.token_ids[tokens_sent:],
                text=completion.text[text_sent:text_end],
                logprobs=None if logprobs is None else logprobs[logprobs_sent:]))
            self.sent[index] = (len(completion.token_ids), text_end,
                                0 if logprobs is None else len(logprobs))
        # Prompt logprobs are complete before the first token: they go in the first delta only.
        return self._output(completions, self.prompt_logprobs if first else None)

    def snapshot(self) -> RequestOutput:
        """Everything so far (copies: later steps do not change what was returned)."""
        return self._output([
            dataclasses.replace(o, token_ids=list(o.token_ids),
                                logprobs=None if o.logprobs is None else list(o.logprobs))
            for o in self.outputs], self.prompt_logprobs)

    def _output(self, completions: list[CompletionOutput],
                prompt_logprobs: list[TokenLogprobs | None] | None) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, outputs=completions,
            finished=self.finished, prompt_logprobs=prompt_logprobs,
            metrics=dataclasses.replace(self.metrics))


class OutputProcessor:
    """Turns each step's core updates into request outputs; see the module docstring."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._tracked: dict[str, _Tracked] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> None:
        n = params.n
        with_logprobs = params.logprobs is not None
        self._tracked[request_id] = _Tracked(
            request_id, prompt, prompt_token_ids, params,
            outputs=[CompletionOutput(index=i, logprobs=[] if with_logprobs else None,
                                      cumulative_logprob=0.0 if with_logprobs else None)
                     for i in range(n)],
            detokenizers=[self._detokenizer(prompt_token_ids, params) for _ in range(n)],
            metrics=RequestMetrics(arrival_time=arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None)

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams):
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop,
                                      params.include_stop_str_in_output,
                                      params.skip_special_tokens)

    def abort_request(self, request_id: str) -> None:
        """Forget a request the caller cancelled (nothing more is reported for it)."""
        self._tracked.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    def generated_token_ids(self, request_id: str) -> list[list[int]]:
        """Every token each sequence of a request has received so far (reported or not)."""
        return [list(output.token_ids) for output in self._tracked[request_id].outputs]

    def sequence_ids(self, request_id: str) -> list[str]:
        tracked = self._tracked[request_id]
        n = len(tracked.outputs)
        return [child_request_id(request_id, i) for i in range(n)] if n > 1 else [request_id]

    def process(self, outputs: EngineCoreOutputs) -> tuple[list[RequestOutput],
                                                          list[tuple[str, str]]]:
        """This step's request outputs, and the (sequence id, stop string) pairs whose stop
        strings were found now: the caller finishes those sequences at the core."""
        now = outputs.timestamp or time.monotonic()
        for request_id in outputs.first_scheduled:
            tracked = self._tracked.get(request_id)
            if tracked is not None and tracked.metrics.first_scheduled_time is None:
                tracked.metrics.first_scheduled_time = now
        changed: dict[str, _Tracked] = {}
        stops: list[tuple[str, str]] = []
        for update in outputs.updates:
            tracked = self._tracked.get(update.request_id)
            if tracked is None:
                continue
            completion = tracked.outputs[update.index]
            if completion.finished:
                continue  # e.g. the abort that follows a stop string found here
            if update.prompt_logprobs is not None:
                self._extend_prompt_logprobs(tracked, *update.prompt_logprobs)
            for position, token_id in enumerate(update.new_token_ids):
                stop = self._on_token(tracked, update, completion, token_id, position, now)
                if stop is not None:
                    stops.append((self.sequence_ids(tracked.request_id)[update.index], stop))
            if update.finished and not completion.finished:
                self._close(tracked, completion, update.finish_reason, update.stop_reason, now)
            if update.new_token_ids or update.finished or update.prompt_logprobs is not None:
                changed[tracked.request_id] = tracked
        return self._collect(changed), stops

    def fail(self, updates: list[SequenceUpdate]) -> list[RequestOutput]:
        """Final outputs of the requests a failed step aborted."""
        changed = {}
        for update in updates:
            tracked = self._tracked.get(update.request_id)
            if tracked is None:
                continue
            completion = tracked.outputs[update.index]
            if not completion.finished:
                self._close(tracked, completion, "abort", None, time.monotonic())
            changed[tracked.request_id] = tracked
        return self._collect(changed)

    @staticmethod
    def _extend_prompt_logprobs(tracked: _Tracked, start: int,
                                entries: list[TokenLogprobs]) -> None:
        logprobs = tracked.prompt_logprobs
        # After a recompute preemption the chunks start at other positions; take what extends
        # the entries already known.
        if logprobs is not None and start <= len(logprobs) < start + len(entries):
            logprobs.extend(entries[len(logprobs) - start:])

    def _on_token(self, tracked: _Tracked, update: SequenceUpdate,
                  completion: CompletionOutput, token_id: int, position: int,
                  now: float) -> str | None:
        completion.token_ids.append(token_id)
        metrics = tracked.metrics
        metrics.first_token_time = metrics.first_token_time or now
        metrics.num_cached_tokens = update.num_cached_tokens
        metrics.num_preemptions = max(metrics.num_preemptions, update.num_preemptions)
        if completion.logprobs is not None and update.logprobs is not None:
            entry = update.logprobs[position]
            completion.logprobs.append(entry)
            completion.cumulative_logprob += entry.logprob
        detokenizer = tracked.detokenizers[update.index]
        last = position == len(update.new_token_ids) - 1
        # As in vLLM, the text of a stop token (EOS or a stop token id) stays out of the output
        # unless include_stop_str_in_output; its id is still in token_ids.
        # (The core finishes with 'stop' only on tokens; stop strings are found here.)
        if last and update.finish_reason == "stop" \
                and not tracked.params.include_stop_str_in_output:
            detokenizer = None
        if detokenizer is None:
            return None
        stop = detokenizer.push(
            token_id, check_stop=len(completion.token_ids) >= tracked.params.min_tokens)
        completion.text = detokenizer.text
        if stop is None:
            return None
        self._close(tracked, completion, "stop", stop, now)
        # Found on the token that finished the sequence anyway: the core has already let go.
        return None if update.finished else stop

    def _close(self, tracked: _Tracked, completion: CompletionOutput, reason: str,
               stop_reason: int | str | None, now: float) -> None:
        detokenizer = tracked.detokenizers[completion.index]
        if detokenizer is not None:
            completion.text = detokenizer.flush()
        completion.finish_reason = reason
        completion.stop_reason = stop_reason
        tracked.num_finished += 1
        if tracked.finished:
            tracked.metrics.finished_time = now

    def _collect(self, changed: dict[str, _Tracked]) -> list[RequestOutput]:
        outputs = []
        for tracked in changed.values():
            output = tracked.report()
            if output is not None:
                outputs.append(output)
            if tracked.finished:
                del self._tracked[tracked.request_id]
        return outputs

    def finish_beam_search(self, output: BeamSearchOutput) -> BeamSearchOutput:
        """Fill in each beam's text."""
        if self.tokenizer is not None:
            for sequence in output.sequences:
                sequence.text = self.tokenizer.decode(sequence.token_ids,
                                                      skip_special_tokens=True)
        return output
