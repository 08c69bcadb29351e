"""What the gateway asks a worker besides the request itself: prompt lengths and rendered
prompts (/tokenize), the text of token ids (/detokenize, for logprobs, whose alternatives
vLLM can only name by id), and the name it serves its model under (/v1/models). An API
reaches these through the `Worker` of its attempt (gateway/api.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.dataplane.workers import WorkerClient
from gateway.errors import WorkerFault

TEXT_QUERIES = 8  # /detokenize requests one request has open at once


class WorkerQueries:
    """The queries, with what does not change cached: token texts per model (what the
    tokenizer depends on, so a deployment that changes model does not keep the old
    model's texts), and each worker's served model name."""

    def __init__(self, client: WorkerClient) -> None:
        self.client = client
        self.vocabularies: dict[str, dict[int, str]] = {}
        self.served_names: dict[str, str] = {}

    async def texts(self, model: str, worker_url: str, ids: Iterable[int]
                    ) -> dict[int, str]:
        """The text of each id, asked of the worker once per model, TEXT_QUERIES at a time:
        one logprobs answer may name thousands of ids, and each is one /detokenize."""
        vocabulary = self.vocabularies.setdefault(model, {})
        missing = sorted({i for i in ids if i not in vocabulary})
        for start in range(0, len(missing), TEXT_QUERIES):
            some = missing[start:start + TEXT_QUERIES]
            decoded = await asyncio.gather(*[self.detokenize(worker_url, [i]) for i in some])
            vocabulary.update(zip(some, decoded, strict=True))
        return vocabulary

    async def detokenize(self, worker_url: str, ids: list[int]) -> str:
        data = await self.client.post_json(f"{worker_url}/detokenize", {"tokens": ids})
        if not isinstance(data.get("prompt"), str):
            raise WorkerFault("/detokenize answered without a prompt")
        return str(data["prompt"])

    async def tokenize(self, worker_url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /tokenize: `{"count", "max_model_len", "tokens"}`."""
        data = await self.client.post_json(f"{worker_url}/tokenize", body)
        tokens, count, context = data.get("tokens"), data.get("count"), data.get("max_model_len")
        if not (isinstance(tokens, list) and isinstance(count, int)
                and isinstance(context, int)):
            raise WorkerFault("/tokenize answered without tokens, count or max_model_len")
        return data

    async def served_model(self, worker_url: str) -> str:
        """The model name the worker serves (what the Messages API must name), asked once."""
        name = self.served_names.get(worker_url)
        if name is None:
            data = await self.client.get(worker_url + "/v1/models", 10.0)
            try:
                models = orjson.loads(data[1])["data"] if data and data[0] == 200 else []
                name = next(m["id"] for m in models if not m.get("parent"))
            except (orjson.JSONDecodeError, KeyError, TypeError, StopIteration) as exc:
                raise WorkerFault(f"{worker_url}/v1/models named no model") from exc
            self.served_names[worker_url] = name
        return name


@dataclass
class ReplicaWorker:
    """The worker of one attempt, as an API sees it (gateway.api.Worker)."""

    url: str
    queries: WorkerQueries

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.queries.tokenize(self.url, body)

    async def detokenize(self, ids: list[int]) -> str:
        return await self.queries.detokenize(self.url, ids)

    async def token_texts(self, model: str, ids: Iterable[int]) -> dict[int, str]:
        return await self.queries.texts(model, self.url, ids)

    async def served_model(self) -> str:
        return await self.queries.served_model(self.url)
