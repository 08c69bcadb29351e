"""A worker that answers the gateway only: every HTTP path needs the workers' key, except
the probes and metrics (`/health`, `/ping`, `/metrics`), which carry nothing of a tenant's.

vLLM's own `--api-key` guards only paths under /v1, /v2, /inference and /cohere: /tokenize,
/detokenize, /rerank, /score, /pooling and others stay open to anyone who reaches the pod.
The launcher (engine_plugins/worker.py, `--api-key-file`) gives vLLM this middleware instead
(its `--middleware` flag), and the key through the environment.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

KEY_ENV = "FWG_WORKER_API_KEY_FILE"  # the file that holds the key (a mounted Secret)
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})
UNAUTHORIZED = b'{"error":"Unauthorized"}'


def read_key(path: str) -> bytes:
    key = Path(path).read_bytes().strip()
    if not key:
        raise ValueError(f"{path} holds no key")
    return key


class RequireKey:
    """ASGI middleware: 401 for any HTTP request without `Authorization: Bearer <key>`,
    but for OPEN_PATHS."""

    def __init__(self, app: Any, key: bytes | None = None) -> None:
        self.app = app
        key = key if key is not None else read_key(os.environ[KEY_ENV])
        self.digest = hashlib.sha256(key).digest()

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS \
                or self.allowed(scope):
            passed: Awaitable[None] = self.app(scope, receive, send)
            return passed
        return self.refuse(send)

    def allowed(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    hashlib.sha256(token.strip()).digest(), self.digest)
        return False

    @staticmethod
    async def refuse(send: Any) -> None:
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(UNAUTHORIZED))]})
        await send({"type": "http.response.body", "body": UNAUTHORIZED})
