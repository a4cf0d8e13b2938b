"""Error classes, one per gRPC status code, raised by validation, the engine core and the
cluster. The gateway maps them by class (`grpc_status`, and `http_status` for the OpenAI HTTP
API) and never parses messages; each message says what was wrong and what to do instead.

They also subclass the builtin a Python caller expects (ValueError for bad input, RuntimeError
for a failed engine), so offline code can keep catching those.
"""

from __future__ import annotations

# The HTTP status of each gRPC status, as Google's APIs map them (google.rpc.Code); the rest
# (INTERNAL, UNKNOWN, DATA_LOSS) are 500. 499 is "client closed request".
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
    "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}


class PagedServeError(Exception):
    """Base of every error pagedserve raises on purpose."""

    grpc_status = "INTERNAL"

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        self.field = field
        """The request field at fault, as the message names it ('SamplingParams.top_p',
        'prompt'); None when the message names several or none."""

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.grpc_status, 500)


class InvalidArgument(PagedServeError, ValueError):
    """A request or configuration value is outside its valid range; the message names it."""

    grpc_status = "INVALID_ARGUMENT"


class ConfigError(InvalidArgument):
    """A configuration value is outside its valid range; the message names the field."""


class InvalidType(InvalidArgument, TypeError):
    """An argument has the wrong type; the message names the argument and the types accepted."""


class AlreadyExists(InvalidArgument):
    """A request id is already in use."""

    grpc_status = "ALREADY_EXISTS"


class ResourceExhausted(PagedServeError, RuntimeError):
    """The system is full for now (a queue, the KV cache); retrying later can succeed."""

    grpc_status = "RESOURCE_EXHAUSTED"


class Unavailable(PagedServeError, RuntimeError):
    """The engine cannot serve (stopped, draining, or its workers are gone)."""

    grpc_status = "UNAVAILABLE"


class Unsupported(PagedServeError, NotImplementedError):
    """A feature this model or configuration does not have."""

    grpc_status = "UNIMPLEMENTED"


class WorkerFailure(Unavailable):
    """A worker rank failed, died or stopped answering; its replica runs no further steps."""


class DeadlineExceeded(PagedServeError, TimeoutError):
    """An operation ran past its time limit."""

    grpc_status = "DEADLINE_EXCEEDED"


class Internal(PagedServeError, RuntimeError):
    """A bug or an unexpected failure inside pagedserve."""

    grpc_status = "INTERNAL"


class Unauthenticated(PagedServeError):
    """A missing or wrong bearer token (the gateway's api key)."""

    grpc_status = "UNAUTHENTICATED"


class PermissionDenied(PagedServeError):
    """The caller is known but may not do this."""

    grpc_status = "PERMISSION_DENIED"


class NotFound(PagedServeError, LookupError):
    """A named thing (a model, a request id) does not exist."""

    grpc_status = "NOT_FOUND"


class Cancelled(PagedServeError):
    """The call was cancelled (by the caller, or by the server shutting it down)."""

    grpc_status = "CANCELLED"


class FailedPrecondition(PagedServeError, RuntimeError):
    """The system is not in a state that allows the call (e.g. draining for good)."""

    grpc_status = "FAILED_PRECONDITION"


class Aborted(PagedServeError, RuntimeError):
    """The operation was aborted by a conflict; retrying the whole operation may succeed."""

    grpc_status = "ABORTED"
