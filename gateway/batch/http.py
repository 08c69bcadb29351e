"""What both batch APIs' routes share: the account (by its key, before any byte of a body is
read), the batch parts of the app, and a multipart upload streamed to the volume."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.batch.engine import Engine
from gateway.batch.files import FileStore, StoredFile
from gateway.controlplane.registry import Account
from gateway.dataplane.read_routes import authenticate
from gateway.errors import GatewayError

FIELD_MAX = 4096  # bytes of a form field that is not the file (purpose, names)


@dataclass
class BatchParts:
    """app.state.batch: None when the gateway runs without Redis."""

    engine: Engine
    files: FileStore


def parts(request: Request) -> tuple[Account, BatchParts]:
    account = authenticate(request)
    batch: BatchParts | None = getattr(request.app.state, "batch", None)
    if batch is None:
        raise GatewayError(501, "Batch inference needs the shared state store: run the "
                                "gateway with GATEWAY_REDIS_URL")
    return account, batch


async def upload(request: Request, files: FileStore, account: Account,
                 check: Callable[[dict[str, str]], None],
                 file_id: str | None = None) -> StoredFile:
    """The multipart body's `file` part stored as the account's file; its other fields
    (purpose, ...) given to `check` at its end. Read as it arrives, never whole."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise GatewayError(400, "The upload must be multipart/form-data with a file part")
    fields: dict[str, str] = {}
    pending: list[bytes] = []  # the file's data the last write gave
    state: dict[str, bytes] = {"header": b"", "field": b"", "name": b"", "value": b""}
    current: dict[str, bytes] = {}
    seen_file = False

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        current[state["header"].lower().decode("latin-1")] = state["value"]
        state["header"] = state["value"] = b""

    def on_part_begin() -> None:
        current.clear()
        state["field"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal seen_file
        _, disposition = parse_options_header(current.get("content-disposition", b""))
        if disposition.get(b"name") == b"file":
            seen_file = True
            fields["filename"] = disposition.get(b"filename", b"upload.jsonl").decode(
                errors="replace")[:255]
            pending.append(data[start:end])
        else:
            state["field"] += data[start:end]
            if len(state["field"]) > FIELD_MAX:
                raise GatewayError(400, "A form field is too long")

    def on_part_end() -> None:
        _, disposition = parse_options_header(current.get("content-disposition", b""))
        name = disposition.get(b"name", b"").decode(errors="replace")
        if name and name != "file":
            fields[name] = state["field"].decode(errors="replace")

    parser = MultipartParser(boundary, {
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_begin": on_part_begin,
        "on_part_data": on_part_data, "on_part_end": on_part_end})

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                while pending:
                    yield pending.pop(0)
            parser.finalize()
        except MultipartParseError as exc:
            raise GatewayError(400, f"The upload is not valid multipart/form-data: {exc}"
                               ) from None
        while pending:
            yield pending.pop(0)
        if not seen_file:
            raise GatewayError(400, "The upload has no file part")

    declared = request.headers.get("content-length")
    return await files.upload(account.id, chunks(),
                              int(declared) if declared and declared.isdigit() else None,
                              fields, check, file_id)
