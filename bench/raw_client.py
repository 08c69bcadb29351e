"""A plain asyncio HTTP/1.1 client for load: one kept-alive connection, one request at a time,
httptools' parser. httpx costs a few times more per request than the gateway does, so a load
generator built on it measures itself; this one leaves the CPU to the processes measured."""

from __future__ import annotations

import asyncio

import httptools
import orjson


def completion(key: str, model: str, stream: bool, request_id: str = "") -> bytes:
    """A completions request's bytes."""
    body = orjson.dumps({"model": model, "prompt": "hi", "max_tokens": 64, "stream": stream})
    extra = b"x-request-id: %s\r\n" % request_id.encode() if request_id else b""
    return (b"POST /inference/v1/completions HTTP/1.1\r\nhost: gw\r\n"
            b"authorization: Bearer %s\r\n%scontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (key.encode(), extra, len(body), body))


class _Answer:
    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


class Connection:
    """Reconnects when the server closed the previous connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> int:
        """The answer's status, once it was read to the end."""
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(request)
        answer = _Answer()
        parser = httptools.HttpResponseParser(answer)
        while not answer.done:
            data = await self.reader.read(1 << 16)
            if not data:
                self.close()
                raise ConnectionError(f"port {self.port} closed the connection")
            parser.feed_data(data)
        if not parser.should_keep_alive():
            self.close()
        return int(parser.get_status_code())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
