"""What the gateway asks a worker about tokens: prompt length, rendered chat prompt, and
the text of token ids (for logprobs, whose alternatives vLLM can only name by id)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from gateway.dataplane.workers import WorkerClient
from gateway.fireworks.protocol import prompts_of
from gateway.fireworks.worker_answer import WorkerFault


class TokenTexts:
    """Per-model cache of token id -> text, filled from the worker's /detokenize. Keyed by
    the model (what the tokenizer depends on), so a deployment that changes model does not
    keep the old model's texts."""

    def __init__(self, client: WorkerClient) -> None:
        self.client = client
        self.vocabularies: dict[str, dict[int, str]] = {}

    async def texts(self, model: str, worker_url: str, ids: Iterable[int]
                    ) -> dict[int, str]:
        vocabulary = self.vocabularies.setdefault(model, {})
        missing = sorted({i for i in ids if i not in vocabulary})
        if missing:
            decoded = await asyncio.gather(*[self.detokenize(worker_url, [i])
                                             for i in missing])
            vocabulary.update(zip(missing, decoded, strict=True))
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

    async def echo_texts(self, worker_url: str, prompt: Any, last: int | None) -> list[str]:
        """Completions echo: per prompt, the prompt itself or its last `last` tokens."""
        out = []
        for one in prompts_of(prompt):
            if last is None and isinstance(one, str):
                out.append(one)
                continue
            ids = one if isinstance(one, list) else \
                (await self.tokenize(worker_url, {"prompt": one}))["tokens"]
            ids = ids if last is None else ids[len(ids) - min(last, len(ids)):]
            out.append(await self.detokenize(worker_url, list(ids)) if ids else "")
        return out

    async def rendered_chat_prompt(self, worker_url: str, messages: list[dict[str, Any]]
                                   ) -> str:
        tokens = await self.tokenize(worker_url, {"messages": messages,
                                                  "add_generation_prompt": True})
        return await self.detokenize(worker_url, list(tokens["tokens"]))
