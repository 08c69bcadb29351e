"""Server-sent events as the gateway writes them: one encoder for every API's stream."""

from __future__ import annotations


def sse(data: bytes, event: str | None = None) -> bytes:
    """One event: `event: <name>` when named, then its data line and the blank line."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
