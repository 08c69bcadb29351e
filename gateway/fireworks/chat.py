"""/chat/completions: the chat API object, its translation (pure) and what its requests
cost and share before the worker counts them. The answer is handled by the generation Call
that chat and completions share (generation.py)."""

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
from gateway.fireworks.protocol import ChatCompletionRequest, ChatMessage
from gateway.fireworks.sampling import Plan, cache_scope, logprobs_plan, sampling_body

# What a worker counts for one image, video or audio part, before it has counted: a typical
# vision encoder's image is 256-2,048 tokens. (Counting its base64 text as characters / 4
# would reserve ~250k tokens for a 1 MB image.) The real count settles the reservation.
MEDIA_TOKENS = 1024


class ChatApi(Api):
    path = "/chat/completions"
    worker_path = "/v1/chat/completions"
    request_model: type[BaseModel] = ChatCompletionRequest

    def translate(self, request: ChatCompletionRequest, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> ChatCall:
        body, plan = chat_body(request, route.deployment, settings,
                               priority_tier=route.priority_tier)
        return ChatCall(body=body, plan=plan, route=route, request=request,
                        affinity=request.prompt_cache_key or request.user,
                        cache_scope=cache_scope(request))


@dataclass(kw_only=True)
class ChatCall(GenerationCall):
    request: ChatCompletionRequest  # as the client sent it

    def prompt_estimate(self) -> int:
        """Four tokens per message, about four characters per token of text, MEDIA_TOKENS
        per image, video or audio part."""
        total = 0
        for message in self.request.messages:
            total += 4
            if isinstance(message.content, list):
                total += sum(len(part.text or "") // 4 if part.type == "text"
                             else MEDIA_TOKENS for part in message.content)
            elif message.content is not None:
                total += len(message.content) // 4
        return total

    def prefix_material(self, limit: int) -> bytes | None:
        """The tools, the leading system messages and the first user message (what every
        turn of one conversation starts with), as the client sent them."""
        head: list[object] = [self.request.tools]
        for message in self.request.messages:
            head.append(message.model_dump(exclude_none=True))
            if message.role == "user":
                break
        return orjson.dumps(head)[:limit]


def chat_body(request: ChatCompletionRequest, deployment: Deployment,
              settings: Settings, *, priority_tier: bool = False
              ) -> tuple[dict[str, Any], Plan]:
    if request.prompt_truncate_len is not None:
        raise GatewayError(400, "prompt_truncate_len is not supported: send a prompt that "
                                "fits, or context_length_exceeded_behavior",
                           param="prompt_truncate_len")
    if request.safe_tokenization:
        raise GatewayError(400, "safe_tokenization is not supported", param="safe_tokenization")
    if request.echo_last is not None:
        raise GatewayError(400, "echo_last applies to /completions (chat's echo is the whole "
                                "rendered prompt)", param="echo_last")
    fmt, top = logprobs_plan(request)
    echo = bool(request.echo)
    return_token_ids, raw_output = bool(request.return_token_ids), bool(request.raw_output)
    sampled = sampling_body(request, deployment, settings, chat=True,
                            token_ids=bool(fmt) or return_token_ids or raw_output or echo,
                            priority_tier=priority_tier)
    body = sampled.body
    body["messages"] = chat_history(request.messages, request.reasoning_history)
    if fmt:
        body["logprobs"] = True
        body["top_logprobs"] = top
        body["return_tokens_as_token_ids"] = True
    tools, tool_choice = request.tools, request.tool_choice
    if tool_choice is not None and not tools:
        raise GatewayError(400, "tool_choice needs tools", param="tool_choice")
    if request.function_call is not None and not request.functions:
        raise GatewayError(400, "function_call needs functions", param="function_call")
    if request.functions and not tools:  # deprecated form
        tools = [{"type": "function", "function": f} for f in request.functions]
        if isinstance(request.function_call, dict):
            tool_choice = {"type": "function", "function": request.function_call}
        elif request.function_call is not None:
            tool_choice = request.function_call
    if tools:
        if not deployment.tool_parser:
            raise GatewayError(400, f"Deployment {deployment.name} does not support tools "
                                    "(no tool parser configured)", param="tools")
        if tool_choice == "any":
            tool_choice = "required"
        if isinstance(tool_choice, dict) and "function" not in tool_choice \
                and "name" in tool_choice:
            tool_choice = {"type": "function", "function": {"name": tool_choice["name"]}}
        check_tools(tools, tool_choice)
        body["tools"] = strict_when_forced(tools, tool_choice)
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
    plan = sampled.plan(chat=True, logprobs=fmt, return_token_ids=return_token_ids,
                        raw_output=raw_output, echo=echo, n=request.n or 1,
                        prompt_fragments=[m.content for m in request.messages])
    return continuable(body, plan, deployment), plan


def chat_history(messages: list[ChatMessage], mode: str | None) -> list[dict[str, Any]]:
    """The messages for vLLM; reasoning_history says which earlier reasoning_content goes
    back into the prompt: none ("disabled"), that of the turns after the last user message
    ("interleaved", a tool-calling loop), or all ("preserved"; also when unset)."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    out = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        if message.role == "developer":
            item["role"] = "system"
        if mode == "disabled" or (mode == "interleaved" and i < last_user):
            item.pop("reasoning_content", None)
        out.append(item)
    return out


def check_tools(tools: list[dict[str, Any]], tool_choice: Any) -> None:
    """What the gateway reads of tools and a named tool_choice has the shape it reads (a 400
    naming the field, not a 500): each tool's `function` an object whose `name` is a string;
    a tool_choice object's `function` likewise. The rest is the worker's to judge."""
    for index, tool in enumerate(tools):
        function = tool.get("function")
        if function is not None and not (isinstance(function, dict)
                                         and isinstance(function.get("name"), str)):
            raise GatewayError(400, "tools: a function needs a name (a string)",
                               param=f"tools[{index}].function")
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise GatewayError(400, "tool_choice: name a function ({\"type\": \"function\", "
                                    "\"function\": {\"name\": ...}})",
                               param="tool_choice.function")


def strict_when_forced(tools: list[dict[str, Any]], tool_choice: Any
                       ) -> list[dict[str, Any]]:
    """A forced call (tool_choice naming a function, or "required") follows the forced
    tools' parameter schemas, as on Fireworks: those tools go to vLLM with `strict: true`,
    which constrains their arguments (vLLM 0.32 constrains only the call's envelope for
    tools that do not say `strict`). A tool whose `strict` the client set is left as sent;
    an automatic choice is left to the model."""
    if isinstance(tool_choice, dict):
        forced = {(tool_choice.get("function") or {}).get("name")}
    elif tool_choice == "required":
        forced = {(t.get("function") or {}).get("name") for t in tools}
    else:
        return tools
    out = []
    for tool in tools:
        function = tool.get("function")
        if isinstance(function, dict) and function.get("name") in forced \
                and "strict" not in function:
            tool = tool | {"function": function | {"strict": True}}
        out.append(tool)
    return out
