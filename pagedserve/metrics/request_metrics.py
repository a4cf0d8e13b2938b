"""Request-level metrics, observed at the gateway: it sees each request arrive, every token
come back and the end. Times on one request's path come from two clocks, never mixed in one
difference: the gateway's (time to first token, end to end) and its coordinator's (inter-token
latency, queue, prefill and decode time), so that skew between machines does not enter.

Each request that ends is counted once in every histogram that applies to it (a request that
got no token has no time to first token; beam search, which reports no per-step tokens, has no
inter-token latency, queue or prefill time) and logs one line to `pagedserve.requests`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

from pagedserve.engine.beam_search import BeamSearchOutput
from pagedserve.engine.core import SequenceUpdate
from pagedserve.engine.outputs import RequestOutput
from pagedserve.metrics import names
from pagedserve.protos.v1 import coordinator_pb2 as cpb

REQUEST_LOG = logging.getLogger("pagedserve.requests")
THROUGHPUT_WINDOW_S = 60
"""The span `throughput()` averages over, in whole seconds."""
FINISH_REASON_ORDER = ("abort", "length", "stop")
"""A request whose completions ended differently counts under the first of these among them."""


class _Series:
    """One replica's labelled children of every request metric, made once: `labels()` costs
    twice an observation, and a step brings an update per running sequence."""

    def __init__(self, recorder: RequestRecorder, replica: str) -> None:
        values = (recorder.model_name, replica)
        for name in ("prompt_tokens", "generation_tokens", "time_to_first_token",
                     "inter_token_latency", "e2e_latency", "queue_time", "prefill_time",
                     "decode_time", "request_prompt_tokens", "request_generation_tokens"):
            setattr(self, name, getattr(recorder, name).labels(*values))
        self._success = recorder.request_success
        self._values = values

    def success(self, finish_reason: str):
        return self._success.labels(*self._values, finish_reason)


@dataclass
class _InFlight:
    """What the metrics follow of one request while it runs."""

    replica: str
    series: _Series
    arrival: float
    num_prompt_tokens: int
    num_generated: int = 0
    first_token_at: float | None = None
    """Gateway clock."""
    first_step_time: float | None = None
    """Coordinator clock, as are the step times below."""
    last_step_time: float | None = None
    sequence_step_times: dict[int, float] = field(default_factory=dict)
    ended_sequences: set[int] = field(default_factory=set)
    queue_seconds: float | None = None
    prefill_seconds: float | None = None
    finish_reason: str | None = None
    finished_at: float | None = None


@dataclass
class Throughput:
    """Rates over the last `window_seconds`, as one gateway saw them."""

    window_seconds: float
    prompt_tokens_per_second: float
    generation_tokens_per_second: float
    requests_per_second: float


class RequestRecorder:
    """The request metrics of one gateway, in its registry; see the module docstring."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int,
                 eos_token_ids: Iterable[int]) -> None:
        self.model_name = model_name
        self._eos_token_ids = frozenset(eos_token_ids)
        self._requests: dict[str, _InFlight] = {}
        self._series: dict[str, _Series] = {}
        self._started = time.monotonic()
        # Per second of the window: [second, prompt tokens, generated tokens, requests].
        self._recent: deque[list[int]] = deque()
        labels = names.LABELS

        def histogram(name: str, documentation: str, buckets) -> Histogram:
            return Histogram(name, documentation, labels, buckets=buckets, registry=registry)

        self.prompt_tokens = Counter(names.PROMPT_TOKENS, "Prompt tokens prefilled.", labels,
                                     registry=registry)
        self.generation_tokens = Counter(names.GENERATION_TOKENS, "Tokens generated.", labels,
                                         registry=registry)
        self.request_success = Counter(names.REQUEST_SUCCESS, "Requests finished.",
                                       (*labels, "finished_reason"), registry=registry)
        self.time_to_first_token = histogram(
            names.TIME_TO_FIRST_TOKEN, "Time to first token in seconds.",
            names.TIME_TO_FIRST_TOKEN_BUCKETS)
        self.inter_token_latency = histogram(
            names.INTER_TOKEN_LATENCY, "Time between two tokens of a sequence in seconds.",
            names.INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e_latency = histogram(names.E2E_REQUEST_LATENCY,
                                     "End to end request latency in seconds.",
                                     names.REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram(names.REQUEST_QUEUE_TIME,
                                    "Time from arrival at the replica to its first step.",
                                    names.REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram(names.REQUEST_PREFILL_TIME,
                                      "Time from the first step to the first token.",
                                      names.REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram(names.REQUEST_DECODE_TIME,
                                     "Time from the first token to the last.",
                                     names.REQUEST_LATENCY_BUCKETS)
        token_buckets = names.one_two_five_buckets(max_model_len)
        self.request_prompt_tokens = histogram(names.REQUEST_PROMPT_TOKENS,
                                               "Prompt tokens per request.", token_buckets)
        self.request_generation_tokens = histogram(names.REQUEST_GENERATION_TOKENS,
                                                   "Generated tokens per request.",
                                                   token_buckets)

    # ---- while requests run -----------------------------------------------------------------

    def admitted(self, request_id: str, replica: str, num_prompt_tokens: int,
                 arrival: float) -> None:
        series = self._series.get(replica)
        if series is None:
            series = self._series[replica] = _Series(self, replica)
        self._requests[request_id] = _InFlight(replica, series, arrival, num_prompt_tokens)

    def on_batch(self, batch: cpb.StepBatch, updates: list[SequenceUpdate],
                 outputs: list[RequestOutput], stops: list[tuple[str, str]],
                 beams: list[BeamSearchOutput]) -> None:
        """One step batch of a replica: `updates` are its sequence updates, and `outputs`,
        `stops` and `beams` what the gateway made of them."""
        now = time.monotonic()
        for start in batch.starts:
            request = self._requests.get(start.request_id)
            if request is not None:
                request.queue_seconds = start.queue_seconds
                request.prefill_seconds = start.prefill_seconds
        prompt_tokens = generated = 0
        generated_by_series: dict[_Series, int] = {}
        for update in updates:
            request = self._requests.get(update.request_id)
            if request is None or update.index in request.ended_sequences:
                continue  # e.g. the token after a stop string the gateway found
            if update.new_token_ids:
                prompt_tokens += self._on_tokens(request, update, batch.step_time, now)
                count = len(update.new_token_ids)
                generated += count
                generated_by_series[request.series] = \
                    generated_by_series.get(request.series, 0) + count
            if update.finished:
                request.ended_sequences.add(update.index)
        for series, count in generated_by_series.items():
            series.generation_tokens.inc(count)
        for sequence_id, _ in stops:
            request_id, _, index = sequence_id.partition("/")
            request = self._requests.get(request_id)
            if request is not None:
                request.ended_sequences.add(int(index or 0))
        for output in outputs:
            request = self._requests.get(output.request_id)
            if output.finished and request is not None:
                request.finish_reason = _request_finish_reason(
                    [c.finish_reason for c in output.outputs])
                request.finished_at = now
        for beam in beams:
            request = self._requests.get(beam.request_id)
            if request is not None:
                prompt_tokens += self._on_beam_result(request, beam, now)
                generated += request.num_generated
        self._add_recent(now, prompt_tokens, generated, 0)

    @staticmethod
    def _on_tokens(request: _InFlight, update: SequenceUpdate, step_time: float,
                   now: float) -> int:
        """One sequence's new tokens (the caller counts them); returns the prompt tokens this
        prefilled."""
        request.num_generated += len(update.new_token_ids)
        previous = request.sequence_step_times.get(update.index)
        if previous is not None:
            request.series.inter_token_latency.observe(step_time - previous)
        request.sequence_step_times[update.index] = step_time
        request.last_step_time = step_time
        if request.first_token_at is not None:
            return 0
        request.first_token_at = now
        request.first_step_time = step_time
        request.series.time_to_first_token.observe(now - request.arrival)
        request.series.prompt_tokens.inc(request.num_prompt_tokens)
        return request.num_prompt_tokens

    def _on_beam_result(self, request: _InFlight, beam: BeamSearchOutput, now: float) -> int:
        """A beam search's one result: its first tokens and its end at once."""
        series = request.series
        request.num_generated = sum(len(s.token_ids) for s in beam.sequences)
        series.generation_tokens.inc(request.num_generated)
        series.prompt_tokens.inc(request.num_prompt_tokens)
        request.first_token_at = request.finished_at = now
        series.time_to_first_token.observe(now - request.arrival)
        best = beam.sequences[0].token_ids if beam.sequences else []
        request.finish_reason = "stop" if best and best[-1] in self._eos_token_ids \
            else "length"
        return request.num_prompt_tokens

    # ---- the end ----------------------------------------------------------------------------

    def finished(self, request_id: str) -> None:
        """The front let go of the request: observe it (finish reason 'abort' if no final
        output came: cancelled, past its deadline, or its replica lost) and log it."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        now = time.monotonic()
        series = request.series
        reason = request.finish_reason or "abort"
        end = request.finished_at or now
        series.success(reason).inc()
        series.e2e_latency.observe(end - request.arrival)
        series.request_prompt_tokens.observe(request.num_prompt_tokens)
        series.request_generation_tokens.observe(request.num_generated)
        if request.queue_seconds is not None:
            series.queue_time.observe(request.queue_seconds)
            series.prefill_time.observe(request.prefill_seconds)
        decode = None
        if request.first_step_time is not None:
            decode = request.last_step_time - request.first_step_time
            series.decode_time.observe(decode)
        self._add_recent(now, 0, 0, 1)
        _log_request(request_id, request, reason, end, decode)

    def discard(self, request_id: str) -> None:
        """A request its coordinator refused: it never ran, and counts nowhere."""
        self._requests.pop(request_id, None)

    # ---- recent throughput ------------------------------------------------------------------

    def _add_recent(self, now: float, prompt_tokens: int, generated: int,
                    requests: int) -> None:
        if not (prompt_tokens or generated or requests):
            return
        second = int(now)
        if not self._recent or self._recent[-1][0] != second:
            self._recent.append([second, 0, 0, 0])
        entry = self._recent[-1]
        entry[1] += prompt_tokens
        entry[2] += generated
        entry[3] += requests

    def throughput(self) -> Throughput:
        now = time.monotonic()
        while self._recent and self._recent[0][0] <= now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        window = max(min(float(THROUGHPUT_WINDOW_S), now - self._started), 1e-9)
        prompt = sum(entry[1] for entry in self._recent)
        generated = sum(entry[2] for entry in self._recent)
        requests = sum(entry[3] for entry in self._recent)
        return Throughput(window, prompt / window, generated / window, requests / window)


def _request_finish_reason(reasons: list[str | None]) -> str:
    return next((r for r in FINISH_REASON_ORDER if r in reasons), "abort")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _log_request(request_id: str, request: _InFlight, reason: str, end: float,
                 decode: float | None) -> None:
    ttft = None if request.first_token_at is None else request.first_token_at - request.arrival
    fields = {"request_id": request_id, "replica": request.replica, "finish_reason": reason,
              "prompt_tokens": request.num_prompt_tokens,
              "generation_tokens": request.num_generated,
              "queue_s": request.queue_seconds, "prefill_s": request.prefill_seconds,
              "ttft_s": ttft, "decode_s": decode, "e2e_s": end - request.arrival}
    line = " ".join(f"{key}={_seconds(value) if key.endswith('_s') else value}"
                    for key, value in fields.items())
    # `extra` gives a structured formatter (JSON logs) the fields without parsing the line.
    REQUEST_LOG.info("request finished %s", line, extra={"request": fields})
