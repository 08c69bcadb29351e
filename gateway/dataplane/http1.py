"""A small HTTP/1.1 client for the gateway's calls to workers: asyncio protocols, llhttp's
parser (httptools, which uvicorn already uses), keep-alive connections pooled per worker.

Why not a general client: on the gateway's hottest path (a plain request at concurrency 32)
aiohttp's client was about a quarter of the gateway's CPU, most of it for features this path
never uses (cookies, redirects, proxies, tracing, multipart). This client does one thing:
send a request with a body and read back a status, a few headers and the body, with a
per-read timeout, bounded buffering (reading pauses when the reader falls behind) and
connection reuse. See docs/benchmarks.md, "What the gateway costs".
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Iterable
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
        self.in_pool = False  # idle, waiting for its next request
        self.write_paused = False  # the socket's send buffer is full (asyncio flow control)
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
        self.interim = False  # a 1xx answer (e.g. 103 Early Hints) before the real one
        self.unasked = False  # more came after it: another answer nobody asked for
        self.error: BaseException | None = None
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.in_pool:
            # Nothing was asked: bytes on an idle connection are a broken peer (or the
            # start of a close); reusing it would read them as the next answer.
            self.close()
            return
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
    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the answer's end: the connection cannot be reused
            self.unasked = True
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.unasked:
            return
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.split(b";", 1)[0].strip().lower().decode("latin-1")
        elif name == b"content-length" and value.strip().isdigit():
            self.content_length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True

    def on_headers_complete(self) -> None:
        if self.unasked:
            return
        if 100 <= self.parser.get_status_code() < 200:  # interim: the answer comes after it
            self.interim = True
            self.content_type, self.content_length, self.chunked = "", None, False
            return
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.unasked:
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.unasked:
            return
        if self.interim:
            self.interim = False
            return
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

    async def drained(self) -> None:
        """Until the socket took what was written (a large body), the answer began, or the
        read timeout passed: a worker that stops reading must not hold the gateway."""
        while self.write_paused and not self.headers_done and not self.closed:
            if self.error is not None:
                raise self.error
            await self._wait()

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

    def __init__(self, connect_timeout: float, read_timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle: dict[tuple[str, str, int], list[Connection]] = {}
        # https workers: verified with this context (the system's CAs unless given)
        self._ssl = tls

    async def request(self, method: bytes, url: str, body: bytes,
                      headers: dict[str, str], read_timeout: float | None = None
                      ) -> Connection:
        """Send the request; the connection once the answer's headers are in."""
        where = target(url)
        head = _head(method, where, body, headers)
        key = (where.scheme, where.host, where.port)
        timeout = self.read_timeout if read_timeout is None else read_timeout
        connection = self._idle(key)
        if connection is not None:
            # A pooled connection may have been closed by the worker just now (uvicorn
            # closes idle ones): the request then fails before any byte of an answer came.
            # It is sent again, once, on a fresh connection. Re-sending a POST is safe
            # here: the worker either never read it (the usual case) or lost the connection
            # before answering, which aborts the request in vLLM; an inference request has
            # no effect beyond its answer, which nobody received.
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
            await connection.drained()
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
            connection.in_pool = False
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
        connection.in_pool = True
        idle.append(connection)

    def prune(self, listed: Iterable[str]) -> int:
        """Close the idle connections to workers not in `listed` (replica URLs: pods that
        left DNS, replicas removed) and those past IDLE_SECONDS; how many were closed."""
        keep = set()
        for url in listed:
            try:
                where = target(url)
            except ConnectFailed:
                continue
            keep.add((where.scheme, where.host, where.port))
        now, closed = time.monotonic(), 0
        for key, idle in list(self.idle.items()):
            kept = []
            for connection in idle:
                if key in keep and not connection.closed \
                        and now - connection.idle_since < IDLE_SECONDS:
                    kept.append(connection)
                else:
                    connection.close()
                    closed += 1
            if kept:
                self.idle[key] = kept
            else:
                del self.idle[key]
        return closed

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
