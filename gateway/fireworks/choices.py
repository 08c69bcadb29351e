"""Worker answer -> Fireworks answer: choice shapes, logprobs formats, token ids, raw_output.

Pure functions over parsed JSON; the relay does the I/O. Only documented keys leave the
gateway (legacy clients validate strictly), and vLLM's `abort` never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.errors import GatewayError, WorkerFault
from gateway.fireworks.sampling import Plan

CHAT_MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls")
TOKEN_ID_PREFIX = "token_id:"


def parse_token_id(token: str) -> int:
    """vLLM's `return_tokens_as_token_ids` form `token_id:123` -> 123."""
    try:
        return int(token.removeprefix(TOKEN_ID_PREFIX))
    except (AttributeError, ValueError) as exc:
        raise WorkerFault(f"a logprob token that is not a token id: {token!r:.100}") from exc


@dataclass
class Entry:
    """One position of a logprobs list, by token id."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


def entries_from_worker(logprobs: dict[str, Any] | None) -> list[Entry]:
    """Both vLLM shapes (chat `content`, completions legacy), requested with token ids."""
    if not logprobs:
        return []
    if "content" in logprobs:
        return [Entry(parse_token_id(item["token"]), item.get("logprob"),
                      [(parse_token_id(alt["token"]), alt["logprob"])
                       for alt in item.get("top_logprobs") or []])
                for item in logprobs["content"] or []]
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs.get("tokens", []))
    return [Entry(parse_token_id(token), lp,
                  [(parse_token_id(t), v) for t, v in (top or {}).items()])
            for token, lp, top in zip(logprobs.get("tokens", []),
                                      logprobs.get("token_logprobs", []), tops, strict=True)]


def token_ids_in(logprobs: dict[str, Any] | None) -> set[int]:
    return {i for e in entries_from_worker(logprobs) for i in (e.token_id, *(t for t, _ in e.top))}


def render_logprobs(entries: list[Entry], fmt: str, texts: dict[int, str],
                    offset: int) -> tuple[dict[str, Any], int]:
    """Fireworks logprobs in `legacy` or `content` format; returns it and the next offset."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(texts[entry.token_id])
    if fmt == "legacy":
        return {
            "tokens": [texts[e.token_id] for e in entries],
            "token_ids": [e.token_id for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [({texts[t]: v for t, v in e.top} if e.logprob is not None
                              else None) for e in entries],
            "text_offset": offsets,
        }, offset
    content = []
    for e, at in zip(entries, offsets, strict=True):
        text = texts[e.token_id]
        content.append({
            "token": text, "logprob": e.logprob, "sampling_logprob": None,
            "bytes": list(text.encode()), "token_id": e.token_id, "text_offset": at,
            "top_logprobs": [{"token": texts[t], "logprob": v, "token_id": t,
                              "bytes": list(texts[t].encode())} for t, v in e.top],
            "last_activation": None, "routing_matrix": None,
        })
    return {"content": content}, offset


def reject_chat_abort(plan: Plan, choices: list[dict[str, Any]]) -> None:
    """vLLM's `abort` on chat has no Fireworks finish reason: it is a failed request (an
    error status, or the error event once a stream has started)."""
    if plan.chat and any(c.get("finish_reason") == "abort" for c in choices):
        raise GatewayError(503, "The worker aborted the generation",
                           headers={"retry-after": "1"})


def finish_reason(reason: str | None, chat: bool) -> str | None:
    if reason == "abort":  # vLLM's own value; Fireworks clients reject it
        return "error" if not chat else None
    return reason


def chat_message(message: dict[str, Any]) -> dict[str, Any]:
    shaped = {key: message.get(key) for key in CHAT_MESSAGE_KEYS}
    if shaped["reasoning_content"] is None:
        shaped["reasoning_content"] = message.get("reasoning")
    if not shaped["tool_calls"]:
        shaped["tool_calls"] = None
    return shaped


def chat_delta(delta: dict[str, Any]) -> dict[str, Any]:
    shaped: dict[str, Any] = {key: delta[key] for key in ("role", "content", "tool_calls")
                              if key in delta}
    if delta.get("reasoning") or delta.get("reasoning_content"):
        shaped["reasoning_content"] = delta.get("reasoning_content") or delta["reasoning"]
    if shaped.get("role") and not shaped.get("content"):
        shaped["content"] = None  # the role-only first chunk
    return shaped


@dataclass
class ChoiceState:
    """Per choice, across a stream: where the next logprob's text offset is, what has been
    produced so far (for raw_output)."""

    offset: int = 0
    text: str = ""
    token_ids: list[int] | None = None


def shape_choice(choice: dict[str, Any], plan: Plan, texts: dict[int, str],
                 state: ChoiceState, *, chunk: bool,
                 prompt_ids: list[int] | None = None,
                 prompt_fragments: list[Any] | None = None) -> dict[str, Any]:
    shaped: dict[str, Any] = {"index": choice.get("index", 0)}
    if plan.chat:
        if chunk:
            shaped["delta"] = chat_delta(choice.get("delta") or {})
            text = shaped["delta"].get("content") or ""
        else:
            shaped["message"] = chat_message(choice.get("message") or {})
            text = shaped["message"].get("content") or ""
    else:
        text = choice.get("text") or ""
        shaped["text"] = text
    shaped["finish_reason"] = finish_reason(choice.get("finish_reason"), plan.chat)
    logprobs = None
    if plan.logprobs:
        entries = entries_from_worker(choice.get("logprobs"))
        logprobs, state.offset = render_logprobs(entries, plan.logprobs, texts, state.offset)
    shaped["logprobs"] = logprobs
    ids = choice.get("token_ids")
    state.text += text
    if ids is not None:
        state.token_ids = (state.token_ids or []) + list(ids)
    if plan.return_token_ids:
        shaped["token_ids"] = ids
        if not plan.chat and (not chunk or prompt_ids is not None):
            shaped["prompt_token_ids"] = choice.get("prompt_token_ids", prompt_ids)
    if plan.raw_output and (not chunk or shaped["finish_reason"]):
        shaped["raw_output"] = {
            "prompt_fragments": prompt_fragments or [],
            "prompt_token_ids": choice.get("prompt_token_ids") or prompt_ids or [],
            "completion": state.text,
            "completion_token_ids": state.token_ids,
        }
    return shaped
