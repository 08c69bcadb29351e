"""/completions: the completions API object and its translation (pure). The answer is
handled by the generation Call that chat and completions share (generation.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel

from gateway.api import Api
from gateway.config import Settings
from gateway.controlplane.registry import Deployment, Route
from gateway.errors import GatewayError
from gateway.fireworks.continuation import continuable
from gateway.fireworks.generation import GenerationCall
from gateway.fireworks.protocol import CompletionRequest, prompt_list_estimate, prompts_of
from gateway.fireworks.sampling import Plan, cache_scope, logprobs_plan, sampling_body


class CompletionsApi(Api):
    path = "/completions"
    worker_path = "/v1/completions"
    request_model: type[BaseModel] = CompletionRequest

    def translate(self, request: CompletionRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> CompletionCall:
        body, plan = completion_body(request, route.deployment, settings,
                                     priority_tier=route.priority_tier)
        return CompletionCall(body=body, plan=plan, route=route, request=request,
                              affinity=request.prompt_cache_key or request.user,
                              cache_scope=cache_scope(request))


@dataclass(kw_only=True)
class CompletionCall(GenerationCall):
    request: CompletionRequest  # as the client sent it

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sequences = len(prompts_of(self.request.prompt)) * self.plan.n  # n per prompt

    def prompt_estimate(self) -> int:
        return prompt_list_estimate(self.request.prompt)

    def prefix_material(self, limit: int) -> bytes | None:
        """The start of the (first) prompt."""
        prompt = self.request.prompt
        if isinstance(prompt, str):
            return prompt[:limit].encode()[:limit]  # not the whole prompt encoded
        first = prompt if not prompt or isinstance(prompt[0], int) else prompt[0]
        return orjson.dumps(first)[:limit]


def completion_body(request: CompletionRequest, deployment: Deployment,
                    settings: Settings, *, priority_tier: bool = False
                    ) -> tuple[dict[str, Any], Plan]:
    if request.images is not None:
        raise GatewayError(400, "images on /completions are not supported: send image_url "
                                "content parts to /chat/completions", param="images")
    if request.reasoning_history is not None:
        raise GatewayError(400, "reasoning_history applies to chat messages",
                           param="reasoning_history")
    fmt, top = logprobs_plan(request)
    echo = bool(request.echo) or request.echo_last is not None
    return_token_ids, raw_output = bool(request.return_token_ids), bool(request.raw_output)
    sampled = sampling_body(request, deployment, settings, chat=False,
                            token_ids=bool(fmt) or return_token_ids or raw_output or echo,
                            priority_tier=priority_tier)
    body = sampled.body
    body["prompt"] = request.prompt
    if echo:
        body["echo"] = True  # for the prompt logprobs; the text comes from echo_texts
    if fmt:
        body["logprobs"] = top
        body["return_tokens_as_token_ids"] = True
    fragments = request.prompt if isinstance(request.prompt, list) else [request.prompt]
    plan = sampled.plan(chat=False, logprobs=fmt, return_token_ids=return_token_ids,
                        raw_output=raw_output, echo=echo, echo_last=request.echo_last,
                        n=request.n or 1, prompt_fragments=fragments)
    return continuable(body, plan, deployment), plan
