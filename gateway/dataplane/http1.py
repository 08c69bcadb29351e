"""A small HTTP/1.1 client for the gateway's calls to workers: asyncio protocols, llhttp's
parser (httptools, which uvicorn already uses), keep-alive connections pooled per worker.

Why not a general client: on the gateway's hottest path (a plain request at concurrency 32)
aiohttp's client was about a quarter of the gateway's CPU, most of it for features this path
never uses (cookies, redirects, proxies, tracing, multipart). This client does one thing:
send a request with a body and read back a status, a few headers and the body, with a
per-read timeout, bounded buffering (reading pauses when the reader falls behind) and
connection reuse. See README, "What the gateway costs".
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from functools import lru_cache
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import httptools

# Reading from a worker pauses while this much body is waiting for the gateway to use it.
HIGH_WATER = 1 << 20
# An idle pooled connection older than this is closed, not reused: uvicorn (vLLM's server)
# closes idle connections after 5 s, and a request sent as the worker closes would be lost.
IDLE_SECONDS = 4.0
MAX_IDLE_PER_WORKER = 256


class HttpError(Exception):
    """The worker could not be reached, or broke the answer (the message says how)."""


class ConnectFailed(HttpError):
    """No connection to the worker could be made."""


class Target(NamedTuple):
    scheme: str
    host: str
    port: int
    path: str


@lru_cache(maxsize=4096)
def target(url: str) -> Target:
    """Where a URL points; ConnectFailed when it cannot be used."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ConnectFailed(f"not a usable URL: {url!r}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConnectFailed(f"not an http(s) URL: {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, parts.hostname, port, path)


class Connection(asyncio.Protocol):
    """One connection to a worker, carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.content_type = ""
        self.content_length: int | None = None
        self.chunked = False
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False  # any byte of this answer
        self.error: BaseException | None = None
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"unparseable HTTP answer: {exc}"))

    def eof_received(self) -> bool:
        return False  # close the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and exc is None \
                and self.content_length is None and not self.chunked:
            self.complete = True  # a body delimited by the end of the connection
        elif not self.complete:
            self.error = self.error or HttpError(
                f"the connection closed before the answer ended ({exc or 'EOF'})")
        self._wake()

    # the parser's callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.split(b";", 1)[0].strip().lower().decode("latin-1")
        elif name == b"content-length" and value.strip().isdigit():
            self.content_length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # for the reader
    def _fail(self, error: BaseException) -> None:
        self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _wait(self) -> None:
        """Until the parser has something new, or the read timeout passes."""
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(self.read_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    async def headers(self) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read_some(self) -> bytes:
        """The body received so far that was not read yet; b'' once the body has ended."""
        while not self.body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait()
        data = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    @property
    def at_eof(self) -> bool:
        return self.complete and not self.body

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("the worker sent nothing within the read timeout"))


class Pool:
    """Keep-alive connections per worker, newest reused first."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def request(self, method: bytes, url: str, body: bytes,
                      headers: dict[str, str], read_timeout: float | None = None
                      ) -> Connection:
        """Send the request; the connection once the answer's headers are in."""
        where = target(url)
        head = _head(method, where, body, headers)
        key = (where.scheme, where.host, where.port)
        timeout = self.read_timeout if read_timeout is None else read_timeout
        while (connection := self._idle(key)) is not None:
            # A reused connection the worker closed just now fails before any byte of the
            # answer came; the worker never saw the request, so it is sent again.
            try:
                return await self._exchange(connection, head, body, timeout)
            except HttpError:
                if connection.received:
                    raise
        return await self._exchange(await self._connect(where), head, body, timeout)

    async def _exchange(self, connection: Connection, head: bytes, body: bytes,
                        read_timeout: float) -> Connection:
        assert connection.transport is not None
        connection.read_timeout = read_timeout
        connection.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            connection.transport.write(body)
        try:
            await connection.headers()
        except BaseException:
            connection.close()
            raise
        return connection

    def _idle(self, key: tuple[str, str, int]) -> Connection | None:
        idle = self.idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_SECONDS:
                connection._reset()
                return connection
            connection.close()
        return None

    async def _connect(self, where: Target) -> Connection:
        loop = asyncio.get_running_loop()
        context = None
        if where.scheme == "https":
            context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(loop, self.read_timeout), where.host, where.port,
                    ssl=context)
        except TimeoutError:
            raise
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {where.host}:{where.port}: {exc}") from exc
        return connection

    def release(self, connection: Connection, url: str) -> None:
        """Back to the pool when its answer was read to the end; closed otherwise."""
        if not (connection.at_eof and connection.keep_alive) or connection.closed:
            connection.close()
            return
        where = target(url)
        idle = self.idle.setdefault((where.scheme, where.host, where.port), [])
        if len(idle) >= MAX_IDLE_PER_WORKER:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    def close(self) -> None:
        for idle in self.idle.values():
            for connection in idle:
                connection.close()
        self.idle.clear()


def _head(method: bytes, where: Target, body: bytes, headers: dict[str, str]) -> bytes:
    """The request line and headers. Header values come from the gateway (content type,
    a request id checked to be visible ASCII), never from the client unchecked."""
    host = f"[{where.host}]" if ":" in where.host else where.host
    lines = [b"%s %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-length: %d\r\n"
             % (method, where.path.encode(), host.encode(), where.port, len(body))]
    lines += [b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items()]
    lines.append(b"\r\n")
    return b"".join(lines)
