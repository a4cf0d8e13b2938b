"""Failed calls: when one is tried again, where and after how long, and what it raises.

A call is retried only on UNAVAILABLE ("no replica can serve") and RESOURCE_EXHAUSTED ("full,
retry later"), only while it has received nothing (a stream that delivered a message is never
retried: its tokens were already handed to the caller), and only within its deadline.

Attempts go in rounds. Within a round, UNAVAILABLE moves on to the next address at once; a round
ends when every address has answered UNAVAILABLE, or on RESOURCE_EXHAUSTED. Between rounds the
client sleeps with exponential backoff and full jitter: a uniform draw from
[0, min(max_backoff_s, initial_backoff_s * multiplier ** (round - 1))]. A call makes at most
`max_attempts` rounds, so at most `max_attempts * len(targets)` RPCs.

Server retry hint: an error whose trailing metadata carries `retry-after-ms` (an integer or
decimal count of milliseconds) is retried after exactly that long instead of the jittered
backoff, capped at `max_retry_after_s`; the gateway sets it with RESOURCE_EXHAUSTED when it knows
when room will free up. A hint longer than what is left of the deadline ends the call at once.

What a failed call raises: the pagedserve.errors class of its gRPC status code (ERROR_CLASSES),
with the server's message (the status details) unchanged; the class has the code name as
`grpc_status`, and the original grpc.RpcError is the exception's `__cause__`. Codes without a
class of their own (UNKNOWN, DATA_LOSS) become Internal.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from pagedserve import errors
from pagedserve.errors import InvalidArgument

RETRY_AFTER_KEY = "retry-after-ms"
RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of the retries of one call. `RetryPolicy(max_attempts=1)` never retries."""

    max_attempts: int = 4
    """Rounds per call, the first included (see the module docstring); >= 1."""
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    max_retry_after_s: float = 30.0
    """Cap on a server's `retry-after-ms` hint."""

    def __post_init__(self) -> None:
        if not (isinstance(self.max_attempts, int) and self.max_attempts >= 1):
            raise InvalidArgument(
                f"RetryPolicy.max_attempts must be an integer >= 1; got {self.max_attempts!r}")
        for name in ("initial_backoff_s", "max_backoff_s", "max_retry_after_s"):
            if not getattr(self, name) >= 0:
                raise InvalidArgument(f"RetryPolicy.{name} must be >= 0; got "
                                      f"{getattr(self, name)!r}")
        if not self.multiplier >= 1:
            raise InvalidArgument(f"RetryPolicy.multiplier must be >= 1; got {self.multiplier!r}")

    def backoff(self, round_number: int, rng: random.Random | None = None) -> float:
        """Full-jitter delay before round `round_number + 1` (round_number >= 1)."""
        ceiling = min(self.max_backoff_s,
                      self.initial_backoff_s * self.multiplier ** (round_number - 1))
        return (rng or random).uniform(0.0, ceiling)


def retry_after_s(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The server's `retry-after-ms` hint in seconds, or None when absent or unreadable."""
    for key, value in metadata or ():
        if key.lower() != RETRY_AFTER_KEY:
            continue
        try:
            milliseconds = float(value.decode() if isinstance(value, bytes) else value)
        except ValueError:
            return None
        return max(0.0, milliseconds / 1000.0) if milliseconds == milliseconds else None
    return None


def status_name(error: grpc.RpcError) -> str:
    """The status code name of a gRPC error ('UNKNOWN' when it has none)."""
    code = error.code() if hasattr(error, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def trailing_metadata(error: grpc.RpcError) -> tuple[tuple[str, str | bytes], ...]:
    try:
        return tuple(error.trailing_metadata() or ())
    except Exception:  # an error raised before the call had any metadata
        return ()


class Attempts:
    """The retry state of one call: which address to use, the deadline, and what to do next."""

    def __init__(self, policy: RetryPolicy, num_targets: int, first_target: int,
                 timeout: float | None, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.num_targets = num_targets
        self.target = first_target
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.rng = rng
        self.count = 0  # RPCs started
        self._round = 1
        self._tried_this_round = 1

    def start(self) -> float | None:
        """Note an RPC about to start; returns its timeout (what is left of the deadline)."""
        self.count += 1
        if self.deadline is None:
            return None
        return max(0.001, self.deadline - time.monotonic())

    def next_delay(self, error: grpc.RpcError) -> float | None:
        """After a failed RPC: seconds to wait before the next one, or None to give up."""
        name = status_name(error)
        if name not in RETRYABLE:
            return None
        if name == "UNAVAILABLE" and self._tried_this_round < self.num_targets:
            self.target = (self.target + 1) % self.num_targets
            self._tried_this_round += 1
            return 0.0
        if self._round >= self.policy.max_attempts:
            return None
        hint = retry_after_s(trailing_metadata(error))
        if hint is not None:
            delay = min(hint, self.policy.max_retry_after_s)
        else:
            delay = self.policy.backoff(self._round, self.rng)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        self._round += 1
        self._tried_this_round = 1
        if name == "UNAVAILABLE":
            self.target = (self.target + 1) % self.num_targets
        return delay

ERROR_CLASSES: dict[str, type[errors.PagedServeError]] = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "OUT_OF_RANGE": errors.InvalidArgument,
    "ALREADY_EXISTS": errors.AlreadyExists,
    "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
    "UNAVAILABLE": errors.Unavailable,
    "UNIMPLEMENTED": errors.Unsupported,
    "DEADLINE_EXCEEDED": errors.DeadlineExceeded,
    "INTERNAL": errors.Internal,
    "UNKNOWN": errors.Internal,
    "DATA_LOSS": errors.Internal,
    "UNAUTHENTICATED": errors.Unauthenticated,
    "PERMISSION_DENIED": errors.PermissionDenied,
    "NOT_FOUND": errors.NotFound,
    "CANCELLED": errors.Cancelled,
    "FAILED_PRECONDITION": errors.FailedPrecondition,
    "ABORTED": errors.Aborted,
}


def error_from_rpc(error: grpc.RpcError, message: str | None = None) -> errors.PagedServeError:
    """The pagedserve error for a failed RPC, carrying the server's message (or `message`).

    The result also has `grpc_code` (the status code name, also for codes sharing a class) and
    `trailing_metadata` (what the server sent with the status).
    """
    name = status_name(error)
    details = error.details() if hasattr(error, "details") else None
    message = message or details or f"RPC failed with status {name}"
    result = ERROR_CLASSES.get(name, errors.Internal)(message)
    result.grpc_code = name
    result.trailing_metadata = trailing_metadata(error)
    return result


def raise_from_rpc(error: grpc.RpcError) -> None:
    """Raise the pagedserve error for `error`, chained to it."""
    raise error_from_rpc(error) from error


def raise_stream_error(error: grpc.RpcError, delivered_tokens: int) -> None:
    """Raise the pagedserve error for a stream that failed after `delivered_tokens` tokens:
    an UNAVAILABLE stream that had delivered tokens lost its gateway (or the connection to it)
    mid-request, which is never retried, and says so rather than grpc's socket wording."""
    if delivered_tokens and status_name(error) == "UNAVAILABLE":
        details = error.details() if hasattr(error, "details") else None
        raise error_from_rpc(error, (
            f"the stream was cut after {delivered_tokens} tokens ({details}): the gateway or "
            "the connection to it was lost before the request finished; the tokens so far "
            "are in the stream's completions; send the request again (a call that received "
            "anything is not retried)")) from error
    raise_from_rpc(error)
