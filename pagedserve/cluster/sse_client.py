"""A minimal asyncio client for one streaming POST of an OpenAI-compatible API: JSON in,
server-sent events out, over HTTP/1.1 framed by h11 (which uvicorn brings).

It exists for the load generator: per event it costs a split and a `json.loads`, so the client
adds next to nothing to the latencies it measures, and it needs no HTTP library beyond h11.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import h11

READ_BYTES = 1 << 16


class HttpStatusError(Exception):
    """The server answered with a status other than 200; `body` is what it said."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:500].decode('utf-8', 'replace')}")
        self.status = status
        self.body = body


async def stream_events(base_url: str, path: str, payload: dict[str, Any],
                        api_key: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """POST `payload` to base_url + path (base_url as the openai client takes it, e.g.
    http://host:8000/v1) and yield each event's JSON until `data: [DONE]` or the end."""
    url = urlsplit(base_url)
    secure = url.scheme == "https"
    reader, writer = await asyncio.open_connection(
        url.hostname, url.port or (443 if secure else 80),
        ssl=ssl.create_default_context() if secure else None)
    connection = h11.Connection(h11.CLIENT)
    body = json.dumps(payload).encode()
    headers = [("Host", url.netloc), ("Content-Type", "application/json"),
               ("Content-Length", str(len(body))), ("Accept", "text/event-stream"),
               ("Connection", "close")]
    if api_key:
        headers.append(("Authorization", f"Bearer {api_key}"))
    writer.write(connection.send(h11.Request(method="POST", target=url.path.rstrip("/") + path,
                                             headers=headers))
                 + connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage()))
    status, pending, refused = 0, b"", b""
    try:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(READ_BYTES))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data) and status != 200:
                refused += event.data
            elif isinstance(event, h11.Data):
                # Events end with a blank line; servers write \n or \r\n line ends.
                pending += event.data.replace(b"\r\n", b"\n")
                *complete, pending = pending.split(b"\n\n")
                for raw in complete:
                    for line in raw.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            return
                        yield json.loads(data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                if status != 200:
                    raise HttpStatusError(status, refused)
                return
    finally:
        writer.close()
