"""/embeddings: the embeddings API object, its translation (pure) and its Call (vectors
back: float lists, or base64 strings)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel

from gateway.api import Api, Call, Reply, Served, Worker, coerce_usage, worker_json
from gateway.config import Settings
from gateway.controlplane.registry import Deployment, Route
from gateway.errors import GatewayError, WorkerFault
from gateway.fireworks.perf import perf_metrics
from gateway.fireworks.protocol import EmbeddingRequest, prompt_list_estimate
from gateway.fireworks.sampling import cache_scope


class EmbeddingsApi(Api):
    path = "/embeddings"
    worker_path = "/v1/embeddings"
    request_model: type[BaseModel] = EmbeddingRequest

    def translate(self, request: EmbeddingRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> EmbeddingCall:
        body = embedding_body(request, route.deployment, settings.max_body_bytes)
        inputs = body["input"]
        several = isinstance(inputs, list) and not isinstance(inputs[0], int)
        return EmbeddingCall(body=body, model=route.requested_model, request=request,
                             sequences=len(inputs) if several else 1,
                             affinity=request.prompt_cache_key or request.user,
                             cache_scope=cache_scope(request),
                             perf_metrics_in_response=bool(request.perf_metrics_in_response))


@dataclass(kw_only=True)
class EmbeddingCall(Call):
    """One answer, never streamed, nothing generated, no cached prefix worth routing on."""

    model: str  # the Fireworks id the client asked for, which answers carry
    request: EmbeddingRequest  # as the client sent it
    perf_metrics_in_response: bool = False

    def prompt_estimate(self) -> int:
        return prompt_list_estimate(self.request.input)

    async def reply(self, raw: bytes, worker: Worker, served: Served) -> Reply:
        data = worker_json(raw)
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get("embedding"), (list, str))
                for i in items):
            raise WorkerFault(f"not an embedding list: {str(data)[:200]}")
        served.first_token()
        served.usage = data.get("usage")
        data["model"] = self.model
        if self.perf_metrics_in_response:  # the keys chat's have, as far as they apply
            data["perf_metrics"] = perf_metrics(served, coerce_usage(served.usage), None,
                                                complete=True)
        return Reply(orjson.dumps(data), [])


def embedding_body(request: EmbeddingRequest, deployment: Deployment,
                   max_bytes: int) -> dict[str, Any]:
    """/embeddings: vLLM's own shape; the deployment must embed. `normalize` is vLLM's
    pooling activation (the embed pooler's is normalization); `prompt_template` is applied
    here, so the workers see plain texts, rendered only when they fit in `max_bytes`."""
    if deployment.task != "embed":
        raise GatewayError(400, f"Deployment {deployment.name} generates text; embeddings "
                                "come from a deployment whose task is embed", param="model")
    if request.return_logits is not None:
        raise GatewayError(400, "return_logits is not supported: the workers' pooling "
                                "runner returns embeddings only", param="return_logits")
    body = request.model_dump(exclude_none=True, include={"dimensions", "encoding_format",
                                                          "user"})
    body["input"] = embedding_input(request.input, request.prompt_template, max_bytes)
    if request.normalize is not None:
        body["use_activation"] = request.normalize
    return body


_FIELD = re.compile(r"\{(\w+)\}")


def embedding_input(given: Any, template: str | None, max_bytes: int) -> Any:
    """The input as the workers take it. With a template each text (as `{text}`) or object
    (its fields, as `{name}`) becomes one string; objects need a template. Each reference
    copies its field, so a small body can ask for a huge one: the rendered size is counted
    first, and past `max_bytes` (the gateway's body limit) nothing is rendered (400)."""
    several = isinstance(given, list)
    items = given if several else [given]
    if template is None:
        if any(isinstance(item, dict) for item in items):
            raise GatewayError(400, "input objects need a prompt_template that places their "
                                    "fields", param="input")
        return given
    if "{{" in template or "{%" in template:
        raise GatewayError(400, "prompt_template: only {field} substitution is supported",
                           param="prompt_template")
    names = _FIELD.findall(template)
    fixed = len(_FIELD.sub("", template).encode())
    placed: list[dict[str, str]] = []
    size = 0
    for item in items:
        if isinstance(item, (int, list)):  # token ids
            raise GatewayError(400, "prompt_template applies to texts and objects, not to "
                                    "token ids", param="prompt_template")
        fields = item if isinstance(item, dict) else {"text": item}
        missing = sorted({name for name in names if name not in fields})
        if missing:
            raise GatewayError(400, f"prompt_template names {missing[0]!r}, which the input "
                                    "does not have", param="prompt_template")
        texts = {name: _text(fields[name], name) for name in set(names)}
        size += fixed + sum(len(texts[name].encode()) for name in names)
        if size > max_bytes:
            raise GatewayError(400, f"prompt_template would render more than {max_bytes} "
                                    "bytes (the gateway's request size limit)",
                               param="prompt_template")
        placed.append(texts)
    rendered = [_render(template, texts) for texts in placed]
    return rendered if several else rendered[0]


def _text(value: Any, name: str) -> str:
    """A field as the template places it: text, numbers and booleans only (an object of any
    depth has no one text form)."""
    if not isinstance(value, (str, int, float, bool)):
        raise GatewayError(400, f"prompt_template places {name!r}, which is not a text, "
                                "number or boolean", param="prompt_template")
    return str(value)


def _render(template: str, texts: dict[str, str]) -> str:
    return _FIELD.sub(lambda match: texts[match.group(1)], template)
