"""A minimal asyncio client for one streaming POST of an OpenAI-compatible API: JSON in,
server-sent events out, over HTTP/1.1.

It exists for the load generator, which runs hundreds of these at once in one event loop
beside the server it measures: per event it costs a `bytes.find`, a slice and a JSON decode
(the response is framed here, chunked, by Content-Length or by the connection's end, rather
than through a general HTTP library), so the client adds next to nothing to the latencies it
measures and needs no dependency.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

READ_BYTES = 1 << 16
MAX_HEAD_BYTES = 1 << 16
_decode_json = json.JSONDecoder().decode


class HttpStatusError(Exception):
    """The server answered with a status other than 200; `body` is what it said."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:500].decode('utf-8', 'replace')}")
        self.status = status
        self.body = body


class _Response:
    """One HTTP/1.1 response read from `reader`: the head, then the body's bytes as they come
    (chunked, Content-Length or up to the end of the connection)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}

    async def _fill(self) -> bool:
        data = await self._reader.read(READ_BYTES)
        self._buffer += data
        return bool(data)

    async def read_head(self) -> None:
        while True:  # informational (1xx) answers come first, each with a head of its own
            while (end := self._buffer.find(b"\r\n\r\n")) < 0:
                if len(self._buffer) > MAX_HEAD_BYTES or not await self._fill():
                    raise ConnectionError("the server closed the connection before answering")
            lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            del self._buffer[:end + 4]
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise ConnectionError(f"not an HTTP response: {lines[0][:100]!r}")
            self.status = int(parts[1])
            if not 100 <= self.status < 200:
                break
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def body(self) -> AsyncIterator[bytes]:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            async for piece in self._chunked():
                yield piece
            return
        length = self.headers.get("content-length")
        remaining = int(length) if length is not None else -1  # -1: up to the end
        while remaining:
            if not self._buffer and not await self._fill():
                if remaining > 0:
                    raise ConnectionError("the server closed the connection mid-body")
                return
            piece = bytes(self._buffer if remaining < 0 else self._buffer[:remaining])
            del self._buffer[:len(piece)]
            if remaining > 0:
                remaining -= len(piece)
            yield piece

    async def _chunked(self) -> AsyncIterator[bytes]:
        """The data of every complete chunk in the buffer at once (one piece per read)."""
        buffer = self._buffer
        while True:
            pieces, start = [], 0
            while (line_end := buffer.find(b"\r\n", start)) >= 0:
                size = int(bytes(buffer[start:line_end]).split(b";", 1)[0], 16)
                if size == 0:  # trailers, if any, are not read: the connection closes
                    if pieces:
                        yield b"".join(pieces)
                    return
                end = line_end + 2 + size
                if len(buffer) < end + 2:
                    break
                pieces.append(bytes(buffer[line_end + 2:end]))
                start = end + 2
            del buffer[:start]
            if pieces:
                yield b"".join(pieces)
            if not await self._fill():
                raise ConnectionError("the server closed the connection mid-body")

    async def read_all(self) -> bytes:
        return b"".join([piece async for piece in self.body()])


def _events(data: bytes) -> list[bytes]:
    """The `data:` fields of complete events (already split on blank lines)."""
    fields = []
    for line in data.split(b"\n"):
        if line.startswith(b"data:"):
            fields.append(line[5:].strip())
    return fields


async def stream_events(base_url: str, path: str, payload: dict[str, Any],
                        api_key: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """POST `payload` to base_url + path (base_url as the openai client takes it, e.g.
    http://host:8000/v1) and yield each event's JSON until `data: [DONE]` or the end."""
    url = urlsplit(base_url)
    secure = url.scheme == "https"
    reader, writer = await asyncio.open_connection(
        url.hostname, url.port or (443 if secure else 80),
        ssl=ssl.create_default_context() if secure else None)
    body = json.dumps(payload).encode()
    head = (f"POST {url.path.rstrip('/') + path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Accept: text/event-stream\r\nConnection: close\r\n")
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    writer.write((head + "\r\n").encode("latin-1") + body)
    try:
        response = _Response(reader)
        await response.read_head()
        if response.status != 200:
            raise HttpStatusError(response.status, await response.read_all())
        pending = b""
        async for piece in response.body():
            # Events end with a blank line; servers write \n or \r\n line ends (a \r\n
            # may straddle two pieces: normalized once they are joined).
            pending += piece
            if b"\r" in pending:
                pending = pending.replace(b"\r\n", b"\n")
            if b"\n\n" not in pending:
                continue
            *complete, pending = pending.split(b"\n\n")
            for raw in complete:
                for data in ((raw[5:].strip(),) if raw.startswith(b"data:") and b"\n" not in raw
                             else _events(raw)):
                    if data == b"[DONE]":
                        return
                    yield _decode_json(data.decode())
    finally:
        writer.close()
