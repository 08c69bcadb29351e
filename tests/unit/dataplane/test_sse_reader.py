"""Streams that end or pause in ways vLLM does not use but a proxy in between may: a last
event without its blank line, or without its newline, and events without data."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest

from tests.unit.fake_worker import KEY, MODEL, Stream, chunk
from tests.unit.harness import build

USAGE = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
BODY = [chunk("good"), b"event: ping\n\n", b": a comment\n\n", chunk("", "stop"),
        chunk(usage=USAGE)]


@pytest.mark.parametrize("ending", [b"data: [DONE]\n\n", b"data: [DONE]\n", b"data: [DONE]"])
async def test_a_stream_ends_well_however_its_last_event_ends(tmp_path: Path,
                                                             ending: bytes) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=Stream([*BODY, ending]))
    h = build(tmp_path, handler)
    async with h.running() as client:
        response = await client.post(
            "/inference/v1/completions", headers={"authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "prompt": "x", "stream": True})
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and "event: error" not in response.text
    texts = [orjson.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    assert texts == ["good", ""]
    (record,) = h.gateway.ledger.kept
    assert (record.status, record.completion_tokens) == ("ok", 1)
