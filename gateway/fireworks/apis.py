"""The Fireworks inference APIs as objects: /chat/completions, /completions, /embeddings.

Each says what its requests are (protocol.py), how one becomes a worker request
(translate.py, pure), what its prompt is likely to cost before the worker counts it, which
part of it is a conversation's stable head (for cache affinity), and its error envelope.
What happens to the answer is the Call's (calls.py).
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel

from gateway.config import Settings
from gateway.controlplane.registry import Route
from gateway.errors import GatewayError
from gateway.fireworks.calls import EmbeddingCall, GenerationCall
from gateway.fireworks.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SamplingFields,
)
from gateway.fireworks.translate import chat_body, completion_body, embedding_body

# What a worker counts for one image, video or audio part, before it has counted: a typical
# vision encoder's image is 256-2,048 tokens. (Counting its base64 text as characters / 4
# would reserve ~250k tokens for a 1 MB image.) The real count settles the reservation.
MEDIA_TOKENS = 1024


def prompt_list_estimate(prompt: Any) -> int:
    """A prompt or input that is a string, a list of strings, token ids, or lists of them:
    about four characters per token of text; token ids count exactly."""
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if prompts and all(isinstance(p, int) for p in prompts):
        return len(prompts)
    return sum(len(p) if isinstance(p, list) else len(str(p)) // 4 + 1 for p in prompts)


class FireworksApi:
    """What the Fireworks APIs share: the client's cache key and the error envelope."""

    def affinity(self, request: SamplingFields | EmbeddingRequest) -> str | None:
        return getattr(request, "prompt_cache_key", None) or request.user

    def error_body(self, exc: GatewayError, request_id: str) -> dict[str, Any]:
        return exc.envelope(request_id)


class ChatApi(FireworksApi):
    path = "/chat/completions"
    worker_path = "/v1/chat/completions"
    request_model: type[BaseModel] = ChatCompletionRequest

    def translate(self, request: ChatCompletionRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> GenerationCall:
        body, plan = chat_body(request, route.deployment, settings, account=account,
                               nonce=nonce)
        return GenerationCall(body, plan, route)

    def prompt_estimate(self, request: ChatCompletionRequest) -> int:
        """Four tokens per message, about four characters per token of text, MEDIA_TOKENS
        per image, video or audio part."""
        total = 0
        for message in request.messages:
            total += 4
            if isinstance(message.content, list):
                total += sum(len(part.text or "") // 4 if part.type == "text" else MEDIA_TOKENS
                             for part in message.content)
            elif message.content is not None:
                total += len(message.content) // 4
        return total

    def prefix_material(self, request: ChatCompletionRequest, limit: int) -> bytes | None:
        """The tools, the leading system messages and the first user message."""
        head: list[object] = [request.tools]
        for message in request.messages:
            head.append(message.model_dump(exclude_none=True))
            if message.role == "user":
                break
        return orjson.dumps(head)[:limit]


class CompletionsApi(FireworksApi):
    path = "/completions"
    worker_path = "/v1/completions"
    request_model: type[BaseModel] = CompletionRequest

    def translate(self, request: CompletionRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> GenerationCall:
        body, plan = completion_body(request, route.deployment, settings, account=account,
                                     nonce=nonce)
        return GenerationCall(body, plan, route)

    def prompt_estimate(self, request: CompletionRequest) -> int:
        return prompt_list_estimate(request.prompt)

    def prefix_material(self, request: CompletionRequest, limit: int) -> bytes | None:
        """The start of the (first) prompt."""
        prompt = request.prompt
        if isinstance(prompt, str):
            return prompt[:limit].encode()[:limit]  # not the whole prompt encoded
        first = prompt if not prompt or isinstance(prompt[0], int) else prompt[0]
        return orjson.dumps(first)[:limit]


class EmbeddingsApi(FireworksApi):
    path = "/embeddings"
    worker_path = "/v1/embeddings"
    request_model: type[BaseModel] = EmbeddingRequest

    def translate(self, request: EmbeddingRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> EmbeddingCall:
        body = embedding_body(request, route.deployment, account=account, nonce=nonce)
        return EmbeddingCall(body, route.requested_model,
                             perf_metrics_in_response=bool(request.perf_metrics_in_response))

    def prompt_estimate(self, request: EmbeddingRequest) -> int:
        return prompt_list_estimate(request.input)

    def prefix_material(self, request: EmbeddingRequest, limit: int) -> bytes | None:
        return None  # an embedding reuses no cached prefix worth a key
