"""Bearer-token authentication and TLS for the gateway's gRPC server (and the token check the
OpenAI HTTP API shares).

Tokens come from a file (one per line) or an environment variable; each call must carry
`authorization: Bearer <token>`, compared in constant time against every token. Health checks
and reflection stay open (probes and tools carry no token).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from pagedserve.errors import InvalidArgument

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def load_tokens(token_file: str | None = None, env_var: str | None = None) -> list[str]:
    """Tokens from `token_file` (one per line, blank lines and '#' comments ignored) and the
    comma-separated environment variable `env_var`; empty: authentication is off."""
    tokens: list[str] = []
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise InvalidArgument(f"auth token file {token_file!r} does not exist")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
        if not tokens:
            raise InvalidArgument(f"auth token file {token_file!r} holds no token")
    if env_var and os.environ.get(env_var):
        tokens.extend(t.strip() for t in os.environ[env_var].split(",") if t.strip())
    return tokens


class BearerTokens:
    """The accepted tokens; `accepts` checks an `authorization` header value."""

    def __init__(self, tokens: list[str]) -> None:
        self._expected = [token.encode() for token in tokens]

    def accepts(self, header: str | bytes) -> bool:
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 6750)
            return False
        given = token.encode()
        # Every token is compared (no early exit), each in constant time.
        matches = [hmac.compare_digest(given, expected) for expected in self._expected]
        return any(matches)


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = BearerTokens(tokens)

    def _authorized(self, metadata) -> bool:
        header = next((value for key, value in metadata or () if key == "authorization"), "")
        return self._tokens.accepts(header)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_PREFIXES) or self._authorized(
                handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        # No such method: grpc answers UNIMPLEMENTED, which tells nothing a token would guard.
        return None if handler is None else _refusing(handler)


def _refusing(handler):
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid bearer token; send 'authorization: Bearer "
                            "<token>' metadata")

    async def refuse_stream(request, context):
        await refuse(request, context)
        yield  # pragma: no cover - abort raises before this

    options = {"request_deserializer": handler.request_deserializer,
               "response_serializer": handler.response_serializer}
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **options)
    return grpc.unary_unary_rpc_method_handler(refuse, **options)


def server_credentials(cert_file: str | None, key_file: str | None,
                       client_ca_file: str | None) -> grpc.ServerCredentials | None:
    """TLS with cert + key; mTLS (client certificates required) when a client CA is given;
    None for plaintext."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert_file and key_file):
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    pairs = [(Path(key_file).read_bytes(), Path(cert_file).read_bytes())]
    root = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials(pairs, root_certificates=root,
                                       require_client_auth=root is not None)
