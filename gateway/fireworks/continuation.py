"""Continuing a generation stream on another worker after its worker failed mid-stream (pure).

The gateway sees every token id of a stream it may continue (it asks the worker for
`return_token_ids`), so another replica can take over exactly where the failed one stopped:
a /v1/completions request whose prompt is the prompt's token ids followed by the tokens
already generated, with the remaining max_tokens and the same sampling (`continuation_body`).
Its chunks are reshaped into what the first worker would have sent (`as_first_worker`), so
that the client's stream goes on in its own framing with the next token, and the usage
describes the whole request (`whole_usage`).

A request is continued only where the seam changes nothing (`declined` says which feature
stops it; docs/fireworks-api.md, "Streams that survive a worker", has the table):
- carried exactly: greedy decoding and the truncation samplers (temperature, top_p, top_k,
  min_p: the next token is drawn from the same distribution), max_tokens and min_tokens
  (what remains), logit_bias, ignore_eos, repetition_penalty (the engine plugin counts the
  prompt and the output alike, and the output is now in the prompt), logprobs, token ids,
  raw_output, LoRA adapters, priority, the account's cache salt;
- declined (the stream ends with the error event, as without continuation): several choices
  (`n`), a `seed` (its random stream cannot be resumed), presence and frequency penalties
  (counted on the output only, which is now the prompt), Mirostat (its running state),
  structured outputs (the grammar's state), `stop` sequences (the worker holds back text that
  could start one, which a seam would lose), tools and reasoning parsers (their parser state),
  echo, several prompts, and media in chat messages (the prompt's token ids do not carry the
  image).
"""

from __future__ import annotations

from typing import Any

from gateway.controlplane.registry import Deployment
from gateway.fireworks.protocol import prompts_of
from gateway.fireworks.sampling import Plan

WORKER_PATH = "/v1/completions"
# The worker request's fields a continuation keeps as they are.
CARRIED = ("model", "temperature", "top_p", "top_k", "min_p", "logit_bias", "ignore_eos",
           "vllm_xargs", "repetition_penalty", "priority", "cache_salt", "stream",
           "stream_options", "return_tokens_as_token_ids", "user")


def declined(body: dict[str, Any], plan: Plan, deployment: Deployment) -> str | None:
    """The feature (as the client names it) that stops this request's stream from being
    continued on another worker; None when it can be."""
    xargs = body.get("vllm_xargs") or {}
    checks = (
        ("n", body.get("n", 1) > 1),
        ("seed", "seed" in body),
        ("presence_penalty", bool(body.get("presence_penalty"))),
        ("frequency_penalty", bool(body.get("frequency_penalty"))),
        ("mirostat_target", "mirostat_target" in xargs),
        ("response_format", "structured_outputs" in body or "response_format" in body),
        ("stop", "stop" in body),
        ("tools", "tools" in body),
        ("reasoning_effort", plan.chat and deployment.reasoning_parser is not None),
        ("echo", plan.echo),
    )
    for feature, found in checks:
        if found:
            return feature
    if not plan.chat and len(prompts_of(body["prompt"])) != 1:
        return "prompt"
    if plan.chat and any(isinstance(m.get("content"), list)
                         and any(p.get("type") != "text" for p in m["content"])
                         for m in body["messages"]):
        return "messages"  # an image, audio or video part
    return None


def continuable(body: dict[str, Any], plan: Plan, deployment: Deployment) -> dict[str, Any]:
    """Says in the plan whether a stream could be continued, and makes `body` ask for
    what a continuation needs (the token ids) when it could."""
    plan.not_continued = declined(body, plan, deployment) if plan.stream else "stream"
    if plan.not_continued is None:
        body["return_token_ids"] = True
    return body


def continuation_body(body: dict[str, Any], prompt_ids: list[int], generated: list[int],
                      context_length: int | None) -> dict[str, Any] | None:
    """The /v1/completions request that continues `body`'s generation after `generated`
    (the tokens the client has); None when nothing remains to generate."""
    remaining = body["max_tokens"] - len(generated)
    prompt = prompt_ids + generated
    if context_length:  # (the first worker lowered max_tokens to fit its context too)
        remaining = min(remaining, context_length - len(prompt))
    if remaining <= 0:
        return None
    out = {key: body[key] for key in CARRIED if key in body}
    out |= {"prompt": prompt, "max_tokens": remaining, "return_token_ids": True}
    if "min_tokens" in body:
        out["min_tokens"] = max(body["min_tokens"] - len(generated), 0)
    if body.get("logprobs") is True:  # chat's form -> completions' number of alternatives
        out["logprobs"] = body.get("top_logprobs") or 0
    elif body.get("logprobs") is not None:
        out["logprobs"] = body["logprobs"]
    return out


def as_first_worker(chunk: dict[str, Any], chat: bool, response_id: str, created: int,
                    top: int | None = None) -> dict[str, Any]:
    """A continuation's chunk (completions shape) as the first worker's would be: its id,
    its shape (a chat delta for chat), no prompt ids (they are the first worker's), and for
    chat at most `top` alternatives per token (completions' logprobs may add the sampled
    token as one more)."""
    choices = []
    for choice in chunk["choices"]:
        shaped = {key: value for key, value in choice.items() if key != "prompt_token_ids"}
        if chat:
            shaped.pop("text", None)
            shaped["delta"] = {"content": choice.get("text") or ""}
            logprobs = choice.get("logprobs")
            if top is not None and isinstance(logprobs, dict) \
                    and isinstance(logprobs.get("top_logprobs"), list):
                shaped["logprobs"] = logprobs | {"top_logprobs": [
                    dict(sorted(alternatives.items(), key=lambda kv: -kv[1])[:top])
                    if isinstance(alternatives, dict) else alternatives
                    for alternatives in logprobs["top_logprobs"]]}
        choices.append(shaped)
    out = {key: value for key, value in chunk.items() if key != "prompt_token_ids"}
    out |= {"id": response_id, "created": created, "choices": choices,
            "object": "chat.completion.chunk" if chat else "text_completion"}
    return out


def whole_usage(usage: Any, prompt_tokens: int, cached_tokens: int,
                generated_before: int) -> Any:
    """A continuation's usage (its prompt is the first prompt and the tokens generated
    before the seam) as the whole request's: the prompt billed once, every generated token
    once."""
    if not isinstance(usage, dict):
        return usage
    completion = usage.get("completion_tokens")
    completion = (completion if isinstance(completion, int) else 0) + generated_before
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
