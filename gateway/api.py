"""The contract between the data plane and each inference API.

The data plane (dataplane/) serves every inference API with one path: parse, resolve,
admit, attempt on replicas, relay, end. What differs between APIs (chat, completions,
embeddings, Anthropic Messages, ...) lives in one `InferenceApi` object per API, in the
package of its protocol (fireworks/chat.py, anthropic/api.py, ...), and in the `Call` it
makes of each request. The data plane calls only what is declared here; adding an API is one new
object and its Call, plus their tests, and one row in the route table (app.py).

Imports run one way: app -> dataplane and the API packages -> this module -> control
plane, errors, config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from pydantic import BaseModel

from gateway.config import Settings
from gateway.controlplane.registry import Route
from gateway.errors import GatewayError, WorkerFault

MAX_TOKENS = (1 << 31) - 1  # vLLM counts tokens in 32-bit integers
RequestModel_contra = TypeVar("RequestModel_contra", bound=BaseModel, contravariant=True)


@dataclass
class Served:
    """Where and when one attempt was served, and what its worker reported so far: the
    report an API's reply or stream framing writes (first token, usage) and request.py reads at
    the request's end. Nothing else of the request is reachable from the API's side."""

    deployment: str
    backend_host: str  # host:port of the replica
    concurrent: int  # requests in flight on that replica from this gateway, this one included
    started: float  # monotonic, when the request was admitted
    first_token_at: float | None = None
    # Why the replica was chosen, when the workers' KV caches decided it (kv_index.py).
    routing: str | None = None
    # The latest usage the worker reported, in the usage-record shape (see coerce_usage),
    # as sent: coerced when read.
    usage: Any = None

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()


class Worker(Protocol):
    """What an API may ask the worker an attempt is on, besides the request itself
    (dataplane/queries.py serves it)."""

    @property
    def url(self) -> str: ...

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /tokenize: `{"count", "max_model_len", "tokens"}`."""
        ...

    async def detokenize(self, ids: list[int]) -> str: ...

    async def token_texts(self, model: str, ids: Iterable[int]) -> dict[int, str]:
        """The text of each token id (cached per model)."""
        ...

    async def served_model(self) -> str:
        """The name the worker serves its base model under."""
        ...


@dataclass
class Reply:
    """What the client gets for a complete non-streaming answer: the worker's answer
    checked and reshaped. (Names: an *answer* is what a worker sends, a *reply* what the
    client gets.)"""

    body: bytes
    headers: list[tuple[bytes, bytes]]


class StreamFraming(Protocol):
    """One attempt's stream, event by event: the worker's SSE events in, the client's
    bytes out. The relay (dataplane/relay.py) runs the one loop around it; the framing
    reports the first token and the usage into the attempt's `Served`."""

    # The engine produced something: the held headers may go.
    ready: bool
    # The worker's last event came (the relay reads no further; events after it are
    # ignored).
    done: bool

    async def take(self, events: list[tuple[str, bytes]]) -> list[bytes]:
        """Worker events (name, data), in order, as they arrived together -> what to send
        now (WorkerFault when one is not valid)."""
        ...

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers once ready (besides the content type)."""
        ...

    def drain(self) -> list[bytes]:
        """Before an error event: whatever is held back, so no produced text is lost."""
        ...

    def error_event(self, exc: GatewayError, request_id: str) -> bytes:
        """The API's own mid-stream failure event (and end marker)."""
        ...

    def continuable(self) -> bool:
        """Whether a failure of the worker now would be followed by a continuation."""
        ...

    def continuation(self) -> Continuation:
        """After the worker failed mid-stream: the request that continues the generation,
        token-exactly, on another worker, with this framing switched to read its answer as
        the rest of the stream (dataplane/request.py sends it). NotContinued when it cannot
        be continued exactly."""
        ...


@dataclass
class Continuation:
    """The worker request that continues a stream elsewhere."""

    worker_path: str
    body: dict[str, Any]
    generated: int  # tokens the client has already (for the trace and the log)
    # Told the worker the continuation is sent to (what the framing asks from here).
    sent_to: Callable[[Worker], None]


class NotContinued(Exception):
    """A stream that is not continued on another worker, and why (a feature's name, or
    what is missing)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Framing:
    """What a StreamFraming inherits: not ready nor done yet, no headers of its own, nothing
    held back (a framing that holds events back overrides `drain`)."""

    ready: bool = False
    done: bool = False

    def headers(self) -> list[tuple[bytes, bytes]]:
        return []

    def drain(self) -> list[bytes]:
        return []

    def continuable(self) -> bool:
        return False

    def continuation(self) -> Continuation:
        raise NotContinued("api")  # (an API whose streams are continued overrides it)


@dataclass
class CacheQuery:
    """What routing on the workers' KV caches needs of a request (dataplane/kv_index.py):
    its prompt as the worker's /tokenize takes it, or its token ids, and its cache salt."""

    tokenize: dict[str, Any] | None = None
    token_ids: list[int] | None = None
    salt: str | None = None


@dataclass(kw_only=True)
class Call:
    """One request, translated for the workers: what the data plane needs to admit, route
    and send it, and the API's handling of each attempt's answer. The defaults here are a
    request that generates nothing, is never streamed, costs nothing before the worker counts
    and reuses no cached prefix; an API's Call sets what differs and implements `reply` (and
    `framing` when it streams)."""

    body: dict[str, Any]  # the worker request (the data plane encodes it once)
    stream: bool = False
    max_tokens: int = 0  # per sequence, for the token limits
    # Sequences the workers run for it (prompts x n, embedding inputs, documents): what
    # the limits reserve output for, and its weight in the queue and in replica load.
    sequences: int = 1
    metadata: dict[str, str] | None = None  # the client's, kept with the usage record
    priority: bool = False  # asked for priority service: ahead in the gateway's queue
    affinity: str | None = None  # the client's own cache key in the body, if any
    # Which of its account's prefix caches the request shares on the workers: "" the
    # account's own, a key for a part of it; None: none (a salt of its own). The data plane
    # sets the salt itself (dataplane/isolation.py), whatever the body holds.
    cache_scope: str | None = ""

    def prompt_estimate(self) -> int:
        """Prompt tokens to reserve before the worker has counted them (asked only for an
        account with limits, after the body was encoded)."""
        return 0

    def prefix_material(self, limit: int) -> bytes | None:
        """At most `limit` bytes of the prompt's stable head (what every turn of a
        conversation starts with), for the affinity key when the client names none; None
        when the API reuses no cached prefix."""
        return None

    def cache_query(self) -> CacheQuery | None:
        """The prompt whose cached prefix routing looks for on the workers; None when the
        API reuses no cached prefix (or cannot say which tokens its prompt is)."""
        return None

    async def prepare(self, worker: Worker, encoded: bytes) -> bytes:
        """Before each attempt: checks or lookups on that worker; the body to send."""
        return encoded

    async def reply(self, raw: bytes, worker: Worker, served: Served) -> Reply:
        """A worker's complete JSON answer (status 2xx, content type checked) -> the
        client's reply; WorkerFault when it is not a valid answer."""
        raise NotImplementedError

    def framing(self, worker: Worker, served: Served) -> StreamFraming:
        """A fresh framing for one attempt's stream (only Calls that stream have one)."""
        raise AssertionError(f"{type(self).__name__} is never streamed")


class InferenceApi(Protocol[RequestModel_contra]):
    """One inference API: served at `<prefix><path>`, sent to `<worker><worker_path>`.
    What is static about it lives here; what each request asks lives in its Call."""

    path: str
    worker_path: str  # also the endpoint label of metrics and usage records
    request_model: type[BaseModel]

    def translate(self, request: RequestModel_contra, route: Route, settings: Settings, *,
                  account: str, nonce: str) -> Call:
        """Pure: the request for this route -> the Call (or a 400 naming a field)."""
        ...

    def error_body(self, exc: GatewayError, request_id: str) -> dict[str, Any]:
        """The API's error envelope."""
        ...


class Api:
    """What an API object inherits: the Fireworks error envelope (an API that speaks
    another protocol overrides it)."""

    def error_body(self, exc: GatewayError, request_id: str) -> dict[str, Any]:
        return exc.envelope(request_id)


def worker_json(raw: bytes) -> Any:
    """A worker's JSON; WorkerFault when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WorkerFault(f"not JSON: {raw[:200]!r}") from exc


# Keys of a usage block that are token counts.
_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _count(value: Any) -> int:
    """A token count as a non-negative int; anything else counts as 0."""
    if type(value) is int:  # the usual case first (bool is not int's type itself)
        return value if value > 0 else 0
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and value.is_integer():
        return max(int(value), 0)
    return 0


def coerce_usage(usage: Any) -> dict[str, Any] | None:
    """The worker's usage block in the Fireworks shape, every count a non-negative int."""
    if not isinstance(usage, dict):
        return None
    out: dict[str, Any] = {key: _count(usage.get(key)) for key in _COUNTS}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    out["prompt_tokens_details"] = {"cached_tokens": _count(cached)}
    return out
