"""Checked worker stream chunks -> Fireworks stream chunks (pure; generation.py does I/O).

Usage moves onto the chunks that carry a finish_reason (held until the worker's usage-only
chunk, or the end of the stream, tells the final usage), or, when the client asked with
stream_options.include_usage, onto a trailing `choices: []` chunk. Held chunks are never
dropped: the end of the stream, or a failure after it, sends them first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.api import coerce_usage
from gateway.errors import WorkerFault
from gateway.fireworks.choices import ChoiceState, reject_chat_abort, shape_choice
from gateway.fireworks.plain import echo_text
from gateway.fireworks.sampling import Plan
from gateway.sse import sse

DONE = sse(b"[DONE]")
# perf(usage, engine metrics, complete) -> the perf_metrics object
PerfMetrics = Callable[[dict[str, Any] | None, Any, bool], dict[str, Any]]


def encode(chunk: dict[str, Any]) -> bytes:
    return sse(orjson.dumps(chunk))


def carries_token(chunk: dict[str, Any]) -> bool:
    """A chunk that shows the engine produced something (headers wait for one)."""
    for choice in chunk["choices"]:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls") \
                or delta.get("reasoning") or choice.get("finish_reason"):
            return True
    return False


class StreamReframer:
    def __init__(self, plan: Plan, model: str, perf: PerfMetrics,
                 echo_texts: list[str] | None = None) -> None:
        self.plan = plan
        self.model = model
        self.perf = perf
        self.echo_texts = echo_texts or []
        self.held_finish: list[dict[str, Any]] = []
        self.states: dict[int, ChoiceState] = {}
        self.prompt_ids: list[int] | None = None
        self.echoed: set[int] = set()
        self.finished = False  # the usage-only chunk came
        # The latest usage the worker reported (every chunk carries it), as sent: what a
        # stream that ends early had used when it stopped. Coerced only when used.
        self.raw_usage: Any = None
        self.response_id = ""
        self.object = "chat.completion.chunk" if plan.chat else "text_completion"
        self.created = 0
        self.saw_finish = False

    @property
    def last_usage(self) -> dict[str, Any] | None:
        return coerce_usage(self.raw_usage)

    def chunk(self, chunk: dict[str, Any], texts: dict[int, str] | None = None) -> list[bytes]:
        """One checked worker chunk -> the Fireworks chunks to send now."""
        engine = chunk.pop("metrics", None)
        self.response_id = chunk["id"]
        self.created = chunk.get("created", 0)
        if chunk.get("usage") is not None:
            self.raw_usage = chunk["usage"]
        if not chunk["choices"]:
            if chunk.get("usage") is not None:
                return self.finish(chunk, engine)
            return []
        plan = self.plan
        if chunk.get("prompt_token_ids") is not None:
            self.prompt_ids = chunk["prompt_token_ids"]
        out: dict[str, Any] = {"id": chunk["id"], "object": chunk.get("object") or self.object,
                               "created": chunk.get("created", 0), "model": self.model}
        first = not self.states
        choices = []
        for choice in chunk["choices"]:
            state = self.states.setdefault(choice.get("index", 0), ChoiceState())
            choices.append(shape_choice(choice, plan, texts or {}, state, chunk=True,
                                        prompt_ids=self.prompt_ids if first else None,
                                        prompt_fragments=plan.prompt_fragments))
        out["choices"] = choices
        if plan.chat and plan.return_token_ids and first:
            out["prompt_token_ids"] = self.prompt_ids
        out["usage"] = None
        parts = []
        if self.echo_texts and not plan.chat:
            parts += self.echo_chunks(out, [c["index"] for c in choices])
        reject_chat_abort(plan, chunk["choices"])
        if any(c["finish_reason"] for c in choices):
            self.saw_finish = True
            self.held_finish.append(out)  # usage is not known until the worker's last chunk
        else:
            parts.append(encode(out))
        if self.echo_texts and plan.chat:  # after the role chunk
            parts += self.echo_chunks(out, [c["index"] for c in choices])
        return parts

    def echo_chunks(self, template: dict[str, Any], indexes: list[int]) -> list[bytes]:
        """The echoed prompt, once per choice, as its own chunk."""
        parts = []
        for index in indexes:
            if index in self.echoed:
                continue
            self.echoed.add(index)
            text = echo_text(self.plan, self.echo_texts, index)
            choice: dict[str, Any] = {"index": index, "finish_reason": None, "logprobs": None}
            choice |= {"delta": {"content": text}} if self.plan.chat else {"text": text}
            parts.append(encode({k: template[k] for k in ("id", "object", "created", "model")}
                                | {"choices": [choice], "usage": None}))
        return parts

    def finish(self, last: dict[str, Any] | None, engine: Any = None) -> list[bytes]:
        """The held finish chunks with the final usage (and the include_usage tail)."""
        if self.finished:
            return []
        self.finished = True
        usage = self.last_usage
        metrics = self.perf(usage, engine, True)
        out: list[bytes] = []
        include_usage = self.plan.include_usage
        for chunk in self.held_finish:
            chunk["usage"] = usage if include_usage is None else None
            if self.plan.perf_metrics_in_response:
                chunk["perf_metrics"] = metrics
            out.append(encode(chunk))
        self.held_finish = []
        if include_usage:
            last = last or {}
            tail: dict[str, Any] = {
                "id": self.response_id, "object": last.get("object", self.object),
                "created": last.get("created", self.created), "model": self.model,
                "choices": [], "usage": usage,
            }
            if self.plan.perf_metrics_in_response:
                tail["perf_metrics"] = metrics
            out.append(encode(tail))
        return out

    def end(self) -> list[bytes]:
        """At `[DONE]`: what a usage-only chunk would have released, when none came."""
        if not self.saw_finish:
            raise WorkerFault("the stream ended without a finish_reason")
        return self.finish(None)

    def drain(self) -> list[bytes]:
        """Before an error event: the held chunks, so no produced text is lost."""
        held, self.held_finish = self.held_finish, []
        return [encode(chunk | {"usage": None}) for chunk in held]
