"""Embeddings through the gateway from a real all-MiniLM-L6-v2 worker (vLLM's pooling runner
on CPU), with the `openai` SDK: the vectors equal what the model computes with transformers
(mean pooling, then normalized, as its sentence-transformers config says)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import yaml

from gateway.controlplane.registry import hash_key
from tests.conftest import DATA_DIR, free_port
from tests.e2e.conftest import API_KEY
from tests.e2e.processes import start_gateway, start_worker

pytestmark = pytest.mark.e2e
MODEL = "accounts/fireworks/models/all-minilm-l6-v2"
TEXTS = ["The capital of France is Paris.", "A cat sat on the mat."]


@pytest.fixture(scope="module")
def embed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from engine_plugins.models import prepare_minilm

    model_dir = prepare_minilm(DATA_DIR)
    worker_port = free_port()
    worker = start_worker(model_dir, worker_port, "--runner", "pooling",
                          "--served-model-name", "minilm", plugins=False)
    registry = tmp_path_factory.mktemp("embed") / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(API_KEY)]}],
        "deployments": [{"id": "minilm", "account": "fireworks", "model": MODEL,
                         "default": True, "task": "embed",
                         "replicas": [{"url": f"http://127.0.0.1:{worker_port}"}]}]}))
    port = free_port()
    gateway = start_gateway(registry, port)
    yield f"http://127.0.0.1:{port}", model_dir
    gateway.stop()
    worker.stop()


def reference(model_dir: Path, texts: list[str], normalize: bool = True) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    if not normalize:
        return pooled.numpy()
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_vectors_equal_the_models_own(embed_stack: tuple[str, Path]) -> None:
    url, model_dir = embed_stack
    client = openai.OpenAI(api_key=API_KEY, base_url=f"{url}/inference/v1", max_retries=0)
    answer = client.embeddings.create(model=MODEL, input=TEXTS)
    vectors = np.array([item.embedding for item in answer.data])
    assert vectors.shape == (2, 384) and answer.model == MODEL
    assert np.allclose(vectors, reference(model_dir, TEXTS), atol=1e-4)
    assert answer.usage.prompt_tokens > 0
    raw = httpx.post(f"{url}/inference/v1/embeddings", timeout=60,
                     headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), np.float32)
    assert np.allclose(decoded, vectors[0], atol=1e-5)


def test_langchain_fireworks_embeddings(embed_stack: tuple[str, Path]) -> None:
    from langchain_fireworks import FireworksEmbeddings

    url, model_dir = embed_stack
    embeddings = FireworksEmbeddings(api_key=API_KEY, model=MODEL)
    # The integration builds its client for api.fireworks.ai: point that client here.
    embeddings.client = openai.OpenAI(api_key=API_KEY, base_url=f"{url}/inference/v1")
    documents = np.array(embeddings.embed_documents(TEXTS))
    assert np.allclose(documents, reference(model_dir, TEXTS), atol=1e-4)
    assert np.allclose(embeddings.embed_query(TEXTS[1]), documents[1], atol=1e-5)


def test_token_ids_and_refusals(embed_stack: tuple[str, Path]) -> None:
    url, model_dir = embed_stack
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(TEXTS[0])["input_ids"]
    client = openai.OpenAI(api_key=API_KEY, base_url=f"{url}/inference/v1", max_retries=0)
    by_ids = client.embeddings.create(model=MODEL, input=[ids]).data[0].embedding
    by_text = client.embeddings.create(model=MODEL, input=TEXTS[0]).data[0].embedding
    assert np.allclose(by_ids, by_text, atol=1e-5)
    with pytest.raises(openai.BadRequestError):  # this deployment embeds; it does not chat
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):  # an unknown field, as everywhere
        client.embeddings.create(model=MODEL, input="x", extra_body={"nope": 1})


def test_fireworks_extras(embed_stack: tuple[str, Path]) -> None:
    """normalize, prompt_template with text and object inputs, perf_metrics_in_response and
    the prompt-cache keys, against the model's own vectors."""
    url, model_dir = embed_stack

    def embed(**body: object) -> dict[str, object]:
        answer = httpx.post(f"{url}/inference/v1/embeddings", timeout=60,
                            headers={"Authorization": f"Bearer {API_KEY}"},
                            json={"model": MODEL} | body)
        assert answer.status_code == 200, answer.text
        data: dict[str, object] = answer.json()
        return data

    def vectors(data: dict[str, object]) -> np.ndarray:
        return np.array([item["embedding"] for item in data["data"]])  # type: ignore[attr-defined]

    raw = vectors(embed(input=TEXTS, normalize=False))
    assert np.allclose(raw, reference(model_dir, TEXTS, normalize=False), atol=1e-4)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    normalized = vectors(embed(input=TEXTS, normalize=True))
    assert np.allclose(normalized, reference(model_dir, TEXTS), atol=1e-4)
    objects = [{"city": "Paris", "country": "France"}, {"city": "Rome", "country": "Italy"}]
    templated = vectors(embed(input=objects, prompt_template="{city} is in {country}."))
    texts = ["Paris is in France.", "Rome is in Italy."]
    assert np.allclose(templated, reference(model_dir, texts), atol=1e-4)
    one = vectors(embed(input="Paris", prompt_template="The capital of France is {text}."))
    assert np.allclose(one[0], reference(model_dir, [TEXTS[0]])[0], atol=1e-4)
    measured = embed(input=TEXTS[0], perf_metrics_in_response=True, prompt_cache_key="k",
                     prompt_cache_isolation_key="tenant-1")
    perf = measured["perf_metrics"]
    assert isinstance(perf, dict)
    assert perf["prompt-tokens"] == measured["usage"]["prompt_tokens"] > 0  # type: ignore[index]
    assert perf["deployment"] == "accounts/fireworks/deployments/minilm"
    assert perf["server-processing-time"] > 0
    refused = httpx.post(f"{url}/inference/v1/embeddings", timeout=60,
                         headers={"Authorization": f"Bearer {API_KEY}"},
                         json={"model": MODEL, "input": "x", "return_logits": [0]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "return_logits"


def test_rerank_scores_are_the_models_own(embed_stack: tuple[str, Path]) -> None:
    """Rerank on the embedding deployment: the cosine similarity of the model's own
    (transformers) vectors, best first, top_n of them, the documents when asked."""
    url, model_dir = embed_stack
    query = "Which city is the capital of France?"
    documents = ["A cat sat on the mat.", "Paris is the capital of France.",
                 "Berlin is in Germany.", "The French capital has many museums."]
    answer = httpx.post(f"{url}/inference/v1/rerank", timeout=60,
                        headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"model": MODEL, "query": query, "documents": documents,
                              "top_n": 3, "return_documents": True})
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    vectors = reference(model_dir, [query, *documents])
    expected = vectors[1:] @ vectors[0]
    order = [int(i) for i in np.argsort(-expected)[:3]]
    assert [row["index"] for row in reply["data"]] == order
    for row in reply["data"]:
        assert abs(row["relevance_score"] - float(expected[row["index"]])) < 1e-3
        assert row["document"] == documents[row["index"]]
    assert reply["model"] == MODEL and reply["usage"]["prompt_tokens"] > 0
    bare = httpx.post(f"{url}/inference/v1/rerank", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": MODEL, "query": query, "documents": documents})
    assert [row["index"] for row in bare.json()["data"]] == \
        [int(i) for i in np.argsort(-expected)]
    assert all("document" not in row for row in bare.json()["data"])
