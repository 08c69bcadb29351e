"""One inference request from admission to its usage record.

authenticate -> validate -> resolve (registry) -> admit (limits) -> pick a replica (routing)
-> relay (relay.py) -> on failure before any byte reached the client, once more on another
replica -> at the end, exactly once: release the replica, settle the limits, append the usage
record, count the metrics.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.limits import Admission, Limiter, RateLimited
from gateway.metrics import GatewayMetrics
from gateway.protocol import ChatCompletionRequest, CompletionRequest, prompts_of
from gateway.registry import Account, Route
from gateway.relay import Call, relay_json, relay_stream
from gateway.routing import ReplicaSet
from gateway.store import RegistryStore
from gateway.tokens import TokenTexts
from gateway.translate import chat_body, completion_body
from gateway.upstream import WorkerClient
from gateway.usage import Ledger, UsageRecord

AFFINITY_HEADER = "x-session-affinity"
ATTEMPTS = 2  # the first try and one retry on another replica


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
    started_at: float


def affinity_key(request: Request, body: ChatCompletionRequest | CompletionRequest) -> str | None:
    return request.headers.get(AFFINITY_HEADER) or body.prompt_cache_key or body.user


def prompt_estimate(body: ChatCompletionRequest | CompletionRequest) -> int:
    """Tokens to reserve for the prompt before the worker has counted them: about four
    characters per token (token-id prompts count exactly). Settled with the real count."""
    if isinstance(body, ChatCompletionRequest):
        return sum(len(str(m.content or "")) // 4 + 4 for m in body.messages)
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    if prompts and all(isinstance(p, int) for p in prompts):
        return len(prompts)
    return sum(len(p) if isinstance(p, list) else len(str(p)) // 4 + 1 for p in prompts)


def count_refusal(gateway: Gateway, request: Request, deployment: str, endpoint: str,
                  status: int) -> None:
    """Metrics for a request refused before admission (deployment "" when unresolved)."""
    if getattr(request.state, "counted", False):
        return
    request.state.counted = True
    gateway.metrics.requests.labels(deployment, endpoint, str(status)).inc()
    gateway.metrics.errors.labels(deployment, str(status)).inc()


class Accounting:
    """The end of one request: usage record, limit settlement, metrics, passive health."""

    def __init__(self, gateway: Gateway, account: Account, route: Route, admission: Admission,
                 request_id: str, endpoint: str) -> None:
        self.gateway = gateway
        self.account = account
        self.route = route
        self.admission = admission
        self.request_id = request_id
        self.endpoint = endpoint
        self.started = time.monotonic()

    def end(self, call: Call | None, status: str, http_status: int,
            usage: dict[str, Any] | None) -> None:
        usage = usage or {}
        ended = time.monotonic()
        deployment = self.route.deployment.name
        first_token = call.first_token_at if call is not None else None
        record = UsageRecord(
            record_id=self.admission.record_id, request_id=self.request_id,
            account=self.account.id, deployment=deployment,
            model=self.route.deployment.model,
            replica=call.lease.replica.url if call is not None else "",
            endpoint=self.endpoint, status=status, http_status=http_status,
            prompt_tokens=usage.get("prompt_tokens", 0),
            cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
            completion_tokens=usage.get("completion_tokens", 0),
            ttft_ms=(first_token - self.started) * 1000 if first_token else None,
            duration_ms=(ended - self.started) * 1000, time=time.time())
        self.gateway.ledger.finish(record, self.admission)
        metrics = self.gateway.metrics
        metrics.requests.labels(deployment, self.endpoint, str(http_status)).inc()
        metrics.in_flight.labels(deployment).dec()
        if status == "error":
            metrics.errors.labels(deployment, str(http_status)).inc()
        if first_token is not None:
            metrics.time_to_first_token.labels(deployment).observe(first_token - self.started)
        metrics.latency.labels(deployment).observe(ended - self.started)
        for kind, count in (("prompt", record.prompt_tokens), ("cached", record.cached_tokens),
                            ("completion", record.completion_tokens)):
            if count:
                metrics.tokens.labels(deployment, kind).inc(count)
        if call is not None and status == "ok":
            self.gateway.replicas.health.success(call.lease.replica.url)
        elif call is not None and status == "error" and http_status in (502, 503) \
                and call.first_token_at is not None:
            # Died mid-stream. (Failures before the first byte are counted by serve().)
            self.gateway.replicas.health.failure(call.lease.replica.url)


async def serve(gateway: Gateway, request: Request, account: Account,
                body: ChatCompletionRequest | CompletionRequest, endpoint: str) -> Response:
    route = gateway.store.current.resolve(body.model, account)
    deployment = route.deployment
    settings = gateway.settings
    if isinstance(body, ChatCompletionRequest):
        worker_body, plan = chat_body(body, deployment, settings)
        fragments: list[Any] = [m.content for m in body.messages]
    else:
        worker_body, plan = completion_body(body, deployment, settings)
        fragments = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    record_id = uuid.uuid4().hex
    admission = Admission(record_id, account.id)  # unlimited: nothing to reserve
    try:
        if account.limits.any():
            admission = await gateway.limiter.admit(account, prompt_estimate(body),
                                                    plan.max_tokens * max(plan.n, 1),
                                                    record_id)
    except RateLimited as exc:
        gateway.metrics.rate_limited.labels(exc.kind).inc()
        count_refusal(gateway, request, deployment.name, endpoint, exc.status)
        raise
    accounting = Accounting(gateway, account, route, admission, request.state.request_id,
                            endpoint)
    request.state.counted = True  # from here on, Accounting.end counts the request
    gateway.metrics.in_flight.labels(deployment.name).inc()
    key = affinity_key(request, body)
    tried: set[str] = set()
    call: Call | None = None
    try:
        for attempt in range(ATTEMPTS):
            lease = gateway.replicas.acquire(deployment, key, tried)
            tried.add(lease.replica.url)
            call = Call(route=route, lease=lease, request_id=request.state.request_id,
                        path=endpoint, body=worker_body, plan=plan,
                        prompt_fragments=fragments,
                        include_usage=(body.stream_options.include_usage
                                       if body.stream_options else None),
                        perf_metrics_in_response=bool(body.perf_metrics_in_response),
                        on_end=accounting.end, started=accounting.started)
            try:
                response = await _attempt(gateway, body, call)
            except GatewayError as exc:
                lease.release()
                if not exc.replica_fault:
                    raise
                gateway.replicas.health.failure(lease.replica.url)
                if attempt + 1 == ATTEMPTS or not gateway.replicas.candidates(deployment,
                                                                              tried):
                    raise
                gateway.metrics.retries.labels(deployment.name).inc()
                continue
            response.headers.update(admission.headers)
            return response
        raise AssertionError("unreachable")  # the loop returns or raises
    except BaseException as exc:
        status = exc.status if isinstance(exc, GatewayError) else 499
        if call is not None and not call.ended:
            call.end("error" if status != 499 else "aborted", status, None)
        elif call is None:
            accounting.end(None, "error", status, None)
        raise


async def check_context(texts: TokenTexts, worker_url: str, body: dict[str, Any],
                        max_tokens: int, param: str) -> None:
    """context_length_exceeded_behavior=error: 400 naming both numbers when a prompt and
    max_tokens do not fit. (truncate needs nothing: the worker lowers max_tokens itself.)"""
    if "messages" in body:
        queries = [{"messages": body["messages"], "add_generation_prompt": True}]
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


async def _attempt(gateway: Gateway, body: ChatCompletionRequest | CompletionRequest,
                   call: Call) -> Response:
    texts = gateway.token_texts
    plan, worker_body = call.plan, call.body
    if body.context_length_exceeded_behavior == "error":
        param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        await check_context(texts, call.worker_url, worker_body, plan.max_tokens, param)
    if plan.echo and plan.chat:
        plan.echo_texts = [await texts.rendered_chat_prompt(call.worker_url,
                                                            worker_body["messages"])]
    elif plan.echo:
        plan.echo_texts = await texts.echo_texts(call.worker_url, worker_body["prompt"],
                                                 plan.echo_last)
    if body.stream:
        return await relay_stream(gateway.workers, texts, call)
    return await relay_json(gateway.workers, texts, call)
