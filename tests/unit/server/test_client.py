"""The two ways an inference request reaches the data plane (gateway/server/) answer alike:
the gateway's own protocol (edge.EdgeProtocol hands the request over as a ConnectionClient,
without ASGI) and any ASGI server (uvicorn's plain protocol here: an AsgiClient). Each case
is sent over a raw socket to both, on real ports, in front of one scripted worker; and what
only uvicorn's cycle does (pipelined requests, `expect: 100-continue`, HTTP/1.0) still works
on the gateway's protocol."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.server import protocol as protocol_module
from gateway.server.protocol import ConnectionClient, EdgeProtocol
from tests.unit.fake_worker import KEY, MODEL, Stream, chunk
from tests.unit.harness import build, serving

USAGE = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
COMPLETION = {"id": "c", "object": "text_completion", "created": 1, "model": "served",
              "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}], "usage": USAGE}


def worker(request: httpx.Request) -> httpx.Response:
    body = orjson.loads(request.content)
    if body["prompt"] == "fail":
        return httpx.Response(400, json={"object": "error", "message": "bad prompt"})
    if body.get("stream"):
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=Stream([chunk("hi"), chunk("", "stop"),
                                             chunk(usage=USAGE), b"data: [DONE]\n\n"]))
    return httpx.Response(200, json=COMPLETION)


def request(body: Any, *, key: str | None = KEY, path: str = "/v1/completions",
            extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    auth = b"authorization: Bearer %s\r\n" % key.encode() if key else b""
    return (b"POST %s HTTP/%s\r\nhost: gw\r\nx-request-id: rid-1\r\n%s%s"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (path.encode(), version, auth, extra, len(payload), payload))


async def exchange(address: tuple[str, int], raw: bytes, replies: int = 1
                   ) -> list[tuple[int, dict[str, str], bytes]]:
    """Send `raw` on one connection; read `replies` replies: (status, headers, body)."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(raw)
    out = []
    for _ in range(replies):
        status_line = await asyncio.wait_for(reader.readline(), 5)
        if status_line == b"HTTP/1.1 100 Continue\r\n":
            await reader.readline()
            status_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:  # chunked
            body = b""
            while (size := int((await reader.readline()).strip(), 16)) > 0:
                body += await reader.readexactly(size)
                await reader.readline()
            await reader.readline()
        out.append((int(status_line.split()[1]), headers, body))
    writer.close()
    return out


def comparable(reply: tuple[int, dict[str, str], bytes]) -> tuple[Any, ...]:
    """What must not depend on the path: status, body, and the headers but the timings
    (measured), the worker's address (each server has its own fake worker) and a stream's
    token counts (there when the worker's usage came before the first token)."""
    status, headers, body = reply
    stable = {name: value for name, value in headers.items()
              if name not in ("date", "server-timing", "transfer-encoding", "content-length",
                              "fireworks-backend-host")
              and not name.startswith("fireworks-server-")
              and not (name.endswith("prompt-tokens") and "text/event-stream" in
                       headers["content-type"])}
    return status, stable, body


def chunked(body: Any) -> bytes:
    """The request with its body in chunked transfer coding, in two chunks."""
    payload = orjson.dumps(body)
    half = len(payload) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                      for part in (payload[:half], payload[half:]))
    return (b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\nx-request-id: rid-1\r\n"
            b"authorization: Bearer %s\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n%s0\r\n\r\n" % (KEY.encode(), chunks))


CASES = {
    "plain": request({"model": MODEL, "prompt": "x"}),
    "chunked body": chunked({"model": MODEL, "prompt": "x"}),
    "stream": request({"model": MODEL, "prompt": "x", "stream": True}),
    "no key": request({"model": MODEL, "prompt": "x"}, key=None),
    "bad key": request({"model": MODEL, "prompt": "x"}, key="nope"),
    "not json": request(b"{nope"),
    "unknown field": request({"model": MODEL, "prompt": "x", "bogus": 1}),
    "unknown model": request({"model": "accounts/x/models/y", "prompt": "x"}),
    "worker refuses": request({"model": MODEL, "prompt": "fail"}),
    "messages api": request({"model": MODEL, "max_tokens": 5,
                             "messages": [{"role": "user", "content": "x"}]},
                            path="/v1/messages", extra=b"anthropic-version: 2023-06-01\r\n"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_both_paths_answer_alike(tmp_path: Path, case: str) -> None:
    replies = []
    for protocol in (EdgeProtocol, "httptools"):
        async with serving(build(tmp_path, worker), protocol) as address:
            (reply,) = await exchange(address, CASES[case])
            replies.append(reply)
    direct, asgi = replies
    # (The scripted worker speaks completions only: the Messages API's case is its 502.)
    assert (direct[0] == 200) == (case in ("plain", "chunked body", "stream"))
    assert direct[1]["x-request-id"] == "rid-1"
    assert "date" in direct[1]  # the server's own headers too
    assert comparable(direct) == comparable(asgi), case


async def test_the_gateway_protocol_serves_inference_without_asgi(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[str] = []
    run = ConnectionClient.run

    async def counted(self: ConnectionClient, serve: Any) -> None:
        served.append(self.path)
        await run(self, serve)

    monkeypatch.setattr(ConnectionClient, "run", counted)
    async with serving(build(tmp_path, worker), EdgeProtocol) as address:
        (reply,) = await exchange(address, CASES["plain"])
        # A path with an escape is not a table key: uvicorn decodes it, ASGI serves it.
        (escaped,) = await exchange(address, request({"model": MODEL, "prompt": "x"},
                                                     path="/v1/complet%69ons"))
    assert reply[0] == escaped[0] == 200
    assert served == ["/v1/completions"]


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    first = request({"model": MODEL, "prompt": "x", "max_tokens": 1})
    second = request({"model": MODEL, "prompt": "x", "stream": True})
    third = request({"model": MODEL, "prompt": "x"}, key=None)
    async with serving(build(tmp_path, worker), EdgeProtocol) as address:
        replies = await exchange(address, first + second + third, replies=3)
    assert [status for status, _, _ in replies] == [200, 200, 401]
    assert b"[DONE]" in replies[1][2]


async def test_expect_100_continue_and_http_1_0(tmp_path: Path) -> None:
    async with serving(build(tmp_path, worker), EdgeProtocol) as address:
        (continued,) = await exchange(address, request(
            {"model": MODEL, "prompt": "x"}, extra=b"expect: 100-continue\r\n"))
        reader, writer = await asyncio.open_connection(*address)
        writer.write(request({"model": MODEL, "prompt": "x"}, version=b"1.0"))
        old = await asyncio.wait_for(reader.read(), 5)  # read to EOF: the gateway closes
        writer.close()
    assert continued[0] == 200
    assert old.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close\r\n" in old


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def connection_client(transport: Transport, keep_alive: bool = True) -> ConnectionClient:
    flow = protocol_module.FlowControl(transport)
    return ConnectionClient(transport, flow, lambda: None, [(b"date", b"today")],
                            "/v1/completions", {"x-request-id": "r"}, keep_alive, 30.0)


@pytest.mark.parametrize("headers,written", [
    ([(b"a", b"1")], b"HTTP/1.1 200 OK\r\ndate: today\r\na: 1\r\nx-request-id: r\r\n"
                     b"content-length: 2\r\n\r\nok"),
    ([(b"connection", b"close")], b"HTTP/1.1 200 OK\r\ndate: today\r\nconnection: close\r\n"
                                  b"x-request-id: r\r\ncontent-length: 2\r\n\r\nok"),
    ([(b"a", b"1\r\nset-cookie: x")], None),
    ([(b"a", b"1\nb: 2")], None),
    ([(b"a\rb", b"1")], None),
])
async def test_a_whole_reply_is_one_write_and_never_splits_a_header(
        headers: list[tuple[bytes, bytes]], written: bytes | None) -> None:
    transport = Transport()
    client = connection_client(transport)
    if written is None:
        with pytest.raises(ValueError):
            await client.whole(200, headers, b"ok")
        assert transport.written == [] and not client.responded
    else:
        await client.whole(200, headers, b"ok")
        assert transport.written == [written]
        assert client.response_complete
        assert transport.closed == (b"connection: close" in written)


async def test_a_stream_s_headers_go_out_with_its_first_part() -> None:
    transport = Transport()
    client = connection_client(transport, keep_alive=False)
    await client.begin(200, [(b"content-type", b"text/event-stream")])
    assert transport.written == [] and not client.responded  # an error could still go
    await client.part(b"data: a\n\n")
    assert client.responded
    await client.last(b"data: [DONE]\n\n")
    head, end = transport.written
    assert head.endswith(b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                         b"9\r\ndata: a\n\n\r\n")
    assert end == b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    assert client.response_complete and transport.closed


async def test_a_stream_that_fails_before_its_first_part_can_still_answer_an_error() -> None:
    transport = Transport()
    client = connection_client(transport)
    await client.begin(200, [(b"content-type", b"text/event-stream")])
    await client.whole(500, [(b"content-type", b"application/json")], b"{}")
    (written,) = transport.written
    assert written.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"chunked" not in written and written.endswith(b"content-length: 2\r\n\r\n{}")


async def test_what_escapes_the_routes_is_a_500_that_ends_the_connection() -> None:
    transport = Transport()
    client = connection_client(transport)

    async def broken(_: Any) -> None:
        raise KeyError("a bug")

    await client.run(broken)
    (written,) = transport.written
    assert written.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"connection: close\r\n" in written and b'"request_id":"r"' in written
    assert transport.closed and client.task is None
