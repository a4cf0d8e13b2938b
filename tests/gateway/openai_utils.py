"""Helpers of the OpenAI HTTP tests: the official `openai` client for a started Server, raw
streaming reads, and one streamed completion's chunks put back together."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import openai

CLIENT_TIMEOUT_S = 60.0


def client(server, api_key: str = "unused") -> openai.OpenAI:
    """The openai client of `server`'s HTTP API; no retries, so every error is seen."""
    return openai.OpenAI(base_url=f"{server.http_address}/v1", api_key=api_key,
                         max_retries=0, timeout=CLIENT_TIMEOUT_S)


def joined(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Per choice index: the text (chat: content) and token ids of every chunk concatenated,
    the finish and stop reasons (the chunk that ends a choice is the only one that has them)
    and how many chunks carried them."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            joined_choice = choices.setdefault(choice.index, {
                "text": "", "token_ids": [], "finish_reason": None, "stop_reason": None,
                "finishes": 0})
            delta = getattr(choice, "delta", None)
            piece = choice.text if delta is None else (delta.content or "")
            joined_choice["text"] += piece
            joined_choice["token_ids"] += getattr(choice, "token_ids", None) or []
            if choice.finish_reason is not None:
                joined_choice["finish_reason"] = choice.finish_reason
                joined_choice["stop_reason"] = getattr(choice, "stop_reason", None)
                joined_choice["finishes"] += 1
    return choices


@dataclass
class Reply:
    """A whole HTTP answer."""

    status: int
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_call(server, method: str, path: str, body: bytes | dict | None = None,
              headers: dict[str, str] | None = None) -> Reply:
    """One request to `server`'s HTTP API (no library beyond the standard one); a dict body
    is sent as JSON."""
    url = urlsplit(server.http_address)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=CLIENT_TIMEOUT_S)
    try:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                     response.read())
    finally:
        connection.close()


def open_stream(server, path: str, body: dict[str, Any],
                headers: dict[str, str] | None = None
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A POST whose response is left unread (the caller reads what it wants, then closes the
    connection: a client that leaves)."""
    url = urlsplit(server.http_address)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=CLIENT_TIMEOUT_S)
    connection.request("POST", path, json.dumps(body),
                       {"Content-Type": "application/json", **(headers or {})})
    return connection, connection.getresponse()


def hang_up(connection: http.client.HTTPConnection) -> None:
    """Leave as a client that goes away does: the connection closed at once (FIN sent even
    while a response still holds the socket)."""
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


def read_events(response: http.client.HTTPResponse, count: int) -> list[str]:
    """The next `count` server-sent events' data."""
    events = []
    while len(events) < count:
        line = response.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data: "):
            events.append(line[len(b"data: "):].strip().decode())
    return events
