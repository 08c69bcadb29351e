"""What the gateway asks a worker besides the request (dataplane/queries.py): token texts
fetched a few at a time and once per model, however many ids one answer names."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.dataplane.queries import TEXT_QUERIES, WorkerQueries


class Detokenizer:
    """A worker client whose /detokenize answers `<id>`, counting how many are open at once."""

    def __init__(self) -> None:
        self.open = self.most = self.asked = 0

    async def post_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        self.open += 1
        self.asked += 1
        self.most = max(self.most, self.open)
        await asyncio.sleep(0.001)
        self.open -= 1
        return {"prompt": f"<{body['tokens'][0]}>"}


async def test_token_texts_are_fetched_a_few_at_a_time_and_once_per_model() -> None:
    client = Detokenizer()
    queries = WorkerQueries(client)  # type: ignore[arg-type]
    texts = await queries.texts("m", "http://w", range(1000))  # one hostile logprobs answer
    assert texts[999] == "<999>" and len(texts) == 1000
    assert client.most == TEXT_QUERIES and client.asked == 1000
    await queries.texts("m", "http://w", range(1000))
    assert client.asked == 1000  # known for this model: not asked again
    await queries.texts("other", "http://w", [1])
    assert client.asked == 1001
