"""The Fireworks error envelope and the exception that carries it.

Every failure leaves the gateway as `{"error": {object, type, code, message, param?},
"request_id"}` with a real HTTP status (docs/fireworks-api.md, "Errors"): validation is 400,
never 422.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.types import Send

from gateway.sse import sse

# status -> (type, code): the gRPC-style codes Fireworks returns, with OpenAI-aligned types,
# except where Fireworks' own body differs: its 404 says `"type": "error"` (and clients such
# as LiteLLM read `invalid_request_error` as a 400 whatever the status).
_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "INVALID_ARGUMENT"),
    401: ("authentication_error", "UNAUTHORIZED"),
    402: ("invalid_request_error", "PAYMENT_REQUIRED"),
    403: ("permission_error", "FORBIDDEN"),
    404: ("error", "NOT_FOUND"),
    405: ("invalid_request_error", "METHOD_NOT_ALLOWED"),
    408: ("internal_server_error", "DEADLINE_EXCEEDED"),
    412: ("invalid_request_error", "FAILED_PRECONDITION"),
    413: ("invalid_request_error", "PAYLOAD_TOO_LARGE"),
    422: ("invalid_request_error", "INVALID_ARGUMENT"),  # never sent: validation is 400
    429: ("rate_limit_error", "RESOURCE_EXHAUSTED"),
    431: ("invalid_request_error", "REQUEST_HEADER_FIELDS_TOO_LARGE"),
    500: ("internal_server_error", "INTERNAL"),
    502: ("internal_server_error", "BAD_GATEWAY"),
    503: ("internal_server_error", "UNAVAILABLE"),
    504: ("internal_server_error", "DEADLINE_EXCEEDED"),
}


class GatewayError(Exception):
    """A failure with a Fireworks status, message and optional parameter name."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        replica_fault: bool = False,
    ) -> None:
        super().__init__(message)
        # The replica failed (unreachable, 5xx, died before answering): another one may not.
        self.replica_fault = replica_fault
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def envelope(self, request_id: str | None = None) -> dict[str, Any]:
        return error_envelope(self.status, self.message, param=self.param, request_id=request_id)


class WorkerFault(GatewayError):
    """The worker answered something that is not a valid answer (or failed to answer)."""

    def __init__(self, detail: str, *, status: int = 502,
                 message: str = "The worker returned an invalid answer",
                 headers: dict[str, str] | None = None,
                 worker_status: int | None = None) -> None:
        super().__init__(status, message, headers=headers, replica_fault=True)
        self.detail = detail  # for the log only: may hold worker internals
        self.worker_status = worker_status  # the worker's HTTP status, when it sent one


class TargetUnavailable(GatewayError):
    """The request's target cannot take it, where a fallback target may
    (dataplane/targets.py): `reason` "shed" (its queue is full), "disabled", "no_replica"
    (none in rotation) or "context_length" (the prompt is longer than its context)."""

    def __init__(self, status: int, message: str, reason: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, param=param, headers=headers)
        self.reason = reason


def error_envelope(
    status: int, message: str, *, param: str | None = None, request_id: str | None = None
) -> dict[str, Any]:
    kind, code = _KINDS.get(status, ("internal_server_error" if status >= 500
                                     else "invalid_request_error", "UNKNOWN"))
    error: dict[str, Any] = {"object": "error", "type": kind, "code": code, "message": message}
    if param is not None:
        error["param"] = param
    body: dict[str, Any] = {"error": error}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def stream_error_event(status: int, message: str, response_id: str) -> bytes:
    """The mid-stream failure event: `event: error`, then `data: [DONE]`."""
    payload = error_envelope(status, message)
    payload["error"]["status_code"] = status
    payload["id"] = response_id
    return sse(orjson.dumps(payload), "error") + sse(b"[DONE]")


def bytes_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI sends them (values outside latin-1 replaced, never an exception)."""
    return [(k.encode(), v.encode("latin-1", "replace")) for k, v in headers.items()]


def error_headers(exc: GatewayError) -> list[tuple[bytes, bytes]]:
    """An error reply's headers (its JSON envelope's type and the error's own), less the
    length."""
    return [(b"content-type", b"application/json"), *bytes_headers(exc.headers)]


async def send_error(send: Send, exc: GatewayError, request_id: str,
                     envelope: dict[str, Any] | None = None) -> None:
    """An error response through ASGI (for the layers in front of FastAPI); the Fireworks
    envelope unless another is given."""
    body = orjson.dumps(exc.envelope(request_id) if envelope is None else envelope)
    headers = [*error_headers(exc), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
