"""Fireworks request -> vLLM worker request.

vLLM's OpenAI server already speaks most fields; the Fireworks-only sampling extensions go in
`vllm_xargs` for the engine plugins, and Fireworks defaults are filled in here.
"""

from __future__ import annotations

from typing import Any

from gateway.config import Settings
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.registry import Deployment

# Same name and meaning in vLLM's request body: copied when the client sent them.
_PASSTHROUGH = (
    "temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "seed", "n",
    "ignore_eos", "min_tokens", "user",
)


def sampling_body(request: SamplingFields, deployment: Deployment, settings: Settings,
                  *, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        name: getattr(request, name) for name in _PASSTHROUGH
        if getattr(request, name) is not None
    }
    default_max = deployment.max_tokens_chat if chat else deployment.max_tokens_completion
    max_tokens = request.requested_max_tokens
    body["max_tokens"] = default_max if max_tokens is None else max_tokens
    if request.top_k:  # Fireworks' 0 means off, which is vLLM's default
        body["top_k"] = request.top_k
    if request.stop is not None:
        body["stop"] = request.stop_list
        body["include_stop_str_in_output"] = settings.stop_include_in_output
    if request.logit_bias:
        body["logit_bias"] = request.logit_bias
    xargs: dict[str, Any] = {}
    if request.mirostat_target is not None:
        xargs["mirostat_target"] = request.mirostat_target
        if request.mirostat_lr is not None:
            xargs["mirostat_lr"] = request.mirostat_lr
    if request.repetition_penalty is not None and request.repetition_penalty != 1.0:
        xargs["repetition_penalty"] = request.repetition_penalty
    if xargs:
        body["vllm_xargs"] = xargs
    if request.stream:
        body["stream"] = True
        # Always ask for usage (on every chunk, so prompt tokens are known at the first
        # token for the headers); the gateway places it where Fireworks clients expect it.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return body


def chat_body(request: ChatCompletionRequest, deployment: Deployment,
              settings: Settings) -> dict[str, Any]:
    body = sampling_body(request, deployment, settings, chat=True)
    body["messages"] = [
        message.model_dump(exclude_none=True) | (
            {"role": "system"} if message.role == "developer" else {})
        for message in request.messages
    ]
    return body


def completion_body(request: CompletionRequest, deployment: Deployment,
                    settings: Settings) -> dict[str, Any]:
    body = sampling_body(request, deployment, settings, chat=False)
    body["prompt"] = request.prompt
    return body
