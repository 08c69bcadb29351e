"""The client's side of one inference request, whichever way it came: what the data plane
(dataplane/request.py) serves. It reads a `Client`'s headers and body, answers it, and
learns that it left; it never sees how. The one module of this package the data plane
imports.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.config import Settings
from gateway.errors import GatewayError

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class BatchLine:
    """A request that is one line of a batch job (gateway/batch/), not a client's: it was
    authorized when its job was made, it waits in the queue's batch band, and its usage
    record's id is the line's own, so that a line run twice is counted once."""

    job: str
    account: str
    record_id: str


class Client(Protocol):
    @property
    def path(self) -> str: ...

    @property
    def batch(self) -> BatchLine | None:
        """The batch line this request is; None for a client's own request."""

    @property
    def headers(self) -> Mapping[str, str]:
        """Names in lower case."""

    @property
    def request_id(self) -> str: ...

    @property
    def gone(self) -> bool:
        """It left while watched, and the request's task was cancelled for that."""

    @property
    def responded(self) -> bool:
        """The reply began: an error can no longer be sent as a status."""

    async def read_body(self, settings: Settings) -> bytes:
        """The body, at most `max_body_bytes` (else 413); CancelledError if the client
        left while sending it."""

    def watch(self) -> None:
        """From now on the client leaving cancels the current task (and sets `gone`)."""

    def unwatch(self) -> None:
        """Call with no await since the reply's last write: a client leaving after the
        reply completed must not cancel anything."""

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        """A complete reply (the content-length is added)."""

    async def begin(self, status: int, headers: Headers) -> None:
        """A streamed reply's status and headers; `part`s and one `last` follow."""

    async def part(self, body: bytes) -> None: ...

    async def last(self, body: bytes) -> None: ...


Serve = Callable[[Client], Awaitable[None]]



def request_id(given: str) -> str:
    """The client's x-request-id when it is short visible ASCII (it goes into logs, headers
    and error messages), else a new one."""
    if 0 < len(given) <= 128 and all("!" <= c <= "~" for c in given):
        return given
    # A version 4 UUID, formatted here (uuid.UUID costs several times more): random, not
    # uuid4's os.urandom, so no system call per request (seeded from the OS per process).
    h = "%032x" % (random.getrandbits(128) & UUID_RANDOM | UUID_V4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


UUID_V4 = (4 << 76) | (0b10 << 62)  # the version and variant bits

UUID_RANDOM = ~((0xF << 76) | (0b11 << 62)) & ((1 << 128) - 1)



def header_map(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    # HTTP servers give header names in lower case.
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}



def too_large(settings: Settings, limit: int | None = None) -> GatewayError:
    limit = settings.max_body_bytes if limit is None else limit
    return GatewayError(413, f"The request body is larger than {limit} bytes",
                        headers={"connection": "close"})



def api_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")



def check_declared_length(headers: Mapping[str, str], settings: Settings,
                          limit: int | None = None) -> None:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > (limit or settings.max_body_bytes):
        raise too_large(settings, limit)


# Uploads (a batch job's file, a dataset) are bounded by the file limit instead.
UPLOAD_ENDINGS = ("/files", ":upload")
FORM_SLACK = 64 << 10  # what a multipart body may add to its file


def body_limit(settings: Settings, method: str, path: str) -> int:
    if method == "POST" and path.endswith(UPLOAD_ENDINGS):
        return settings.batch_file_max_bytes + FORM_SLACK
    return settings.max_body_bytes

