"""The Call of the generation APIs (/chat/completions and /completions, the Plan says which):
the checks and lookups before each attempt, and the worker's answer reshaped into the reply
(around the pure plain.py and stream.py).

Non-streaming: the worker's body is checked, reshaped, and sent with fireworks-* headers.
Streaming: `ChunkFraming` turns the worker's events into Fireworks chunks one by one; the
data plane's relay holds the client's headers until the first token, so that anything wrong
up to there is a real status. A failure after that becomes the held chunks, then
`event: error` with the Fireworks envelope, then `data: [DONE]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.api import (
    CacheQuery,
    Call,
    Continuation,
    NotContinued,
    Reply,
    Served,
    Worker,
    worker_json,
)
from gateway.controlplane.registry import Route
from gateway.errors import GatewayError, TargetUnavailable, WorkerFault, stream_error_event
from gateway.fireworks.choices import token_ids_in
from gateway.fireworks.continuation import WORKER_PATH as CONTINUATION_PATH
from gateway.fireworks.continuation import as_first_worker, continuation_body, whole_usage
from gateway.fireworks.perf import metric_headers, perf_metrics
from gateway.fireworks.plain import shape_completion
from gateway.fireworks.protocol import prompts_of
from gateway.fireworks.sampling import Plan
from gateway.fireworks.stream import DONE, StreamReframer, carries_token
from gateway.fireworks.worker_answer import check_chunk, check_completion

# A worker answer that breaks the shaping code is a malformed answer, not a gateway bug.
SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)
WORKER_DONE = b"[DONE]"


async def check_context(worker: Worker, body: dict[str, Any], max_tokens: int,
                        param: str) -> None:
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
            counted = await worker.tokenize({"prompt": ""})
            counted["count"] = len(prompt)
        else:
            counted = await worker.tokenize(query)
        count, context = int(counted["count"]), int(counted["max_model_len"])
        if count + max_tokens > context:
            # "prompt is too long" is what clients (LiteLLM) read as a context overflow.
            raise TargetUnavailable(400, f"The prompt is too long: it is {count} tokens and "
                                         f"max_tokens is {max_tokens}, which exceeds the "
                                         f"model's maximum context length of {context} "
                                         "tokens", "context_length", param=param)


async def echo_texts(worker: Worker, prompt: Any, last: int | None) -> list[str]:
    """Completions echo: per prompt, the prompt itself or its last `last` tokens."""
    out = []
    for one in prompts_of(prompt):
        if last is None and isinstance(one, str):
            out.append(one)
            continue
        ids = one if isinstance(one, list) else \
            (await worker.tokenize({"prompt": one}))["tokens"]
        ids = ids if last is None else ids[len(ids) - min(last, len(ids)):]
        out.append(await worker.detokenize(list(ids)) if ids else "")
    return out


async def rendered_chat_prompt(worker: Worker, messages: list[dict[str, Any]]) -> str:
    """Chat echo: the prompt as the worker's chat template renders it."""
    tokens = await worker.tokenize({"messages": messages, "add_generation_prompt": True})
    return await worker.detokenize(list(tokens["tokens"]))


@dataclass(kw_only=True)
class GenerationCall(Call):
    """What a /chat/completions or /completions request does with its worker and its answer
    (the Plan says which); ChatCall and CompletionCall add what their prompts cost and
    share."""

    plan: Plan
    route: Route
    # What each prompt echoes, as the worker renders it (asked for when plan.echo).
    echo_texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        plan = self.plan
        self.stream, self.max_tokens = plan.stream, plan.max_tokens
        self.sequences = plan.n
        self.metadata, self.priority = plan.metadata, plan.priority

    def cache_query(self) -> CacheQuery | None:
        body, salt = self.body, self.body.get("cache_salt")
        if "messages" in body:  # rendered by the worker's chat template, as the request
            query = {key: body[key] for key in ("messages", "tools", "chat_template_kwargs")
                     if key in body}
            return CacheQuery(tokenize=query | {"add_generation_prompt": True}, salt=salt)
        prompts = prompts_of(body["prompt"])
        if len(prompts) != 1:
            return None  # several prompts: each may be cached elsewhere
        if isinstance(prompts[0], list):
            return CacheQuery(token_ids=prompts[0], salt=salt)
        return CacheQuery(tokenize={"prompt": prompts[0]}, salt=salt)

    async def prepare(self, worker: Worker, encoded: bytes) -> bytes:
        plan = self.plan
        if plan.context_check:
            await check_context(worker, self.body, plan.max_tokens, plan.context_check)
        if plan.echo and plan.chat:
            self.echo_texts = [await rendered_chat_prompt(worker, self.body["messages"])]
        elif plan.echo:
            self.echo_texts = await echo_texts(worker, self.body["prompt"], plan.echo_last)
        return encoded

    async def vocabulary(self, worker: Worker, payload: dict[str, Any]) -> dict[int, str]:
        """The text of every token id the answer's logprobs name."""
        if not self.plan.logprobs:
            return {}
        ids: set[int] = set()
        for choice in payload["choices"]:
            ids |= token_ids_in(choice.get("logprobs"))
        return await worker.token_texts(self.route.deployment.model, ids)

    def headers(self, metrics: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        return metric_headers(metrics, self.plan.sampling_options,
                              self.route.deployment.context_length)

    async def reply(self, raw: bytes, worker: Worker, served: Served) -> Reply:
        plan = self.plan
        data = check_completion(worker_json(raw), plan.chat)
        served.first_token()
        try:
            vocabulary = await self.vocabulary(worker, data)
            out, usage, engine = shape_completion(data, plan, self.route.requested_model,
                                                  vocabulary, self.echo_texts)
        except SHAPE_ERRORS as exc:
            raise WorkerFault(f"malformed answer: {exc!r}") from exc
        served.usage = usage
        metrics = perf_metrics(served, usage, engine, complete=True)
        if plan.perf_metrics_in_response:
            out["perf_metrics"] = metrics
        return Reply(orjson.dumps(out), self.headers(metrics))

    def framing(self, worker: Worker, served: Served) -> ChunkFraming:
        return ChunkFraming(self, worker, served)


def prompt_ids_of(chunk: dict[str, Any]) -> list[int] | None:
    """The prompt's token ids a worker sends with its first chunk (return_token_ids): chat
    at the top, completions in the choice."""
    ids = chunk.get("prompt_token_ids")
    if ids is None and chunk["choices"]:
        ids = chunk["choices"][0].get("prompt_token_ids")
    return ids if isinstance(ids, list) and all(type(i) is int for i in ids) else None


def aborted(chunk: dict[str, Any]) -> bool:
    return any(choice.get("finish_reason") == "abort" for choice in chunk["choices"])


@dataclass
class Seam:
    """A stream continued on another worker: what its chunks are rebased on."""

    prompt_tokens: int  # the first worker's prompt, billed once
    cached_tokens: int
    top: int | None = None  # chat's top_logprobs (completions' may name one more)
    generated: int = 0  # tokens generated before the latest seam

    def rebase(self, chunk: dict[str, Any], chat: bool, response_id: str,
               created: int) -> dict[str, Any]:
        out = as_first_worker(chunk, chat, response_id, created, self.top)
        if out.get("usage") is not None:
            out["usage"] = whole_usage(out["usage"], self.prompt_tokens, self.cached_tokens,
                                       self.generated)
        return out


class ChunkFraming:
    """A worker's chunk stream -> Fireworks chunks (with the worker's token texts when
    logprobs need them)."""

    def __init__(self, call: GenerationCall, worker: Worker, served: Served) -> None:
        self.call, self.worker, self.served = call, worker, served
        self.reframer = StreamReframer(
            call.plan, call.route.requested_model,
            lambda usage, engine, complete: perf_metrics(served, usage, engine, complete),
            call.echo_texts)
        self.ready = False  # the engine produced something: a token, a finish, usage
        self.done = False  # [DONE] came
        self.prompt_ids: list[int] | None = None  # as the first worker tokenized the prompt
        self.seam: Seam | None = None  # continued elsewhere (continuation.py)
        # What events of a batch produced before a later one of it failed: sent first, after
        # the error (drain) or before what a continuation sends (the next take).
        self.carried: list[bytes] = []

    async def take(self, events: list[tuple[str, bytes]]) -> list[bytes]:
        parts, self.carried = self.carried, []
        try:
            await self._take(events, parts)
        except GatewayError:
            self.carried = parts
            raise
        return parts

    async def _take(self, events: list[tuple[str, bytes]], parts: list[bytes]) -> None:
        chat, logprobs = self.call.plan.chat, self.call.plan.logprobs
        seam = self.seam
        for _, data in events:
            if not data:
                continue  # an event without data (a keep-alive): nothing to relay
            if data == WORKER_DONE:
                self.done = True
                parts += self.reframer.end()
                parts.append(DONE)
                break
            if seam is None:
                chunk = check_chunk(worker_json(data), chat)
                if self.prompt_ids is None:
                    self.prompt_ids = prompt_ids_of(chunk)
            else:  # a continuation's chunk, as the first worker would have sent it
                chunk = seam.rebase(check_chunk(worker_json(data), chat=False), chat,
                                    self.reframer.response_id, self.reframer.created)
            if self.call.plan.not_continued is None and aborted(chunk):
                # The worker stopped it (it is shutting down, or drained past its
                # timeout): a fault of the replica's, so that the stream moves.
                raise WorkerFault("the worker aborted the generation", status=503,
                                  message="The worker stopped the generation")
            if not self.ready and (not chunk["choices"] or carries_token(chunk)):
                self.ready = True
                self.served.first_token()
            try:
                texts = await self.call.vocabulary(self.worker, chunk) if logprobs else None
                parts += self.reframer.chunk(chunk, texts)
            except SHAPE_ERRORS as exc:
                raise WorkerFault(f"malformed chunk: {exc!r}") from exc
            self.served.usage = self.reframer.raw_usage

    def headers(self) -> list[tuple[bytes, bytes]]:
        return self.call.headers(perf_metrics(self.served, self.reframer.last_usage, None,
                                              complete=False))

    def drain(self) -> list[bytes]:
        carried, self.carried = self.carried, []
        return carried + self.reframer.drain()

    def error_event(self, exc: GatewayError, request_id: str) -> bytes:
        return stream_error_event(exc.status, f"{exc.message} (request {request_id})",
                                  self.reframer.response_id or request_id)

    def continuable(self) -> bool:
        return self.call.plan.not_continued is None and not self.done \
            and not self.reframer.saw_finish

    def continuation(self) -> Continuation:
        """The rest of the generation: the prompt's token ids and those generated so far
        (every one the client has), the rest of max_tokens."""
        plan, reframer = self.call.plan, self.reframer
        if not self.continuable():  # declined, or finished (its end is what failed)
            raise NotContinued(plan.not_continued or "finished")
        state = reframer.states.get(0)
        generated = (state.token_ids or []) if state is not None else []
        usage = reframer.last_usage
        if self.prompt_ids is None or usage is None \
                or (state is not None and state.token_ids is None and state.text):
            raise NotContinued("token ids")  # the worker did not say them
        body = continuation_body(self.call.body, self.prompt_ids, generated,
                                 self.call.route.deployment.context_length)
        if body is None:
            raise NotContinued("max_tokens")  # nothing remains to generate
        if self.seam is None:  # the prompt as the client is billed for it: the first's
            self.seam = Seam(usage["prompt_tokens"],
                             usage["prompt_tokens_details"]["cached_tokens"],
                             self.call.body.get("top_logprobs") if plan.chat else None)
        self.seam.generated = len(generated)
        return Continuation(CONTINUATION_PATH, body, len(generated), self.sent_to)

    def sent_to(self, worker: Worker) -> None:
        self.worker = worker  # (the token texts of logprobs, from here)
