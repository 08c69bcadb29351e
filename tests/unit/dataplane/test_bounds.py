"""Nothing a client sends is amplified past a bound on the shared path (dataplane/request.py,
`bounded`): the sequences one request asks for (prompts x n, embedding inputs, documents),
the size of the worker request as translated, and templates counted before they are
rendered; a batch reserves and queues as the sequences it asks for."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.api import Call
from gateway.config import Settings
from gateway.dataplane.request import bounded
from gateway.errors import GatewayError
from gateway.validation import check_metadata
from tests.unit.fake_worker import MODEL
from tests.unit.harness import COMPLETION, EMBEDDER, Harness, build, with_embedder

EMBEDDINGS = {"object": "list", "data": [{"index": 0, "object": "embedding",
                                          "embedding": [0.5]}],
              "usage": {"prompt_tokens": 1, "total_tokens": 1}}


def worker(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/embeddings":
        return httpx.Response(200, json=EMBEDDINGS)
    return httpx.Response(200, json=COMPLETION)


@pytest.fixture
def gateway(tmp_path: Path) -> Harness:
    return build(tmp_path, worker, registry_of=with_embedder, max_sequences=8,
                 max_body_bytes=64 << 10)


def posted(gateway: Harness) -> int:
    assert gateway.workers is not None
    return sum(r.method == "POST" for r in gateway.workers.served.requests)


async def test_a_template_that_multiplies_a_small_body_is_refused_before_rendering(
        gateway: Harness) -> None:
    # The measured attack: ten 10 KB texts and a template of 2,000 {text}: 200 MB rendered
    # from a body of 130 KB (here under a 64 KB limit: 4 texts of 10 KB, 20 MB rendered).
    body = {"model": EMBEDDER, "input": ["x" * 10_000] * 4,
            "prompt_template": "{text}" * 2000}
    tracemalloc.start()
    try:
        response = await gateway.once("POST", "/inference/v1/embeddings", json=body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt_template"
    assert "65536 bytes" in response.json()["error"]["message"]
    assert peak < 8 << 20  # nothing near the 80 MB the rendering would have taken
    assert posted(gateway) == 0


async def test_a_template_field_that_is_an_object_is_a_400(gateway: Harness) -> None:
    nested = '{"a":' * 900 + '"x"' + "}" * 900  # str() of it exhausts the recursion limit
    for value in (nested, '["x"]', "null"):
        body = f'{{"model": "{EMBEDDER}", "input": [{{"a": {value}}}], ' \
               '"prompt_template": "{a}"}'
        response = await gateway.once("POST", "/inference/v1/embeddings", content=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "prompt_template"
    assert posted(gateway) == 0


async def test_a_template_within_the_limit_is_rendered(gateway: Harness) -> None:
    body = {"model": EMBEDDER, "input": ["ab", "c"], "prompt_template": "q: {text} {text}"}
    response = await gateway.once("POST", "/inference/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    assert gateway.workers is not None
    (sent,) = [orjson.loads(r.content) for r in gateway.workers.served.requests]
    assert sent["input"] == ["q: ab ab", "q: c c"]


@pytest.mark.parametrize(("path", "body"), [
    ("/completions", {"model": MODEL, "prompt": ["a", "b", "c"], "n": 3}),  # 9 sequences
    ("/completions", {"model": MODEL, "prompt": ["a"] * 9}),
    ("/chat/completions", {"model": MODEL, "n": 9,
                           "messages": [{"role": "user", "content": "hi"}]}),
    ("/embeddings", {"model": EMBEDDER, "input": ["a"] * 9}),
    ("/rerank", {"model": EMBEDDER, "query": "q", "documents": ["a"] * 9}),
])
async def test_more_sequences_than_the_bound_are_refused_before_any_work(
        gateway: Harness, path: str, body: dict[str, Any]) -> None:
    response = await gateway.once("POST", f"/inference/v1{path}", json=body)
    assert response.status_code == 400, response.text
    assert "9 sequences" in response.json()["error"]["message"]
    assert posted(gateway) == 0


async def test_as_many_sequences_as_the_bound_are_served(gateway: Harness) -> None:
    body = {"model": MODEL, "prompt": ["a", "b", "c", "d"], "n": 2}
    response = await gateway.once("POST", "/inference/v1/completions", json=body)
    assert response.status_code == 200, response.text


async def test_a_batch_reserves_output_for_every_sequence(tmp_path: Path) -> None:
    def limited(urls: dict[str, str]) -> dict[str, Any]:
        return with_embedder(urls, limits={"generated_tokens_per_minute": 100})

    gateway = build(tmp_path, worker, registry_of=limited)
    one = {"model": MODEL, "prompt": "a", "n": 2, "max_tokens": 20}  # 40 tokens
    batch = {"model": MODEL, "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 20}  # 120
    assert (await gateway.once("POST", "/inference/v1/completions",
                               json=one)).status_code == 200
    refused = await gateway.once("POST", "/inference/v1/completions", json=batch)
    assert refused.status_code == 429, refused.text
    assert posted(gateway) == 1


def test_a_translation_past_the_body_limit_never_reaches_a_worker() -> None:
    settings = Settings(max_body_bytes=1000)
    assert bounded(Call(body={"prompt": "x" * 900}), settings)
    with pytest.raises(GatewayError) as raised:
        bounded(Call(body={"prompt": "x" * 1000}), settings)
    assert raised.value.status == 413 and "1013 bytes" in raised.value.message
    with pytest.raises(GatewayError) as raised:
        bounded(Call(body={}, sequences=2049), Settings())
    assert raised.value.status == 400


# Metadata goes into every usage record (and a stored response): bounded on every API that
# takes it, as OpenAI bounds it (Anthropic's: one user id of at most 256 characters).
METADATA_APIS = {
    "/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    "/completions": {"model": MODEL, "prompt": "hi"},
    "/responses": {"model": MODEL, "input": "hi"},
}
HOSTILE_METADATA = [
    {f"k{n}": "v" for n in range(17)},  # 17 pairs
    {"k" * 65: "v"},  # a 65-character key
    {"k": "v" * 513},  # a 513-character value
    {"k": {"nested": "x" * 10_000}},  # not a string
]


@pytest.mark.parametrize("path", sorted(METADATA_APIS))
@pytest.mark.parametrize("metadata", HOSTILE_METADATA)
async def test_metadata_past_the_bound_is_refused_on_every_api(
        gateway: Harness, path: str, metadata: dict[str, Any]) -> None:
    response = await gateway.once("POST", f"/inference/v1{path}",
                                  json=METADATA_APIS[path] | {"metadata": metadata})
    assert response.status_code == 400, response.text
    assert str(response.json()["error"]["param"]).startswith("metadata")
    assert posted(gateway) == 0


@pytest.mark.parametrize("metadata", [{"user_id": "u" * 257}, {"tenant": "x"}])
async def test_messages_metadata_is_anthropics_bounded_user_id(
        gateway: Harness, metadata: dict[str, Any]) -> None:
    body = {"model": MODEL, "max_tokens": 4, "metadata": metadata,
            "messages": [{"role": "user", "content": "hi"}]}
    response = await gateway.once("POST", "/inference/v1/messages", json=body)
    assert response.status_code == 400, response.text
    assert "metadata" in response.json()["error"]["message"]
    assert posted(gateway) == 0


async def test_metadata_within_the_bound_is_kept_with_the_usage_record(
        gateway: Harness) -> None:
    metadata = {f"k{n:02d}" + "k" * 60: "v" * 512 for n in range(16)}
    response = await gateway.once("POST", "/inference/v1/completions",
                                  json=METADATA_APIS["/completions"] | {"metadata": metadata})
    assert response.status_code == 200, response.text
    (record,) = gateway.gateway.ledger.kept
    assert record.metadata == metadata


def test_the_shared_path_bounds_whatever_metadata_a_call_carries() -> None:
    check_metadata(None)
    check_metadata({"k": "v"})
    for metadata in [*HOSTILE_METADATA, ["not", "a", "map"]]:
        with pytest.raises(GatewayError) as raised:
            check_metadata(metadata)
        assert raised.value.param == "metadata"
