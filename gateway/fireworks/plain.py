"""A checked, non-streaming worker answer -> the Fireworks reply (pure; generation.py does I/O).

Echo: vLLM leaves the echoed prompt out of the text when asked for token ids (which the
gateway always asks for with echo), so the prompt is put back in front of the text here.
"""

from __future__ import annotations

from typing import Any

from gateway.api import coerce_usage
from gateway.fireworks.choices import ChoiceState, reject_chat_abort, shape_choice
from gateway.fireworks.sampling import Plan


def echo_text(plan: Plan, echo_texts: list[str], index: int) -> str:
    """What choice `index` echoes: its prompt's text (completions: the prompt or its last
    echo_last tokens; chat: the rendered prompt), as the worker rendered it."""
    return echo_texts[min(index // plan.n, len(echo_texts) - 1)]


def keep_last_prompt_logprobs(choice: dict[str, Any], keep: int) -> None:
    """echo_last=K on a worker choice: of the prompt's logprob positions keep the last K."""
    logprobs = choice.get("logprobs")
    prompt_len = len(choice.get("prompt_token_ids") or [])
    drop = prompt_len - min(keep, prompt_len)
    if not isinstance(logprobs, dict) or drop <= 0:
        return
    for key, values in logprobs.items():
        if isinstance(values, list):
            logprobs[key] = values[drop:]


def add_echo(plan: Plan, echo_texts: list[str], choice: dict[str, Any]) -> None:
    prefix = echo_text(plan, echo_texts, choice["index"])
    if plan.chat:
        choice["message"]["content"] = prefix + (choice["message"]["content"] or "")
    else:
        choice["text"] = prefix + choice["text"]


def shape_completion(data: dict[str, Any], plan: Plan, model: str,
                     vocabulary: dict[int, str], echo_texts: list[str] | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any] | None, Any]:
    """The Fireworks reply body, its usage (coerced) and the engine's per-request metrics."""
    engine = data.pop("metrics", None)
    usage = coerce_usage(data.get("usage"))
    if plan.max_tokens == 0 and usage is not None:
        # A score-only request (echo, max_tokens 0): vLLM runs one step it does not return.
        usage["completion_tokens"] = 0
        usage["total_tokens"] = usage["prompt_tokens"]
    reject_chat_abort(plan, data["choices"])
    if plan.echo_last is not None:
        for choice in data["choices"]:
            keep_last_prompt_logprobs(choice, plan.echo_last)
    prompt_ids = data.get("prompt_token_ids")
    choices = [shape_choice(choice, plan, vocabulary, ChoiceState(), chunk=False,
                            prompt_ids=prompt_ids, prompt_fragments=plan.prompt_fragments)
               for choice in data["choices"]]
    if echo_texts:
        for choice in choices:
            add_echo(plan, echo_texts, choice)
    out: dict[str, Any] = {
        "id": data["id"], "object": data.get("object") or _object(plan, chunk=False),
        "created": data.get("created", 0), "model": model, "choices": choices, "usage": usage,
    }
    if plan.chat and plan.return_token_ids:
        out["prompt_token_ids"] = prompt_ids
    return out, usage, engine


def _object(plan: Plan, chunk: bool) -> str:
    if plan.chat:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"
