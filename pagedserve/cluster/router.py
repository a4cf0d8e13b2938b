"""Which replica takes a request: small swappable policies over plain data, and the gateway's
`Router` that feeds them.

A policy is `policy(loads, turn, config) -> position in loads`: `loads` are the open replicas
(up, not draining, below their queue limit) as `ReplicaLoad`s, `turn` counts the requests
routed so far (round-robin and tie-breaking), `config` the RoutingConfig.

- `round_robin`: the replicas in turn.
- `least_loaded`: the fewest tokens in flight (prompt plus tokens it may generate, of the
  requests the gateway sent it), then the fewest such requests (its queue depth), then the
  lowest KV-cache use; ties in turn. Queue and tokens are the gateway's own counts, current at
  once: a coordinator's snapshot lags by a step, and a burst routed on it would all go to the
  replica whose snapshot is oldest.
- `prefix_affinity`: the replica where this request leaves the least work queued: its tokens
  in flight plus the request's own, less the leading prompt blocks it already holds
  (`prefix_index`); ties to the longest cached run, then in turn. A holder of the prefix wins
  until it is busier than another replica by more than what the hit saves. A guard on requests
  then overrides it: a replica queuing more than `guard_ratio` x the least loaded one's queue
  depth + `guard_slack` gives way to that one (cheap hits still take a batch slot and decode
  steps each). No replica holding any block: least-loaded. Without the guard one hot prefix
  piles its requests on one replica while others idle, where naive cache-aware routing loses
  to round-robin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pagedserve.cluster.prefix_index import PrefixIndex, prompt_block_hashes
from pagedserve.engine.core import EngineCoreRequest
from pagedserve.sampling_params import BeamSearchParams
from pagedserve.validation import check_field, is_finite_number, is_int


@dataclass(frozen=True)
class ReplicaLoad:
    """One open replica as a routing policy sees it."""

    queue_depth: int = 0
    """Requests the gateway has sent it that have not finished (running or waiting there)."""
    in_flight_tokens: int = 0
    """Tokens those requests put there: prompts less their cached blocks, plus what they may
    generate."""
    new_tokens: int = 0
    """Tokens this request would put there: its prompt less the blocks it holds, plus what it
    may generate."""
    kv_usage: float = 0.0
    """Fraction of its KV blocks in use, 0 to 1 (its coordinator's latest snapshot)."""
    cached_blocks: int = 0
    """Leading blocks of this request's prompt it is believed to hold in its prefix cache."""


@dataclass(frozen=True)
class RoutingConfig:
    """How the gateway picks a replica for each request."""

    policy: str = "prefix_affinity"
    """One of ROUTING_POLICIES: prefix_affinity, least_loaded, round_robin."""
    guard_ratio: float = 2.0
    """prefix_affinity gives up a replica with more than guard_ratio x the least loaded one's
    queue depth (+ guard_slack)."""
    guard_slack: int = 4
    """Requests a preferred replica may queue beyond guard_ratio x the least loaded's."""
    max_prefix_blocks: int = 64
    """Leading prompt blocks hashed and matched per request."""

    def __post_init__(self) -> None:
        check_field("RoutingConfig", "policy", self.policy in ROUTING_POLICIES,
                    f"one of {sorted(ROUTING_POLICIES)}", self.policy)
        check_field("RoutingConfig", "guard_ratio",
                    is_finite_number(self.guard_ratio) and self.guard_ratio >= 1,
                    "a finite number >= 1", self.guard_ratio)
        check_field("RoutingConfig", "guard_slack", is_int(self.guard_slack)
                    and self.guard_slack >= 0, "an integer >= 0", self.guard_slack)
        check_field("RoutingConfig", "max_prefix_blocks", is_int(self.max_prefix_blocks)
                    and self.max_prefix_blocks >= 1, "an integer >= 1", self.max_prefix_blocks)


Policy = Callable[[Sequence[ReplicaLoad], int, RoutingConfig], int]


def _in_turn(candidates: list[int], turn: int) -> int:
    return candidates[turn % len(candidates)]


def _least_loaded_of(loads: Sequence[ReplicaLoad], positions: list[int], turn: int) -> int:
    def key(position: int) -> tuple:
        load = loads[position]
        return load.in_flight_tokens, load.queue_depth, load.kv_usage

    best = min(key(position) for position in positions)
    return _in_turn([p for p in positions if key(p) == best], turn)


def round_robin(loads: Sequence[ReplicaLoad], turn: int, config: RoutingConfig) -> int:
    return turn % len(loads)


def least_loaded(loads: Sequence[ReplicaLoad], turn: int, config: RoutingConfig) -> int:
    return _least_loaded_of(loads, list(range(len(loads))), turn)


def prefix_affinity(loads: Sequence[ReplicaLoad], turn: int, config: RoutingConfig) -> int:
    least = least_loaded(loads, turn, config)
    if not any(load.cached_blocks for load in loads):
        return least

    def key(position: int) -> tuple:
        load = loads[position]
        return load.in_flight_tokens + load.new_tokens, -load.cached_blocks

    best = min(key(position) for position in range(len(loads)))
    preferred = _in_turn([p for p in range(len(loads)) if key(p) == best], turn)
    limit = config.guard_ratio * loads[least].queue_depth + config.guard_slack
    return least if loads[preferred].queue_depth > limit else preferred


ROUTING_POLICIES: dict[str, Policy] = {
    "prefix_affinity": prefix_affinity,
    "least_loaded": least_loaded,
    "round_robin": round_robin,
}


def request_cost(request: EngineCoreRequest, cached_tokens: int = 0) -> int:
    """Tokens a request puts on its replica: its prompt less `cached_tokens` found there, and
    what it may generate."""
    params = request.params
    width = params.beam_width if isinstance(params, BeamSearchParams) else params.n
    return len(request.prompt_token_ids) - cached_tokens + width * (params.max_tokens or 0)


class Router:
    """The gateway's router: builds each open replica's ReplicaLoad (replicas are ReplicaClient-
    like: `in_flight`, `in_flight_tokens`, `stats`, `model_info`), asks the policy, and records
    the prompt's blocks as held by the chosen replica. `pick` also gives the request's cost
    there, which the caller adds to the replica's `in_flight_tokens` while it runs."""

    def __init__(self, config: RoutingConfig | None = None) -> None:
        self.config = config or RoutingConfig()
        self.policy = ROUTING_POLICIES[self.config.policy]
        self.prefixes = PrefixIndex()
        self.block_size = 16
        """The replicas' KV block size (the gateway sets it from their ModelInfo)."""
        self._turn = 0

    def pick(self, replicas: Sequence[Any], request: EngineCoreRequest) -> tuple[Any, int]:
        """(the replica for `request`, the request's cost there)."""
        hashes = [] if self.config.policy != "prefix_affinity" else prompt_block_hashes(
            request.prompt_token_ids, self.block_size, request.cache_salt,
            self.config.max_prefix_blocks)
        cached = [self.prefixes.matched(r, hashes) for r in replicas]
        loads = [ReplicaLoad(queue_depth=r.in_flight, in_flight_tokens=r.in_flight_tokens,
                             new_tokens=request_cost(request, blocks * self.block_size),
                             kv_usage=_kv_usage(r.stats), cached_blocks=blocks)
                 for r, blocks in zip(replicas, cached, strict=True)]
        position = self.policy(loads, self._turn, self.config)
        self._turn += 1
        chosen = replicas[position]
        if hashes:  # the scheduler caches every computed prompt block, whatever the request
            self.prefixes.record(chosen, hashes, chosen.model_info.num_kv_blocks)
        return chosen, loads[position].new_tokens

    def forget(self, replica: Any) -> None:
        """The replica's cache is gone (lost, restarted or removed)."""
        self.prefixes.forget(replica)


def _kv_usage(stats: Any) -> float:
    if stats is None or not stats.kv_blocks_total:
        return 0.0
    return stats.kv_blocks_used / stats.kv_blocks_total
