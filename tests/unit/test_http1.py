"""The workers' HTTP/1.1 client against raw sockets that answer as scripted, on both event
loops the gateway runs on (asyncio's and uvloop's, which uvicorn picks when installed)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvloop

from gateway.dataplane import http1
from gateway.dataplane.http1 import ConnectFailed, HttpError, Pool

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Awaitable[None]], None]]:
    def runner(coroutine: Awaitable[None]) -> None:
        async def main() -> None:
            await coroutine
        if request.param == "uvloop":
            uvloop.run(main())
        else:
            asyncio.run(main())
    yield runner


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


class Server:
    """A loopback server that runs `script` for each connection and counts them."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/x"

    async def __aexit__(self, *_: object) -> None:
        self.server.close()


def answering(*answers: bytes, close: bool = False) -> Script:
    """Reads a request and sends each answer in turn on one connection; then closes or
    waits for the client to close."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
        if not close:
            await reader.read()
    return script


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def fetch(pool: Pool, url: str) -> tuple[int, bytes]:
    connection = await pool.request(b"POST", url, b'{"a":1}', {"x-request-id": "r1"})
    parts = []
    while data := await connection.read_some():
        parts.append(data)
    pool.release(connection, url)
    return connection.status, b"".join(parts)


def test_keep_alive_reuses_one_connection(run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        server = Server(answering(OK, OK, OK))
        async with server as url:
            pool = Pool(1, 1)
            for _ in range(3):
                assert await fetch(pool, url) == (200, b"{}")
            assert server.connections == 1
            pool.close()
    run(main())


def test_the_request_carries_body_and_headers(run: Callable[[Awaitable[None]], None]) -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(OK)

    async def main() -> None:
        async with Server(script) as url:
            assert await fetch(Pool(1, 1), url) == (200, b"{}")
    run(main())
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/x HTTP/1.1\r\n")
    assert b"\r\nx-request-id: r1" in head and body == b'{"a":1}'


@pytest.mark.parametrize("answer,body", [
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
     b"abcde"),
    (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end", b"until the end"),
])
def test_body_framings(run: Callable[[Awaitable[None]], None], answer: bytes,
                       body: bytes) -> None:
    async def main() -> None:
        async with Server(answering(answer, close=True)) as url:
            assert await fetch(Pool(1, 1), url) == (200, body)
    run(main())


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",  # shorter than announced
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",  # no last chunk
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n",  # headers never end
    b"<html>not http</html>\r\n\r\n",
    b"",
])
def test_broken_answers_are_errors(run: Callable[[Awaitable[None]], None],
                                   answer: bytes) -> None:
    async def main() -> None:
        async with Server(answering(answer, close=True)) as url:
            with pytest.raises(HttpError):
                await fetch(Pool(1, 1), url)
    run(main())


def test_a_pooled_connection_the_worker_closed_is_replaced(
        run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        server = Server(answering(OK, close=True))  # one answer per connection, then close
        async with server as url:
            pool = Pool(1, 1)
            assert await fetch(pool, url) == (200, b"{}")
            await asyncio.sleep(0.05)
            assert await fetch(pool, url) == (200, b"{}")
            assert server.connections == 2
    run(main())


def test_idle_connections_expire(run: Callable[[Awaitable[None]], None],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "IDLE_SECONDS", 0.0)

    async def main() -> None:
        server = Server(answering(OK, OK))
        async with server as url:
            pool = Pool(1, 1)
            await fetch(pool, url)
            await fetch(pool, url)
            assert server.connections == 2
    run(main())


def test_a_silent_worker_times_out(run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        stalled = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab"
        async with Server(answering(stalled)) as url:
            pool = Pool(1, 0.2)
            connection = await pool.request(b"POST", url, b"", {})
            assert await connection.read_some() == b"ab"
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(TimeoutError):
                await connection.read_some()
            assert 0.15 < loop.time() - start < 1
            connection.close()
    run(main())


def test_reading_pauses_while_the_reader_falls_behind(
        run: Callable[[Awaitable[None]], None]) -> None:
    size = 16 << 20

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size >> 16):
            writer.write(b"x" * (1 << 16))
            await writer.drain()

    async def main() -> None:
        async with Server(script) as url:
            connection = await Pool(1, 5).request(b"POST", url, b"", {})
            await asyncio.sleep(0.5)  # the worker sends as fast as it can; nobody reads
            assert connection.paused
            assert connection.buffered < 2 * http1.HIGH_WATER
            total = 0
            while data := await connection.read_some():
                total += len(data)
            assert total == size
    run(main())


def test_unreachable_and_unusable_urls(run: Callable[[Awaitable[None]], None]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed

    async def main() -> None:
        pool = Pool(1, 1)
        for url in [f"http://127.0.0.1:{port}/x", "http://[::1", "http://h:800l/",
                    "http://h:80011/", "ftp://h/x", "nothing"]:
            with pytest.raises(ConnectFailed):
                await pool.request(b"POST", url, b"", {})
    run(main())
