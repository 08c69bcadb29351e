"""One validated inference request: resolve, admit, attempt on replicas, relay.

resolve (registry) -> translate (fireworks/translate.py) -> admit (limits) -> an Exchange
that owns the rest -> up to two attempts: a replica from routing, the worker's answer checked
up to its first token -> on a replica fault before any byte reached the client, once more on
another replica. The Exchange ends the request (exchange.py); the endpoint decides how.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.anthropic import MessagesRequest
from gateway.config import Settings
from gateway.controlplane.limits import Admission, Limiter, RateLimited
from gateway.controlplane.registry import Account, Route
from gateway.controlplane.store import RegistryStore
from gateway.controlplane.usage import Ledger
from gateway.dataplane.adapters import Adapters
from gateway.dataplane.discovery import Discovery
from gateway.dataplane.exchange import Attempt, Exchange, new_record_id
from gateway.dataplane.messages import (
    MessageStream,
    ServedModels,
    open_message_stream,
    relay_message,
)
from gateway.dataplane.relay import (
    PlainAnswer,
    StreamAnswer,
    open_stream,
    relay_embeddings,
    relay_json,
)
from gateway.dataplane.replicas import ReplicaSet
from gateway.dataplane.tokens import TokenTexts
from gateway.dataplane.workers import WorkerClient
from gateway.errors import GatewayError
from gateway.fireworks.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    prompts_of,
)
from gateway.fireworks.translate import Plan, chat_body, completion_body, embedding_body
from gateway.fireworks.worker_answer import WorkerFault
from gateway.metrics import GatewayMetrics

logger = logging.getLogger("gateway.serving")
ATTEMPTS = 2  # the first try and one retry on another replica
Answer = PlainAnswer | StreamAnswer | MessageStream


@dataclass
class Gateway:
    """The parts one gateway process serves with (app.state.gateway)."""

    settings: Settings
    store: RegistryStore
    replicas: ReplicaSet
    limiter: Limiter
    ledger: Ledger
    metrics: GatewayMetrics
    workers: WorkerClient
    token_texts: TokenTexts
    discovery: Discovery
    adapters: Adapters
    served_models: ServedModels
    started_at: float


# What a worker counts for one image, video or audio part, before it has counted: a typical
# vision encoder's image is 256-2,048 tokens. (Counting its base64 text as characters / 4
# would reserve ~250k tokens for a 1 MB image.) The real count settles the reservation.
MEDIA_TOKENS = 1024


def prompt_estimate(body: ChatCompletionRequest | CompletionRequest | MessagesRequest
                    | EmbeddingRequest) -> int:
    """Tokens to reserve for the prompt before the worker has counted them: about four
    characters per token of text, MEDIA_TOKENS per image, video or audio part (token-id
    prompts count exactly). Settled with the real count."""
    if isinstance(body, MessagesRequest):
        return len(orjson.dumps(body.messages)) // 4 + 4 * len(body.messages)
    if isinstance(body, EmbeddingRequest):
        inputs = body.input if isinstance(body.input, list) else [body.input]
        if inputs and all(isinstance(i, int) for i in inputs):
            return len(inputs)
        return sum(len(i) if isinstance(i, list) else len(str(i)) // 4 + 1 for i in inputs)
    if isinstance(body, ChatCompletionRequest):
        total = 0
        for message in body.messages:
            total += 4
            if isinstance(message.content, list):
                total += sum(len(part.text or "") // 4 if part.type == "text" else MEDIA_TOKENS
                             for part in message.content)
            elif message.content is not None:
                total += len(message.content) // 4
        return total
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    if prompts and all(isinstance(p, int) for p in prompts):
        return len(prompts)
    return sum(len(p) if isinstance(p, list) else len(str(p)) // 4 + 1 for p in prompts)


def count_refusal(gateway: Gateway, deployment: str, endpoint: str, status: int) -> None:
    """Metrics for a request refused before it was admitted (deployment "" when
    unresolved)."""
    gateway.metrics.requests.labels(deployment, endpoint, str(status)).inc()
    gateway.metrics.errors.labels(deployment, str(status)).inc()


async def admit(gateway: Gateway, account: Account, route: Route,
                body: ChatCompletionRequest | CompletionRequest | MessagesRequest
                | EmbeddingRequest, endpoint: str, request_id: str) -> Exchange:
    """Translate and admit: the Exchange that owns the request from here on."""
    deployment = route.deployment
    record_id = new_record_id()
    if isinstance(body, MessagesRequest):  # relayed as it is; the model is named per replica
        worker_body = body.model_dump(exclude_none=True)
        plan = Plan(chat=True, stream=bool(body.stream), max_tokens=body.max_tokens,
                    messages_api=True)
    elif isinstance(body, EmbeddingRequest):
        worker_body, plan = embedding_body(body, deployment)
    elif isinstance(body, ChatCompletionRequest):
        worker_body, plan = chat_body(body, deployment, gateway.settings, account=account.id,
                                      nonce=record_id)
    else:
        worker_body, plan = completion_body(body, deployment, gateway.settings,
                                            account=account.id, nonce=record_id)
    if route.lora is not None:  # the adapter, by the name its workers know it
        worker_body["model"] = route.lora.worker_name
    try:
        encoded = orjson.dumps(worker_body)
    except orjson.JSONEncodeError as exc:  # e.g. nesting deeper than 254 levels
        raise GatewayError(400, "The request cannot be encoded: it nests too deeply") from exc
    if gateway.ledger.backlogged:
        raise GatewayError(503, "Usage records cannot be written at the moment; new requests "
                                "are refused until they can", headers={"retry-after": "5"})
    admission = Admission(record_id, account.id)  # unlimited: nothing to reserve
    if account.limits.any():
        try:
            # No choice generates past the context length, whatever max_tokens says.
            generated = min(plan.max_tokens, deployment.context_length or plan.max_tokens)
            admission = await gateway.limiter.admit(account, prompt_estimate(body),
                                                    generated * plan.n, record_id)
        except RateLimited as exc:
            gateway.metrics.rate_limited.labels(deployment.name, exc.kind).inc()
            raise
    return Exchange(gateway, account, route, admission, request_id, endpoint, plan,
                    worker_body, encoded)


async def attempt_all(exchange: Exchange, affinity: str | None) -> Answer:
    """Attempts on replicas until one answers well up to its first token."""
    gateway = exchange.gateway
    deployment, lora = exchange.route.deployment, exchange.route.lora
    prefer = None if lora is None else (lambda url: gateway.adapters.holds(url, lora))
    tried: set[str] = set()
    for attempt_number in range(ATTEMPTS):
        attempt = exchange.begin(gateway.replicas.acquire(deployment, affinity, tried, prefer))
        tried.add(attempt.lease.replica.url)
        try:
            return await _attempt(exchange, attempt)
        except GatewayError as exc:
            exchange.drop()
            if not exc.replica_fault:
                raise
            if isinstance(exc, WorkerFault):
                logger.warning("request %s: replica %s failed: %s", exchange.request_id,
                               attempt.worker_url, exc.detail)
            gateway.replicas.health.failure(attempt.lease.replica.url)
            if attempt_number + 1 == ATTEMPTS or not gateway.replicas.candidates(deployment,
                                                                                 tried):
                raise
            gateway.metrics.retries.labels(deployment.name).inc()
    raise AssertionError("unreachable")  # the loop returns or raises


async def check_context(texts: TokenTexts, worker_url: str, body: dict[str, Any],
                        max_tokens: int, param: str) -> None:
    """context_length_exceeded_behavior=error: 400 naming both numbers when a prompt and
    max_tokens do not fit. (truncate needs nothing: the worker lowers max_tokens itself.)"""
    if "messages" in body:
        queries: list[dict[str, Any]] = [{"messages": body["messages"],
                                          "add_generation_prompt": True}]
    else:
        queries = [{"prompt": p} for p in prompts_of(body["prompt"])]
    for query in queries:
        prompt = query.get("prompt")
        if isinstance(prompt, list):  # token ids: their number is the length
            counted = await texts.tokenize(worker_url, {"prompt": ""})
            counted["count"] = len(prompt)
        else:
            counted = await texts.tokenize(worker_url, query)
        count, context = int(counted["count"]), int(counted["max_model_len"])
        if count + max_tokens > context:
            raise GatewayError(400, f"The prompt is {count} tokens and max_tokens is "
                                    f"{max_tokens}, which exceeds the context length of "
                                    f"{context} tokens", param=param)


async def _open(exchange: Exchange, attempt: Attempt, body: bytes) -> None:
    """Send the request to the attempt's replica, whatever the API. With a LoRA adapter: the
    replica gets it first if it lacks it, and a 404 means it lost it since the last look (it
    restarted): it is loaded again and the request sent once more."""
    gateway, lora = exchange.gateway, exchange.route.lora
    url, headers = attempt.worker_url + exchange.endpoint, {"x-request-id": exchange.request_id}
    if lora is not None:
        await gateway.adapters.ensure(attempt.worker_url, lora)
    try:
        attempt.answer = await gateway.workers.open(url, body, headers)
    except WorkerFault as exc:
        if lora is None or exc.worker_status != 404:
            raise
        gateway.adapters.forget(attempt.worker_url, lora)
        await gateway.adapters.ensure(attempt.worker_url, lora)
        attempt.answer = await gateway.workers.open(url, body, headers)


async def _attempt(exchange: Exchange, attempt: Attempt) -> Answer:
    gateway, plan = exchange.gateway, exchange.plan
    texts = gateway.token_texts
    if plan.messages_api:
        # The Messages API must name the model: the adapter (already in the body), or what
        # this replica serves.
        body = exchange.worker_body if exchange.route.lora is not None else orjson.dumps(
            exchange.worker_request | {"model": await gateway.served_models.of(
                attempt.worker_url)})
        await _open(exchange, attempt, body)
        if plan.stream:
            return await open_message_stream(exchange, attempt)
        return await relay_message(exchange, attempt)
    if plan.embeddings:
        await _open(exchange, attempt, exchange.worker_body)
        return await relay_embeddings(exchange, attempt)
    if plan.context_check or plan.echo:
        worker_body = exchange.worker_request
        if plan.context_check:
            await check_context(texts, attempt.worker_url, worker_body, plan.max_tokens,
                                plan.context_check)
        if plan.echo and plan.chat:
            exchange.echo_texts = [await texts.rendered_chat_prompt(attempt.worker_url,
                                                                worker_body["messages"])]
        elif plan.echo:
            exchange.echo_texts = await texts.echo_texts(attempt.worker_url,
                                                     worker_body["prompt"], plan.echo_last)
    await _open(exchange, attempt, exchange.worker_body)
    if plan.stream:
        return await open_stream(exchange, attempt, texts)
    return await relay_json(exchange, attempt, texts)

