"""A client that leaves at any moment closes the worker request (which is how vLLM learns to
abort it): the gateway served by uvicorn on a real port, a scripted worker that notices when
the gateway hangs up, a raw-socket client that hangs up. Both ways a request reaches the
routes: the gateway's own protocol (edge.EdgeProtocol: a ConnectionClient, no ASGI) and
uvicorn's plain one (an AsgiClient)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.server.protocol import EdgeProtocol
from tests.unit.fake_worker import KEY, MODEL, Pause, Stream, chunk
from tests.unit.harness import build, serving

USAGE = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}


@pytest.fixture(params=["edge", "asgi"])
def protocol(request: pytest.FixtureRequest) -> Any:
    return EdgeProtocol if request.param == "edge" else "httptools"


async def leave_after(address: tuple[str, int], body: dict[str, Any],
                      wait_for: bytes | None) -> bytes:
    """Send a request, read until `wait_for` appears (or 0.3 s), then hang up."""
    reader, writer = await asyncio.open_connection(*address)
    payload = orjson.dumps({"model": MODEL} | body)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\n"
                 b"authorization: Bearer " + KEY.encode() + b"\r\n"
                 b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(payload), payload))
    await writer.drain()
    seen = b""
    if wait_for is None:
        await asyncio.sleep(0.3)
    else:
        while wait_for not in seen:
            seen += await asyncio.wait_for(reader.read(4096), 5)
    writer.transport.abort()
    return seen


# (A body over 64 KiB: the server stops reading the socket past that while it buffers a
# body; the hang-up is seen only if reading starts again.)
@pytest.mark.parametrize("moment,stream,parts,wait_for,prompt", [
    ("plain request", False, [Pause(10), b"{}"], None, "x"),
    ("plain request, 200 KB body", False, [Pause(10), b"{}"], None, "x" * 200_000),
    ("headers held for the first token", True, [Pause(10), chunk("a")], None, "x"),
    ("mid-stream", True, [chunk("a"), Pause(10), chunk("b")], b'"text":"a"', "x"),
])
async def test_a_client_leaving_aborts_the_worker_request(
        tmp_path: Path, protocol: Any, moment: str, stream: bool, parts: list[Any],
        wait_for: bytes | None, prompt: str) -> None:
    content_type = "text/event-stream" if stream else "application/json"
    h = build(tmp_path, lambda r: httpx.Response(
        200, headers={"content-type": content_type}, stream=Stream(list(parts))))
    async with serving(h, protocol) as address:
        await leave_after(address, {"prompt": prompt, "stream": stream}, wait_for)
        for _ in range(100):  # the worker sees the hang-up within a second
            if h.workers.served.abandoned:
                break
            await asyncio.sleep(0.01)
        assert h.workers.served.abandoned == 1, moment
        ledger = h.gateway.ledger
        for _ in range(100):
            if ledger.kept:
                break
            await asyncio.sleep(0.01)
        (record,) = ledger.kept
        assert (record.status, record.http_status) == ("aborted", 499)
        outstanding = h.gateway.replicas.outstanding
        assert all(count == 0 for count in outstanding.values())


async def test_a_request_that_completes_is_not_counted_as_aborted(
        tmp_path: Path, protocol: Any) -> None:
    h = build(tmp_path, lambda r: httpx.Response(200, stream=Stream([
        chunk("a"), chunk("", "stop"), chunk(usage=USAGE), b"data: [DONE]\n\n"])))
    async with serving(h, protocol) as address:
        seen = await leave_after(address, {"prompt": "x", "stream": True}, b"[DONE]")
        assert b"data: [DONE]" in seen
        await asyncio.sleep(0.1)
        (record,) = h.gateway.ledger.kept
        assert (record.status, record.http_status) == ("ok", 200)
        assert h.workers.served.abandoned == 0


async def test_a_client_that_does_not_read_is_cut_off(tmp_path: Path, protocol: Any) -> None:
    """A client that sends its request and never reads the stream: past the write deadline
    its request ends as aborted, the worker request is closed and the replica given back."""
    big = [chunk("x" * 60_000) for _ in range(400)]  # 24 MB, past any socket buffers
    h = build(tmp_path, lambda r: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=Stream(big)),
        client_write_timeout=0.5)
    async with serving(h, protocol) as address:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        _unread, writer = await asyncio.open_connection(sock=sock)
        payload = orjson.dumps({"model": MODEL, "prompt": "x", "stream": True})
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\n"
                     b"authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        await writer.drain()
        ledger = h.gateway.ledger
        for _ in range(500):  # never read; the deadline is 0.5 s
            if ledger.kept:
                break
            await asyncio.sleep(0.01)
        (record,) = ledger.kept
        assert (record.status, record.http_status) == ("aborted", 499)
        assert all(count == 0 for count in h.gateway.replicas.outstanding.values())
        for _ in range(300):
            if h.workers.served.abandoned:
                break
            await asyncio.sleep(0.01)
        assert h.workers.served.abandoned == 1  # the worker request was closed
        writer.transport.abort()
