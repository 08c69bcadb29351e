"""HTTP to vLLM workers, with every failure mapped to a gateway error.

The HTTP itself is dataplane/http1.py, a small client chosen by measurement: with httpx the
client was ~78% of the gateway's CPU per plain request at concurrency 32, with aiohttp ~27%
(docs/benchmarks.md, "What the gateway costs").

A worker that cannot be reached, times out, breaks the connection, redirects, refuses the
gateway (401/403/404) or fails (5xx) is a replica fault: 502/503/504, retried elsewhere
before the first byte. Only a worker 4xx that judges the request itself (400, 413, 422)
passes through, with the worker's one-line message. Worker bodies, tracebacks and exception
reprs go to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson

from gateway.dataplane.http1 import ConnectFailed, Connection, HttpError, Pool
from gateway.errors import GatewayError, TargetUnavailable, WorkerFault

logger = logging.getLogger("gateway.workers")

JSON_HEADERS = {"content-type": "application/json"}
MAX_ANSWER_BYTES = 64 << 20  # a non-streaming answer, or one streamed event
END_GRACE = 0.5  # seconds to wait for the end of a body after its last event
# Worker statuses that judge the client's request, not the replica.
CLIENT_STATUSES = {400: 400, 413: 413, 422: 400}
# vLLM's 400 for a prompt longer than its context (how its two checks' messages begin, so that
# text of the client's own further on does not count): another deployment with a longer
# context may serve it (dataplane/targets.py).
CONTEXT_REFUSED = re.compile(r"This model's maximum context length is \d+|The (decoder |encoder )?"
                             r"prompt \(length \d+\) is longer than the maximum model length")


def _worker_message(body: bytes) -> str:
    """The first line of a vLLM error envelope's message, bounded; '' when there is none."""
    try:
        error = orjson.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else None
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    if not isinstance(message, str):
        return ""
    return message.strip().splitlines()[0][:300] if message.strip() else ""


def check_status(status: int, body: bytes) -> None:
    if 200 <= status < 300:
        return
    if status in CLIENT_STATUSES:
        message = _worker_message(body) or "The worker rejected the request"
        if status == 400 and CONTEXT_REFUSED.match(message):
            raise TargetUnavailable(400, message, "context_length",
                                    headers={"x-should-retry": "false"})
        raise GatewayError(CLIENT_STATUSES[status], message,
                           headers={"x-should-retry": "false"})
    detail = f"worker answered HTTP {status}: {body[:500]!r}"
    if status == 429 or status == 503:
        raise WorkerFault(detail, status=503, message="The worker is overloaded",
                          headers={"retry-after": "1"}, worker_status=status)
    raise WorkerFault(detail, message=f"The worker failed to answer (HTTP {status})",
                      worker_status=status)


def transport_fault(exc: BaseException) -> WorkerFault:
    """A connection failure as a replica fault with a fixed message."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):
        return WorkerFault(detail, status=504, message="The worker did not answer in time")
    if isinstance(exc, ConnectFailed):
        return WorkerFault(detail, status=503, message="No worker reachable for this deployment",
                           headers={"retry-after": "1"})
    return WorkerFault(detail, message="The connection to the worker broke")


TRANSPORT_ERRORS = (HttpError, OSError, TimeoutError)


class WorkerAnswer:
    """A worker's answer whose headers have arrived. Close it to abort the worker request
    (vLLM aborts a request whose connection closes); once read to the end, closing it
    gives the connection back to the pool."""

    def __init__(self, pool: Pool, url: str, connection: Connection) -> None:
        self.pool, self.url, self.connection = pool, url, connection
        self.status = connection.status
        self.content_type = connection.content_type

    async def read(self) -> bytes:
        """The whole body, bounded."""
        length = self.connection.content_length
        if length is not None and length > MAX_ANSWER_BYTES:
            raise WorkerFault(f"an answer of {length} bytes")
        parts, size = [], 0
        try:
            while data := await self.connection.read_some():
                size += len(data)
                if size > MAX_ANSWER_BYTES:
                    raise WorkerFault("an answer larger than the limit")
                parts.append(data)
        except TRANSPORT_ERRORS as exc:
            raise transport_fault(exc) from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def events(self) -> AsyncIterator[list[tuple[str, bytes]]]:
        """The body's server-sent events as (name, data), in batches of those that arrived
        together (the name is "" when the event has none; several `data:` lines are joined
        by newlines). The reader stops asking once it has the last event it wants (then
        `finish`); a body that ends before that is a fault."""
        buffer, name, data = b"", "", None
        while True:
            try:
                received = await self.connection.read_some()
            except TRANSPORT_ERRORS as exc:
                raise transport_fault(exc) from exc
            if not received:
                if buffer[:5] == b"data:":  # a last line without its newline
                    payload, buffer = buffer[5:].strip(), b""
                    data = payload if data is None else data + b"\n" + payload
                if data is not None or name:  # a last event without its blank line
                    yield [(name, b"" if data is None else data)]
                    name, data = "", None
                    continue
                raise WorkerFault("the stream ended before its last event")
            buffer = buffer + received if buffer else received
            if b"\n" not in buffer:
                if len(buffer) > MAX_ANSWER_BYTES:
                    raise WorkerFault("a streamed event larger than the limit")
                continue
            *lines, buffer = buffer.split(b"\n")
            batch = []
            for line in lines:
                if line[:5] == b"data:":
                    payload = line[5:].strip()
                    data = payload if data is None else data + b"\n" + payload
                    if len(data) > MAX_ANSWER_BYTES:
                        raise WorkerFault("a streamed event larger than the limit")
                elif line[:6] == b"event:":
                    name = line[6:].strip().decode("latin-1")
                elif (line == b"" or line == b"\r") and (data is not None or name):
                    batch.append((name, b"" if data is None else data))  # a blank line
                    name, data = "", None  # ends an event
            if batch:
                yield batch

    async def finish(self) -> None:
        """After the last event, the end of the body is on its way: read it, so that the
        connection goes back to the pool instead of being closed."""
        try:
            async with asyncio.timeout(END_GRACE):
                while await self.connection.read_some():
                    pass
        except (*TRANSPORT_ERRORS, TimeoutError):
            pass  # close() will close the connection

    def cut(self) -> None:
        """Close the connection now: whoever reads the answer gets the fault of a broken
        connection (how a stream is moved off a replica that failed its health check)."""
        self.connection.close()

    def close(self) -> None:
        """Keep the connection when the answer was read to its end; otherwise close it, which
        aborts the request on the worker."""
        self.pool.release(self.connection, self.url)


class WorkerClient:
    """Pooled HTTP/1.1 connections to every worker."""

    def __init__(self, connect_timeout: float, read_timeout: float,
                 ca_file: str | None = None, api_key: str | None = None) -> None:
        tls = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.pool = Pool(connect_timeout, read_timeout, tls)
        # The workers' key (engine_plugins/worker_auth.py), on every request to them.
        self.auth = {"authorization": f"Bearer {api_key}"} if api_key else {}

    def prune(self, listed: Iterable[str]) -> int:
        """Close idle connections to workers no longer listed (see Pool.prune)."""
        return self.pool.prune(listed)

    async def aclose(self) -> None:
        self.pool.close()

    async def open(self, url: str, body: bytes, headers: dict[str, str]) -> WorkerAnswer:
        """POST and return once the worker answered with a 2xx status and headers."""
        try:
            connection = await self.pool.request(b"POST", url, body,
                                                 JSON_HEADERS | self.auth | headers)
        except TRANSPORT_ERRORS as exc:
            raise transport_fault(exc) from exc
        answer = WorkerAnswer(self.pool, url, connection)
        if not 200 <= answer.status < 300:
            try:
                async with asyncio.timeout(self.pool.read_timeout):
                    error_body = await _some(connection, 64 << 10)
            except (*TRANSPORT_ERRORS, TimeoutError):
                error_body = b""
            finally:
                answer.close()
            check_status(answer.status, error_body)
        return answer

    async def post_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """A small JSON call (tokenize, detokenize): the answer must be a JSON object."""
        answer = await self.open(url, orjson.dumps(body), {})
        try:
            raw = await answer.read()
        finally:
            answer.close()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise WorkerFault(f"{url}: not JSON: {raw[:200]!r}") from exc
        if not isinstance(data, dict):
            raise WorkerFault(f"{url}: not a JSON object")
        return data

    async def get(self, url: str, timeout: float) -> tuple[int, bytes] | None:
        """GET url (a health check, the worker's metrics): status and body (at most 4 MiB),
        or None when the worker cannot be reached in time."""
        try:
            async with asyncio.timeout(timeout):
                connection = await self.pool.request(b"GET", url, b"", self.auth,
                                                     read_timeout=timeout)
                try:
                    body = await _some(connection, 4 << 20)
                finally:
                    self.pool.release(connection, url)
                return connection.status, body
        except (*TRANSPORT_ERRORS, ValueError):
            return None


async def _some(connection: Connection, limit: int) -> bytes:
    """Up to about `limit` bytes of a body (an error message, a probe's answer)."""
    parts, size = [], 0
    while size < limit and (data := await connection.read_some()):
        parts.append(data)
        size += len(data)
    return b"".join(parts)[:limit]
