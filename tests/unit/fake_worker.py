"""A scripted stand-in for vLLM workers: real HTTP/1.1 servers on loopback, one per virtual
host, answering through a handler written with httpx's types.

The handler gets an `httpx.Request` (its URL names the virtual host, e.g. `http://w1/...`) and
returns an `httpx.Response`. A streamed body is a `Stream` of parts: bytes are sent as they
come (chunked), `Pause(s)` waits, an exception or `RESET` drops the connection there. An
exception raised by the handler drops the connection before any answer. The servers run in
one background thread with its own event loop, so the gateway under test talks to them over
real sockets, exactly as to a worker. The gateway in front of them: harness.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

KEY = "k-test"
MODEL = "accounts/fireworks/models/m"
Handler = Callable[[httpx.Request], httpx.Response]


def chunk(text: str | None = None, finish: str | None = None, chat: bool = False,
          usage: dict[str, Any] | None = None) -> bytes:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text},
                                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    body: dict[str, Any] = {"id": "x", "object": "chat.completion.chunk" if chat
                            else "text_completion", "created": 1, "model": "served",
                            "choices": [] if usage else [choice]}
    if usage:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


@dataclass
class Pause:
    seconds: float


class Reset(Exception):
    """Drop the connection here."""


RESET = Reset()


class Stream(httpx.AsyncByteStream):
    def __init__(self, parts: list[bytes | Pause | Exception]) -> None:
        self.parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:  # unused: the server plays the parts
        for part in self.parts:
            if isinstance(part, bytes):
                yield part


@dataclass
class Served:
    """What the servers saw."""

    requests: list[httpx.Request] = field(default_factory=list)
    # Answers that the gateway stopped reading before they were complete (it closed the
    # connection): how a worker learns that the request was aborted.
    abandoned: int = 0


class _Loop:
    """One event loop in a daemon thread for every fake server of the test session."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)


_LOOP: _Loop | None = None


def _loop() -> _Loop:
    global _LOOP
    if _LOOP is None:
        _LOOP = _Loop()
    return _LOOP


async def _read_request(reader: asyncio.StreamReader, host: str) -> httpx.Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    body = await reader.readexactly(length) if length else b""
    return httpx.Request(method, f"http://{host}{target}", headers=headers, content=body)


def _head(response: httpx.Response, chunked: bool) -> bytes:
    reason = httpx.codes.get_reason_phrase(response.status_code) or "Status"
    lines = [f"HTTP/1.1 {response.status_code} {reason}"]
    headers = {k.lower(): v for k, v in response.headers.items()
               if k.lower() not in ("content-length", "transfer-encoding")}
    if chunked:
        headers.setdefault("content-type", "text/event-stream")
        headers["transfer-encoding"] = "chunked"
    else:
        headers["content-length"] = str(len(response.content))
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class FakeWorkers:
    """Virtual hosts -> real loopback servers answering through `handler`."""

    def __init__(self, handler: Handler, hosts: tuple[str, ...] = ("worker",)) -> None:
        self.handler = handler
        self.served = Served()
        self.urls: dict[str, str] = {}
        for host in hosts:
            server = _loop().run(asyncio.start_server(
                lambda r, w, h=host: self._connection(r, w, h), "127.0.0.1", 0))
            port = server.sockets[0].getsockname()[1]
            self.urls[host] = f"http://127.0.0.1:{port}"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          host: str) -> None:
        try:
            while (request := await _read_request(reader, host)) is not None:
                self.served.requests.append(request)
                try:
                    response = self.handler(request)
                except Exception:
                    return  # dropped before any answer
                if not await self._answer(response, reader, writer):
                    return
        finally:
            writer.transport.abort()

    async def _answer(self, response: httpx.Response, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Play one answer; False when the connection is to be dropped."""
        stream = response.stream if isinstance(response.stream, Stream) else None
        writer.write(_head(response, chunked=stream is not None))
        if stream is None:
            writer.write(response.content)
            await writer.drain()
            return True
        for part in stream.parts:
            if isinstance(part, Pause):
                if await self._client_left(reader, part.seconds):
                    self.served.abandoned += 1
                    return False
                continue
            if isinstance(part, Exception):
                await writer.drain()
                return False
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            try:
                await writer.drain()
            except ConnectionError:
                self.served.abandoned += 1
                return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    @staticmethod
    async def _client_left(reader: asyncio.StreamReader, seconds: float) -> bool:
        """Wait; True as soon as the gateway closes the connection."""
        try:
            data = await asyncio.wait_for(reader.read(1), seconds)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return data == b""
