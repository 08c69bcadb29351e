"""A fast fake OpenAI-compatible upstream (what a worker answers, without a model):
`python -m bench.fake_upstream PORT`. Streams 64 chunks when asked to stream."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

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


async def completions(request: Request) -> Response:
    body = orjson.loads(await request.body())
    chat = "messages" in body
    if body.get("stream"):
        async def events() -> AsyncIterator[bytes]:
            for i in range(CHUNKS):
                yield _chunk(chat, i, "length" if i == CHUNKS - 1 else None, USAGE)
            yield b"data: " + orjson.dumps({"id": "cmpl-fake", "object": "text_completion",
                                            "created": 1, "model": "fake", "choices": [],
                                            "usage": USAGE}) + b"\n\n"
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    choice = {"index": 0, "text": " tok" * CHUNKS, "finish_reason": "length", "logprobs": None}
    return Response(orjson.dumps({"id": "cmpl-fake", "object": "text_completion",
                                  "created": 1, "model": "fake", "choices": [choice],
                                  "usage": USAGE}), media_type="application/json")


async def health(request: Request) -> Response:
    return Response("ok")


app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                        Route("/v1/chat/completions", completions, methods=["POST"]),
                        Route("/health", health)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
