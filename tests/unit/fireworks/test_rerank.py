"""Rerank: the worker request and the answer's reshaping, by table; worker answers that are
not valid are faults."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.controlplane.registry import Deployment, Route
from gateway.errors import GatewayError, WorkerFault
from gateway.fireworks.rerank import RerankRequest, rerank_body, reshape
from tests.unit.fake_worker import KEY
from tests.unit.harness import build, registry

MODEL = "accounts/fireworks/models/m"  # fake_worker's
DOCS = ["a", "b", "c"]


def route(task: str = "embed") -> Route:
    return Route(Deployment(id="d", account="fireworks", model=MODEL, task=task), MODEL)


def request(**fields: Any) -> RerankRequest:
    return RerankRequest.model_validate({"model": MODEL, "query": "q", "documents": DOCS}
                                        | fields)


def results(*pairs: tuple[int, float]) -> dict[str, Any]:
    return {"results": [{"index": i, "relevance_score": s, "document": {"text": DOCS[i]}}
                        for i, s in pairs], "usage": {"prompt_tokens": 12, "total_tokens": 12}}


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, {"query": "q", "documents": DOCS, "top_n": 3}),
    ({"top_n": 2}, {"query": "q", "documents": DOCS, "top_n": 2}),
    ({"top_n": 9, "return_documents": True}, {"query": "q", "documents": DOCS, "top_n": 9}),
])
def test_the_worker_request(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    assert rerank_body(request(**fields), route()) == expected


@pytest.mark.parametrize(("fields", "task", "param"), [
    ({"task": "find code"}, "embed", "task"),
    ({}, "generate", "model"),
])
def test_refusals_name_the_field(fields: dict[str, Any], task: str, param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        rerank_body(request(**fields), route(task))
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize("fields", [{"documents": []}, {"query": ""}, {"top_n": 0},
                                    {"documents": [1]}, {"return_documents": "yes"}])
def test_invalid_requests(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        request(**fields)


@pytest.mark.parametrize(("answer", "top_n", "documents", "rows"), [
    (results((1, 0.9), (0, 0.5), (2, 0.1)), 3, False,
     [{"index": 1, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.5},
      {"index": 2, "relevance_score": 0.1}]),
    # sorted here whatever the worker's order; ties by index
    (results((2, 0.1), (0, 0.5), (1, 0.5)), 3, False,
     [{"index": 0, "relevance_score": 0.5}, {"index": 1, "relevance_score": 0.5},
      {"index": 2, "relevance_score": 0.1}]),
    (results((2, 0.7), (0, 0.3)), 2, True,
     [{"index": 2, "relevance_score": 0.7, "document": "c"},
      {"index": 0, "relevance_score": 0.3, "document": "a"}]),
])
def test_the_answer_in_fireworks_shape(answer: dict[str, Any], top_n: int, documents: bool,
                                       rows: list[dict[str, Any]]) -> None:
    reshaped = reshape(answer, DOCS, top_n, documents, MODEL)
    assert reshaped == {"object": "list", "model": MODEL, "data": rows,
                        "usage": {"prompt_tokens": 12, "completion_tokens": 0,
                                  "total_tokens": 12}}


@pytest.mark.parametrize("answer", [
    [], {"results": None}, results((0, 0.5), (0, 0.4), (1, 0.1)),  # an index twice
    results((0, 0.5), (1, 0.4)),  # one missing
    {"results": [{"index": 5, "relevance_score": 1.0}] * 3},  # out of range
    results((0, math.nan), (1, 0.1), (2, 0.2)),
    {"results": [{"index": True, "relevance_score": 0.1}, {"index": 1, "relevance_score": 0.1},
                 {"index": 2, "relevance_score": 0.1}]},
    {"results": [{"index": 0, "relevance_score": "high"}]},
])
def test_invalid_answers_are_faults(answer: Any) -> None:
    with pytest.raises(WorkerFault):
        reshape(answer, DOCS, 3, False, MODEL)



def worker(http: httpx.Request) -> httpx.Response:
    body = orjson.loads(http.content)
    if body["query"] == "broken":
        return httpx.Response(200, json={"results": "no"})
    return httpx.Response(200, json=results(*[(2, 0.9), (0, 0.5), (1, 0.1)][:body["top_n"]]))


async def test_through_the_gateway_with_usage_records(tmp_path: Path) -> None:
    app = build(tmp_path, worker,
                registry_of=lambda urls: registry(urls.values(), task="embed"))
    async with app.running() as client:
        async def rerank(query: str) -> httpx.Response:
            return await client.post("/inference/v1/rerank", json={
                "model": MODEL, "query": query, "documents": DOCS, "top_n": 2},
                headers={"authorization": f"Bearer {KEY}"})

        ranked = await rerank("q")
        assert ranked.status_code == 200
        assert [row["index"] for row in ranked.json()["data"]] == [2, 0]
        assert (await rerank("broken")).status_code == 502
    records = app.gateway.ledger.kept
    assert [(r.endpoint, r.status, r.prompt_tokens) for r in records] == \
        [("/rerank", "ok", 12), ("/rerank", "error", 0)]
    assert orjson.loads(app.workers.served.requests[0].content)["top_n"] == 2
