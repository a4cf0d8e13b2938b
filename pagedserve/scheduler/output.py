"""What one scheduler step hands to the workers: plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.sampling_params import SamplingParams

PLACEHOLDER_TOKEN_ID = -1
"""Stands for a token sampled by the step still running (overlapped scheduling); the ranks put
that step's sampled id there on the device."""


@dataclass
class NewRequestData:
    """Sent the first time a worker sees a request (or after it was preempted)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass(slots=True)  # one per scheduled request per step: slots make it cheaper to build
class ScheduledRequest:
    """One request's share of a step."""

    request_id: str
    token_ids: list[int]
    """Tokens whose KV is computed this step; the last may be PLACEHOLDER_TOKEN_ID (sampled for
    this request by the previous step, whose result is not back yet)."""
    start_position: int
    """Position of token_ids[0] (= tokens already computed)."""
    table_start: int
    """The worker's block table for this request becomes table[:table_start] + table_blocks."""
    table_blocks: list[int]
    sample: bool
    """Whether this step's last token yields a sampled token (the request caught up)."""
    new_request: NewRequestData | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Context length after this step, this step's tokens included."""
        return self.start_position + len(self.token_ids)


@dataclass
class SchedulerOutput:
    """One step: requests to run plus block moves to do first (swap out, swap in, copy)."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    """(GPU block, CPU block) pairs; run before anything else this step."""
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    """(CPU block, GPU block) pairs."""
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) GPU block pairs for copy-on-write; run before this step's KV writes."""
    forgotten_request_ids: list[str] = field(default_factory=list)
    """Requests the workers should drop (finished, aborted or preempted since the last step)."""
    overlap: bool = False
    """Return without waiting for this step's sampled tokens: the ranks hand them back with the
    next step's call, so the host schedules step N+1 while step N runs. A step with overlap False
    returns its own result (after the previous step's, if that one overlapped)."""
    step_id: int = 0
    """Set by the engine core; the ranks' results name it (a result may come a call later)."""
    cached_block_ids: list[int] = field(default_factory=list, repr=False)
    """Blocks that became prefix-cache entries since the previous step was scheduled (this
    step's scheduling included): the step's KV writes, or the one in flight before it, may be
    what fills them, so they are forgotten if either fails. Not sent to the ranks."""
    requests: list = field(default_factory=list, repr=False)
    """The scheduler's Request behind each scheduled item, so that a result arriving after the
    next step was scheduled finds the same request and not a new one under a reused id. It
    stays with the scheduler: not sent to the ranks."""

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    # A step crosses a process boundary every step (coordinator -> ranks). As columns of plain
    # lists it pickles and unpickles about 5x faster than as one dataclass per request.
    def __getstate__(self) -> dict:
        items = self.scheduled
        state = dict(self.__dict__)
        del state["requests"], state["cached_block_ids"]
        state["scheduled"] = (
            [i.request_id for i in items], [i.token_ids for i in items],
            [i.start_position for i in items], [i.table_start for i in items],
            [i.table_blocks for i in items], [i.sample for i in items],
            {index: i.new_request for index, i in enumerate(items) if i.new_request is not None})
        return state

    def __setstate__(self, state: dict) -> None:
        ids, tokens, starts, table_starts, blocks, samples, new = state["scheduled"]
        state["scheduled"] = [
            ScheduledRequest(*row) for row in zip(ids, tokens, starts, table_starts, blocks,
                                                  samples, strict=True)]
        for index, data in new.items():
            state["scheduled"][index].new_request = data
        state["requests"], state["cached_block_ids"] = [], []
        self.__dict__.update(state)


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
    execute_seconds: float = 0.0
    """Wall time of the call on the rank that returned it (model, sampling and block moves)."""
    step_id: int = 0
    """The SchedulerOutput.step_id this is the result of."""
    gpu_idle_seconds: float = 0.0
    """How long the GPU sat idle between the previous step's work and this one's (CUDA events;
    0 elsewhere): the control-plane time that async scheduling hides."""
