"""How a client connects: addresses, credentials, TLS, deadlines, retries and channel settings.

Defaults, chosen deliberately:

- TLS: `tls=None` speaks plaintext to loopback addresses (127.0.0.0/8, localhost, [::1], unix
  sockets) and TLS with the system's root certificates to every other host, so a bearer token
  never crosses a network in the clear unless `tls=False` says so.
- Keepalive: a ping after 300 s without traffic on a connection with calls in flight, 20 s to
  answer it, none on idle connections. 300 s is the smallest interval a gRPC server accepts by
  default (`grpc.http2.min_recv_ping_interval_without_data_ms`); shorter ones earn "too many
  pings" GOAWAYs that kill the calls in flight, and a long generation can be silent for minutes.
- Message sizes: 64 MiB each way (gRPC's default receive limit is 4 MiB, which a response with
  prompt logprobs over a long context passes).
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedserve.client.retry import RetryPolicy
from pagedserve.errors import InvalidArgument, InvalidType

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIME_S = 300.0
KEEPALIVE_TIMEOUT_S = 20.0

PemSource = bytes | str | os.PathLike | None
"""PEM bytes, or the path of a PEM file."""


def _read_pem(value: PemSource, name: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str | os.PathLike):
        with open(value, "rb") as f:
            return f.read()
    raise InvalidType(f"TLSConfig.{name} must be PEM bytes or a file path; got {value!r}")


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings; give `certificate_chain` and `private_key` together for mutual TLS.

    Each PEM value is bytes or the path of a file (read once, when the config is made).
    """

    root_certificates: PemSource = None
    """CA certificates that sign the server's; None: the system's roots."""
    certificate_chain: PemSource = None
    """The client's certificate (mTLS)."""
    private_key: PemSource = None
    """The client certificate's key (mTLS)."""
    server_name: str | None = None
    """Check the server's certificate for this name instead of the target's host."""

    def __post_init__(self) -> None:
        for name in ("root_certificates", "certificate_chain", "private_key"):
            object.__setattr__(self, name, _read_pem(getattr(self, name), name))
        if (self.certificate_chain is None) != (self.private_key is None):
            raise InvalidArgument(
                "TLSConfig: give certificate_chain and private_key together (mutual TLS), "
                "or neither")


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names this machine (plaintext is then the default)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.split("///")[-1]  # "dns:///host:port" -> "host:port"
    if host.startswith("["):
        host = host[1:host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _targets(target: str | Sequence[str]) -> tuple[str, ...]:
    targets = (target,) if isinstance(target, str) else tuple(target)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise InvalidArgument(
            f"target must be 'host:port' or a non-empty list of them; got {target!r}")
    return targets


@dataclass(frozen=True)
class ClientOptions:
    """Everything a Client or AsyncClient is configured with (see their docstrings)."""

    targets: tuple[str, ...] = (DEFAULT_TARGET,)
    api_key: str | None = None
    tls: TLSConfig | bool | None = None
    timeout: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    model: str = ""
    keepalive_time_s: float = KEEPALIVE_TIME_S
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S
    max_message_bytes: int = MAX_MESSAGE_BYTES
    channel_options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def create(cls, target: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> ClientOptions:
        if kwargs.get("retry") is None:
            kwargs.pop("retry", None)
        kwargs["channel_options"] = tuple(kwargs.get("channel_options") or ())
        return cls(targets=_targets(target), **kwargs)

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise InvalidArgument(f"timeout must be None or > 0 seconds; got {self.timeout!r}")
        if not isinstance(self.tls, TLSConfig | bool | None):
            raise InvalidType(f"tls must be a TLSConfig, True, False or None; got {self.tls!r}")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key):
            raise InvalidArgument("api_key must be None or a non-empty string")
        if not isinstance(self.retry, RetryPolicy):
            raise InvalidType(f"retry must be a RetryPolicy; got {self.retry!r}")
        if not self.max_message_bytes > 0:
            raise InvalidArgument(f"max_message_bytes must be > 0; got {self.max_message_bytes}")

    def tls_for(self, target: str) -> TLSConfig | None:
        """The TLS settings for one target; None means plaintext."""
        if isinstance(self.tls, TLSConfig):
            return self.tls
        if self.tls is None:
            return None if is_loopback(target) else TLSConfig()
        return TLSConfig() if self.tls else None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call."""
        if self.api_key is None:
            return ()
        return (("authorization", f"Bearer {self.api_key}"),)

    def grpc_options(self, tls: TLSConfig | None) -> list[tuple[str, Any]]:
        """Channel arguments; `channel_options` come last, so they override these."""
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.primary_user_agent", f"pagedserve-client/{client_version()}"),
        ]
        if tls is not None and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return options + list(self.channel_options)


@functools.cache
def client_version() -> str:
    """The installed SDK's version (the full project's, when that is what is installed)."""
    from importlib import metadata

    for distribution in ("pagedserve-client", "pagedserve"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"
