"""A scripted stand-in for a vLLM worker, plugged under the gateway's httpx client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from gateway.app import create_app
from gateway.config import Settings
from gateway.controlplane.registry import hash_key

KEY = "k-test"
MODEL = "accounts/fireworks/models/m"


def chunk(text: str | None = None, finish: str | None = None, chat: bool = False,
          usage: dict[str, int] | None = None) -> bytes:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text},
                                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    body = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 1, "model": "served", "choices": [] if usage else [choice]}
    if usage:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


class Stream(httpx.AsyncByteStream):
    def __init__(self, parts: list[bytes | Exception]) -> None:
        self.parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, Exception):
                raise part
            yield part


def transport(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def gateway(tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response],
            **settings: Any) -> Any:
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "accounts": [{"id": "fireworks", "api_keys": [hash_key(KEY)]}],
        "deployments": [{"id": "d", "account": "fireworks", "model": MODEL, "default": True,
                         "replicas": [{"url": "http://worker"}]}]}))
    settings.setdefault("health_check_interval", 0)  # only the scripted requests
    return create_app(Settings(registry_path=registry, **settings), transport(handler))
