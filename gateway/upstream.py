"""HTTP calls to vLLM workers, with worker failures mapped to gateway errors."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from gateway.errors import GatewayError

JSON_HEADERS = {"content-type": "application/json"}


def _worker_message(response_body: bytes) -> str:
    try:
        error = orjson.loads(response_body).get("error", {})
        return str(error.get("message") or error)
    except (orjson.JSONDecodeError, AttributeError):
        return response_body.decode(errors="replace")[:500]


def raise_for_worker_status(status: int, body: bytes) -> None:
    """Worker 4xx are the client's fault and pass through; 5xx become 502."""
    if status < 400:
        return
    message = _worker_message(body)
    if status < 500:
        raise GatewayError(status, message, headers={"x-should-retry": "false"})
    raise GatewayError(502, f"Upstream worker failed ({status}): {message}", replica_fault=True)


class WorkerClient:
    """One pooled httpx client for every worker."""

    def __init__(self, connect_timeout: float, read_timeout: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self.http = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def post_json(
        self, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[dict[str, Any], httpx.Headers]:
        try:
            response = await self.http.post(url, content=orjson.dumps(body),
                                            headers=JSON_HEADERS | headers)
        except httpx.TimeoutException as exc:
            raise GatewayError(504, f"Upstream worker timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise unavailable(exc) from exc
        raise_for_worker_status(response.status_code, response.content)
        return orjson.loads(response.content), response.headers

    async def open_stream(
        self, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> httpx.Response:
        """Send a streaming request and return once the worker answered with headers."""
        request = self.http.build_request("POST", url, content=orjson.dumps(body),
                                          headers=JSON_HEADERS | headers)
        try:
            response = await self.http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise GatewayError(504, f"Upstream worker timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise unavailable(exc) from exc
        if response.status_code >= 400:
            body_bytes = await response.aread()
            await response.aclose()
            raise_for_worker_status(response.status_code, body_bytes)
        return response


def unavailable(exc: Exception) -> GatewayError:
    return GatewayError(503, f"No worker reachable for this deployment: {exc!r}",
                        headers={"retry-after": "1"}, replica_fault=True)
