"""Checks on what a vLLM worker answered, before any of it is reshaped or relayed.

Pure functions over parsed JSON. Anything that is not a well-formed answer raises
`WorkerFault`: a 502 that counts against the replica and may be retried on another one. The
client sees a fixed message; what the worker really sent goes to the log (`detail`).
"""

from __future__ import annotations

from typing import Any

from gateway.errors import WorkerFault


def _choices(data: dict[str, Any], chat: bool, chunk: bool) -> list[dict[str, Any]]:
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise WorkerFault("no choices list in the worker's answer")
    key = ("delta" if chunk else "message") if chat else "text"
    for choice in choices:
        if not isinstance(choice, dict):
            raise WorkerFault("a choice is not an object")
        index = choice.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1024:
            raise WorkerFault(f"bad choice index {index!r}")
        value = choice.get(key)
        if chat and not isinstance(value, dict):
            raise WorkerFault(f"choice {key} is not an object")
        if not chat and value is not None and not isinstance(value, str):
            raise WorkerFault("choice text is not a string")
        reason = choice.get("finish_reason")
        if reason is not None and not isinstance(reason, str):
            raise WorkerFault("finish_reason is not a string")
    return choices


def _header(data: dict[str, Any]) -> None:
    if not isinstance(data.get("id"), str):
        raise WorkerFault("the worker's answer has no id")
    created = data.get("created", 0)
    if not isinstance(created, int) or isinstance(created, bool):
        raise WorkerFault("created is not an integer")


def check_completion(data: Any, chat: bool) -> dict[str, Any]:
    """A non-streaming answer: an object with an id and at least one valid choice."""
    if not isinstance(data, dict):
        raise WorkerFault(f"the worker's answer is a {type(data).__name__}, not an object")
    if "error" in data:
        raise WorkerFault(f"the worker answered 200 with an error: {data['error']!r:.500}")
    _header(data)
    if not _choices(data, chat, chunk=False):
        raise WorkerFault("the worker's answer has no choices")
    return data


def check_chunk(data: Any, chat: bool) -> dict[str, Any]:
    """One streamed event: a chunk (choices may be empty on the usage-only chunk), not an
    in-stream error event (vLLM sends `data: {"error": ...}` when generation fails)."""
    if not isinstance(data, dict):
        raise WorkerFault(f"a streamed event is a {type(data).__name__}, not an object")
    if "error" in data:
        raise WorkerFault(f"the worker sent an error event: {data['error']!r:.500}",
                          message="The worker failed during generation")
    _header(data)
    _choices(data, chat, chunk=True)
    return data
