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
        self.handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def __aenter__(self) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            assert task is not None
            self.handlers[task] = writer
            try:
                await self.script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                del self.handlers[task]
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/x"

    async def __aexit__(self, *_: object) -> None:
        # Connections still open end here, not cancelled with the loop (which asyncio's
        # stream server of Python 3.11 logs as an error).
        self.server.close()
        for writer in self.handlers.values():
            writer.transport.abort()
        await asyncio.gather(*self.handlers, return_exceptions=True)


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


def reads_then_closes(after: int = 0) -> Script:
    """Answers `after` requests, then reads one more and closes without answering."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(after):
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
        await read_request(reader)
    return script


class Counting(Server):
    """A Server that also counts the requests it read whole."""

    def __init__(self, script: Script) -> None:
        async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            real = reader.readuntil

            async def readuntil(separator: bytes = b"\n") -> bytes:
                data = await real(separator)
                if separator == b"\r\n\r\n":
                    self.requests.append(data)
                return data
            reader.readuntil = readuntil  # type: ignore[method-assign]
            await script(reader, writer)
        super().__init__(counted)


def test_a_worker_that_reads_the_request_and_closes(
        run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        server = Counting(reads_then_closes())
        async with server as url:
            with pytest.raises(HttpError):
                await fetch(Pool(1, 1), url)
            assert len(server.requests) == 1  # a fresh connection: never sent again
    run(main())


def test_at_most_one_stale_pooled_connection_is_retried(
        run: Callable[[Awaitable[None]], None]) -> None:
    server: Counting
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the first two connections answer once; every connection then reads a request
        # and closes without answering
        await reads_then_closes(after=1 if server.connections <= 2 else 0)(reader, writer)

    async def main() -> None:
        async with server as url:
            pool = Pool(1, 1)
            # two pooled connections, each of which will read the next request and close
            await asyncio.gather(fetch(pool, url), fetch(pool, url))
            assert server.connections == 2 and len(pool.idle[("http", "127.0.0.1",
                                                            int(url.split(":")[2][:5]))]) == 2
            with pytest.raises(HttpError):
                await fetch(pool, url)
            # the first pooled one, then a fresh one: not the second pooled one too
            assert len(server.requests) == 2 + 2 and server.connections == 3
    server = Counting(script)
    run(main())


def test_bytes_on_an_idle_connection_close_it(run: Callable[[Awaitable[None]], None]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale")  # unasked
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server = Server(script)
        async with server as url:
            pool = Pool(1, 1)
            assert await fetch(pool, url) == (200, b"{}")
            await asyncio.sleep(0.05)  # the unasked bytes arrive while it is pooled
            assert await fetch(pool, url) == (200, b"{}")  # not "stale"
            assert server.connections == 2
    run(main())


def test_connections_of_replicas_no_longer_listed_are_pruned(
        run: Callable[[Awaitable[None]], None]) -> None:
    async def main() -> None:
        kept, gone = Server(answering(OK, OK)), Server(answering(OK, OK))
        async with kept as kept_url, gone as gone_url:
            pool = Pool(1, 1)
            await fetch(pool, kept_url)
            await fetch(pool, gone_url)
            assert len(pool.idle) == 2
            assert pool.prune([kept_url, "not a url"]) == 1
            assert [key[2] for key in pool.idle] == [int(kept_url.split(":")[2][:5])]
            await fetch(pool, kept_url)
            assert kept.connections == 1  # still pooled and reused
    run(main())


def test_a_10_mb_body_honours_write_flow_control(
        run: Callable[[Awaitable[None]], None], monkeypatch: pytest.MonkeyPatch) -> None:
    body = bytes(range(256)) * (10 * 4096)  # 10 MiB
    received: list[bytes] = []
    pauses: list[bool] = []
    original = http1.Connection.pause_writing

    def pause_writing(self: http1.Connection) -> None:
        pauses.append(True)
        original(self)
    monkeypatch.setattr(http1.Connection, "pause_writing", pause_writing)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)  # a slow reader: the gateway's socket buffer fills
        received.append(await read_request(reader))
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with Server(script) as url:
            pool = Pool(1, 5)
            connection = await pool.request(b"POST", url, body, {})
            assert connection.status == 200 and not connection.write_paused
    run(main())
    assert pauses, "the socket's buffer never filled: flow control untested"
    assert received[0].partition(b"\r\n\r\n")[2] == body


def test_tls_workers(run: Callable[[Awaitable[None]], None]) -> None:
    """A worker on https with a self-signed CA: trusted when the pool is given it, refused
    (as unreachable) with the system's CAs."""
    import ssl

    import trustme

    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await read_request(reader)
                    writer.write(OK)
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/x"
        try:
            pool = Pool(1, 1, trusting)
            assert await fetch(pool, url) == (200, b"{}")
            assert await fetch(pool, url) == (200, b"{}")  # pooled over TLS too
            pool.close()
            with pytest.raises(ConnectFailed):
                await fetch(Pool(1, 1), url)
        finally:
            server.close()
    run(main())


def test_an_interim_answer_before_the_real_one(run: Callable[[Awaitable[None]], None]) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </x>; rel=preload\r\n\r\n"
    async def main() -> None:
        server = Server(answering(early + OK, OK))
        async with server as url:
            pool = Pool(1, 1)
            assert await fetch(pool, url) == (200, b"{}")
            assert await fetch(pool, url) == (200, b"{}")  # and the connection is reusable
            assert server.connections == 1
    run(main())
