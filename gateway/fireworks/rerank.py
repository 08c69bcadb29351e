"""Rerank (`/inference/v1/rerank`) as an inference API object.

The worker is vLLM's pooling runner (a deployment whose task is embed), which serves
`/rerank`: with a cross-encoder it scores each (query, document) pair, with an embedding
model (the default stack's all-MiniLM-L6-v2) it scores by the cosine similarity of the
query's and the document's embeddings. The answer is checked (every index once, in range;
finite scores), put in Fireworks' shape (`data: [{index, relevance_score, document?}]`,
best first, at most `top_n`) and its token count goes to the usage record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, Field, StrictBool

from gateway.api import Api, Call, Reply, Served, Worker, worker_json
from gateway.config import Settings
from gateway.controlplane.registry import Route
from gateway.errors import GatewayError, WorkerFault
from gateway.fireworks.protocol import Strict

MAX_DOCUMENTS = 1000


class RerankRequest(Strict):
    model: str
    query: Annotated[str, Field(min_length=1)]
    documents: Annotated[list[str], Field(min_length=1, max_length=MAX_DOCUMENTS)]
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: StrictBool = False
    task: str | None = None


def rerank_body(request: RerankRequest, route: Route) -> dict[str, Any]:
    """Pure: the worker request (vLLM's /rerank), or a 400 naming the field."""
    deployment = route.deployment
    if deployment.task != "embed":
        raise GatewayError(400, f"Deployment {deployment.name} generates text; rerank needs "
                                "a deployment whose task is embed", param="model")
    if request.task is not None:
        raise GatewayError(400, "task is not supported: the deployment's reranker takes no "
                                "instruction", param="task")
    return {"query": request.query, "documents": request.documents,
            "top_n": request.top_n or len(request.documents)}


def reshape(data: Any, documents: list[str], top_n: int, return_documents: bool,
            model: str) -> dict[str, Any]:
    """Pure: vLLM's rerank answer -> Fireworks' (WorkerFault when it is not valid)."""
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise WorkerFault(f"not a rerank answer: {str(data)[:200]}")
    scored: dict[int, float] = {}
    for result in results:
        index = result.get("index") if isinstance(result, dict) else None
        score = result.get("relevance_score") if isinstance(result, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) \
                or not 0 <= index < len(documents) or index in scored \
                or not isinstance(score, (int, float)) or isinstance(score, bool) \
                or not math.isfinite(score):
            raise WorkerFault(f"not a rerank result: {str(result)[:200]}")
        scored[index] = float(score)
    if len(scored) != min(top_n, len(documents)):
        raise WorkerFault(f"{len(scored)} rerank results for {len(documents)} documents, "
                          f"top {top_n}")
    ranked = sorted(scored.items(), key=lambda item: (-item[1], item[0]))
    rows = [{"index": index, "relevance_score": score}
            | ({"document": documents[index]} if return_documents else {})
            for index, score in ranked]
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt = usage.get("prompt_tokens", usage.get("total_tokens", 0))
    prompt = prompt if isinstance(prompt, int) and prompt >= 0 else 0
    return {"object": "list", "model": model, "data": rows,
            "usage": {"prompt_tokens": prompt, "completion_tokens": 0,
                      "total_tokens": prompt}}


@dataclass(kw_only=True)
class RerankCall(Call):
    """One answer, never streamed, nothing generated, no cached prefix worth routing on."""

    model: str  # the Fireworks id the client asked for, which answers carry
    return_documents: bool = False

    def prompt_estimate(self) -> int:
        """The query once per document, and the documents: four characters per token."""
        query, documents = self.body["query"], self.body["documents"]
        return (len(query) * len(documents) + sum(len(d) for d in documents)) // 4 + 1

    async def reply(self, raw: bytes, worker: Worker, served: Served) -> Reply:
        data = reshape(worker_json(raw), self.body["documents"], self.body["top_n"],
                       self.return_documents, self.model)
        served.first_token()
        served.usage = data["usage"]
        return Reply(orjson.dumps(data), [])


class RerankApi(Api):
    path = "/rerank"
    worker_path = "/rerank"
    request_model: type[BaseModel] = RerankRequest

    def translate(self, request: RerankRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> RerankCall:
        return RerankCall(body=rerank_body(request, route), model=route.requested_model,
                          return_documents=request.return_documents,
                          sequences=len(request.documents))
