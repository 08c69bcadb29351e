"""A batch job's lines, pure: the input file read into lines (each checked on its own: a bad
line becomes an error line, never a failed job), the lines grouped by the head of their
prompt, and each line's result written in the output file's shape.

Two input shapes, one Line: OpenAI's (`custom_id`, `method`, `url`, `body`: the job names
its endpoint, every line must name the same) and Fireworks' datasets (`custom_id` and
`body`; the job gives the model and its `inferenceParameters`, the body's own fields win).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

# The endpoints a job may name (OpenAI's spelling) -> the inference API's own path.
ENDPOINTS = {"/v1/chat/completions": "/chat/completions",
             "/v1/completions": "/completions",
             "/v1/embeddings": "/embeddings"}
GROUP_MAX = 256  # lines in one group at most (a group's lines wait for its first)


@dataclass(frozen=True)
class Line:
    number: int  # its place among the file's lines (from 0)
    custom_id: str
    path: str  # the inference API's path ("/chat/completions")
    body: dict[str, Any] | None  # None: refused (`error` says why)
    error: str | None = None


@dataclass(frozen=True)
class Spec:
    """What a job's lines are read against: OpenAI's (`endpoint`: every line's url) or
    Fireworks' (`model` and `parameters`, the job's request fields)."""

    endpoint: str | None = None
    model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


class FileRefused(ValueError):
    """The file as a whole cannot be a job (too many lines, none): the job fails."""


def split(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each line that is not blank."""
    found, offset = [], 0
    for raw in data.splitlines(keepends=True):
        if raw.strip():
            found.append((offset, len(raw)))
        offset += len(raw)
    return found


def read(data: bytes, spec: Spec, max_lines: int) -> tuple[list[Line], list[tuple[int, int]]]:
    """The file's lines, each checked, and where each is in the file."""
    spans = split(data)
    if not spans:
        raise FileRefused("the file has no lines")
    if len(spans) > max_lines:
        raise FileRefused(f"the file has {len(spans)} lines; at most {max_lines} are allowed")
    lines: list[Line] = []
    seen: dict[str, int] = {}
    for number, (offset, length) in enumerate(spans):
        line = read_one(data[offset:offset + length], number, spec)
        if line.body is not None and line.custom_id in seen:
            line = Line(number, line.custom_id, line.path, None,
                        f"custom_id {line.custom_id!r} is also line {seen[line.custom_id] + 1}'s")
        if line.body is not None:
            seen[line.custom_id] = number
        lines.append(line)
    return lines, spans


def read_one(raw: bytes, number: int, spec: Spec) -> Line:
    """One line of the file, checked against the job's spec."""
    name = f"line-{number + 1}"
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Line(number, name, "", None, f"line {number + 1} is not JSON")
    if not isinstance(item, dict):
        return Line(number, name, "", None, f"line {number + 1} is not a JSON object")
    custom_id = item.get("custom_id", None if spec.endpoint else name)
    if not isinstance(custom_id, str) or not custom_id:
        return Line(number, name, "", None, "custom_id must be a non-empty string")
    body = item.get("body")
    if spec.endpoint is not None:
        path = ENDPOINTS[spec.endpoint]
        if item.get("method", "POST") != "POST":
            return Line(number, custom_id, path, None, "method must be POST")
        if item.get("url") != spec.endpoint:
            return Line(number, custom_id, path, None,
                        f"url {item.get('url')!r} is not the batch's endpoint "
                        f"{spec.endpoint}")
    else:
        path = "/completions" if isinstance(body, dict) and "prompt" in body \
            and "messages" not in body else "/chat/completions"
        if isinstance(body, dict):  # the job's fields, the line's own winning; its model
            body = spec.parameters | body | {"model": spec.model}
    return _checked(number, custom_id, path, body)


def _checked(number: int, custom_id: str, path: str, body: Any) -> Line:
    if not isinstance(body, dict):
        return Line(number, custom_id, path, None, "body must be an object")
    if body.get("stream"):
        return Line(number, custom_id, path, None, "stream is not supported in a batch")
    return Line(number, custom_id, path, body)


def prompt_head(body: dict[str, Any], chars: int) -> str:
    """The first `chars` characters of what the line's prompt begins with (messages in
    order, or the prompt or input text); "" when it is not text."""
    parts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content
                                  if isinstance(p, dict) and isinstance(p.get("text"), str))
            if isinstance(content, str):
                parts.append(f"{message.get('role')}\0{content}\0")
            if sum(map(len, parts)) >= chars:
                break
    else:
        text = body.get("prompt", body.get("input"))
        if isinstance(text, str):
            parts.append(text)
    return "".join(parts)[:chars]


def groups(lines: list[Line], chars: int) -> list[list[int]]:
    """The lines to run, as groups of line numbers: lines whose prompts share their first
    `chars` characters together (each group's first line runs before the others, which
    then find its prefix cached), groups in the order of their first line. `chars` 0: each
    line alone, in the file's order."""
    runnable = [line for line in lines if line.body is not None]
    if not chars:
        return [[line.number] for line in runnable]
    found: dict[str, list[int]] = {}
    alone: list[list[int]] = []
    for line in runnable:
        assert line.body is not None
        head = prompt_head(line.body, chars)
        if len(head) < chars:  # a short prompt shares too little to wait for another
            alone.append([line.number])
            continue
        key = hashlib.blake2b(f"{line.path}\0{head}".encode(), digest_size=16).hexdigest()
        found.setdefault(key, []).append(line.number)
    chunks = [group[i:i + GROUP_MAX] for group in found.values()
              for i in range(0, len(group), GROUP_MAX)]
    return sorted(chunks + alone, key=lambda group: group[0])


@dataclass(frozen=True)
class Result:
    """One line's result: the reply the line's request got, or why it was not sent."""

    number: int
    custom_id: str
    request_id: str
    status: int  # the reply's HTTP status; 0: no request was made (`error`)
    body: Any = None  # the reply's JSON
    error: tuple[str, str] | None = None  # (code, message) when no request was made

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def usage(self) -> tuple[int, int, int]:
        """(prompt, cached, completion) tokens of a successful reply."""
        usage = self.body.get("usage") if self.ok and isinstance(self.body, dict) else None
        if not isinstance(usage, dict):
            return 0, 0, 0
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else 0

        def count(value: Any) -> int:
            return value if isinstance(value, int) and value > 0 else 0
        return (count(usage.get("prompt_tokens")), count(cached),
                count(usage.get("completion_tokens")))


def refused(line: Line) -> Result:
    return Result(line.number, line.custom_id, "", 0,
                  error=("invalid_request", line.error or "invalid line"))


def openai_line(result: Result) -> dict[str, Any]:
    """The line in OpenAI's output (2xx) or error file."""
    line_id = "batch_req_" + hashlib.blake2b(
        f"{result.custom_id}\0{result.number}\0{result.request_id}".encode(),
        digest_size=12).hexdigest()
    if result.error is not None:
        return {"id": line_id, "custom_id": result.custom_id, "response": None,
                "error": {"code": result.error[0], "message": result.error[1]}}
    return {"id": line_id, "custom_id": result.custom_id,
            "response": {"status_code": result.status, "request_id": result.request_id,
                         "body": result.body}, "error": None}


def dataset_line(result: Result) -> dict[str, Any]:
    """The line in a Fireworks job's output dataset: the reply, or the error."""
    if result.ok:
        return {"custom_id": result.custom_id, "response": result.body}
    if result.error is not None:
        code, message = result.error
        error: Any = {"code": code, "message": message}
    else:
        error = result.body.get("error") if isinstance(result.body, dict) else None
        error = error or {"code": str(result.status), "message": "the request failed"}
    return {"custom_id": result.custom_id, "error": error, "status_code": result.status}
