"""A fast fake OpenAI-compatible upstream (what a worker answers, without a model):
`python -m bench.fake_upstream PORT`. Streams 64 chunks when asked to stream.

A benchmark of a proxy needs an upstream much faster than the proxy, or it measures the
upstream: this one is a bare asyncio protocol on uvloop with httptools' parser, and every
answer is bytes prepared at start (a whole stream goes out in one write, each event its own
HTTP chunk, as vLLM sends them). `make bench-gateway` prints its own rate beside the proxies'.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import orjson

CHUNKS = 64
USAGE = {"prompt_tokens": 8, "completion_tokens": CHUNKS, "total_tokens": 8 + CHUNKS,
         "prompt_tokens_details": {"cached_tokens": 0}}


def _chunk(chat: bool, index: int, finish: str | None, usage: dict[str, object] | None
           ) -> bytes:
    choice: dict[str, object] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["delta"] = {"content": f" tok{index}"}
    else:
        choice["text"] = f" tok{index}"
    body = {"id": "cmpl-fake", "object": "chat.completion.chunk" if chat else
            "text_completion", "created": 1, "model": "fake", "choices": [choice],
            "usage": usage}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _plain(content_type: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def _stream(chat: bool) -> bytes:
    events = [_chunk(chat, i, "length" if i == CHUNKS - 1 else None, USAGE)
              for i in range(CHUNKS)]
    events.append(b"data: " + orjson.dumps({"id": "cmpl-fake", "object": "text_completion",
                                            "created": 1, "model": "fake", "choices": [],
                                            "usage": USAGE}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n")


def _completion(chat: bool) -> bytes:
    if chat:
        choice: dict[str, object] = {"index": 0, "finish_reason": "length", "logprobs": None,
                                     "message": {"role": "assistant",
                                                 "content": " tok" * CHUNKS}}
    else:
        choice = {"index": 0, "text": " tok" * CHUNKS, "finish_reason": "length",
                  "logprobs": None}
    return _plain(b"application/json", orjson.dumps({
        "id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
        "created": 1, "model": "fake", "choices": [choice], "usage": USAGE}))


ANSWERS = {(chat, stream): _stream(chat) if stream else _completion(chat)
           for chat in (False, True) for stream in (False, True)}
HEALTH = _plain(b"application/json", b"{}")
MODELS = _plain(b"application/json", b'{"object":"list","data":[{"id":"fake"}]}')
METRICS = _plain(b"text/plain", b"")
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, body = self.url, b"".join(self.body)
        self.url, self.body = b"", []
        if url.endswith(b"/completions"):
            stream = b'"stream":true' in body or b'"stream": true' in body
            answer = ANSWERS[(b'"messages"' in body, stream)]
        else:
            answer = {b"/health": HEALTH, b"/v1/models": MODELS,
                      b"/metrics": METRICS}.get(url, NOT_FOUND)
        assert self.transport is not None
        self.transport.write(answer)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", port,
                                                            backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - the gateway's own dependency
        pass
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
