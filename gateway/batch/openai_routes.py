"""OpenAI's Files and Batches, as the `openai` SDK calls them (under every API prefix)."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from gateway.batch.engine import WINDOW
from gateway.batch.files import openai_file
from gateway.batch.http import parts, upload
from gateway.batch.jobs import Job, new_job_id
from gateway.batch.lines import ENDPOINTS
from gateway.batch.shapes import openai_batch
from gateway.errors import GatewayError
from gateway.validation import check_metadata

router = APIRouter()


def _purpose(fields: dict[str, str]) -> None:
    if fields.get("purpose") != "batch":
        raise GatewayError(400, "purpose must be 'batch': this gateway keeps files for batch "
                                "jobs only")


@router.post("/files")
async def create_file(request: Request) -> dict[str, Any]:
    account, batch = parts(request)
    return openai_file(await upload(request, batch.files, account, _purpose))


def _page(data: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    shown = data[:limit]
    return {"object": "list", "data": shown, "has_more": len(data) > limit,
            "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None}


@router.get("/files")
async def list_files(request: Request, purpose: str | None = None,
                     limit: int = Query(10000, ge=1, le=10000), after: str | None = None,
                     order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    account, batch = parts(request)
    found = await batch.files.listed(account.id, purpose, limit + 1, after,
                                     newest_first=order == "desc")
    return _page([openai_file(f) for f in found if f.purpose != "dataset"], limit)


@router.get("/files/{file_id}")
async def get_file(request: Request, file_id: str) -> dict[str, Any]:
    account, batch = parts(request)
    return openai_file(await batch.files.get(account.id, file_id))


@router.get("/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> FileResponse:
    account, batch = parts(request)
    stored = await batch.files.get(account.id, file_id)
    return FileResponse(batch.files.path(stored), media_type="application/octet-stream")


@router.delete("/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    account, batch = parts(request)
    await batch.files.delete(account.id, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


@router.post("/batches")
async def create_batch(request: Request, body: BatchRequest) -> dict[str, Any]:
    account, batch = parts(request)
    if body.endpoint not in ENDPOINTS:
        raise GatewayError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}")
    if body.completion_window != "24h":
        raise GatewayError(400, "completion_window must be '24h'")
    check_metadata(body.metadata)
    source = await batch.files.get(account.id, body.input_file_id)
    if source.purpose != "batch":
        raise GatewayError(400, f"File {source.id} was not uploaded for batch")
    now = int(time.time())
    job = Job(new_job_id("openai"), account.id, {
        "shape": "openai", "endpoint": body.endpoint, "input_file": source.id,
        "metadata": body.metadata, "expires_at": now + WINDOW})
    return openai_batch(await batch.engine.create(job, source))


async def _job(request: Request, batch_id: str) -> tuple[Job, Any]:
    account, batch = parts(request)
    job = await batch.engine.jobs.find(account.id, batch_id)
    if job is None or job.spec["shape"] != "openai":
        raise GatewayError(404, f"No such batch: {batch_id}")
    return job, batch


@router.get("/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str) -> dict[str, Any]:
    job, _ = await _job(request, batch_id)
    return openai_batch(job)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
    job, batch = await _job(request, batch_id)
    return openai_batch(await batch.engine.cancel(job))


@router.get("/batches")
async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100),
                       after: str | None = None) -> dict[str, Any]:
    account, batch = parts(request)
    jobs = await batch.engine.jobs.listed(account.id, limit + 1, after)
    return _page([openai_batch(j) for j in jobs if j.spec["shape"] == "openai"], limit)
