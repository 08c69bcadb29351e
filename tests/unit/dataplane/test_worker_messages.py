"""A worker's 400 message passes through with the model the client asked for in place of
the name the worker serves it under (whole names only)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.unit.fake_worker import KEY, MODEL
from tests.unit.harness import build


def handler(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "served-x", "parent": None}]})
    return httpx.Response(400, json={"error": {
        "message": "served-x is not a multimodal model (see served-x-docs)\nTraceback..."}})


async def test_the_worker_message_names_the_model_asked(tmp_path: Path) -> None:
    h = build(tmp_path, handler)
    async with h.running() as client:
        response = await client.post(
            "/inference/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == \
        f"{MODEL} is not a multimodal model (see served-x-docs)"
    (record,) = h.gateway.ledger.kept
    assert (record.status, record.http_status) == ("error", 400)
