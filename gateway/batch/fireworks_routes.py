"""Fireworks' shape of batch inference: datasets (JSONL of `custom_id` + `body`) and batch
inference jobs, under `/v1/accounts/<account>/...`. A path naming another account than the
key's is not found, as everything of another account."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.batch.engine import WINDOW
from gateway.batch.files import StoredFile
from gateway.batch.http import BatchParts, parts, upload
from gateway.batch.jobs import FINAL, Job, new_job_id
from gateway.batch.shapes import fireworks_dataset, fireworks_job
from gateway.controlplane.registry import Account
from gateway.dataplane.parts import Gateway
from gateway.errors import GatewayError

router = APIRouter()
LISTED = 200  # the newest, in a listing
PARAMETERS_MAX = 16 << 10  # bytes of a job's inferenceParameters, extraBody included
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# inferenceParameters -> the request's own fields
PARAMETERS = {"maxTokens": "max_tokens", "temperature": "temperature", "topP": "top_p",
              "topK": "top_k", "n": "n"}


def _account(request: Request, account_id: str) -> tuple[Account, BatchParts]:
    account, batch = parts(request)
    if account_id != account.id:
        raise GatewayError(404, f"No such account: {account_id}")
    return account, batch


def _short(name: str, account: str, kind: str) -> str:
    """`accounts/<a>/<kind>/<id>` or `<id>` -> the id (another account's: not found)."""
    prefix = f"accounts/{account}/{kind}/"
    short = name.removeprefix(prefix)
    if "/" in short or not NAME.fullmatch(short):
        raise GatewayError(404 if name.startswith("accounts/") else 400,
                           f"No such {kind[:-1]}: {name}")
    return short


class DatasetRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    dataset_id: str = Field(alias="datasetId")
    dataset: dict[str, Any] = {}


@router.post("/accounts/{account_id}/datasets")
async def create_dataset(request: Request, account_id: str,
                         body: DatasetRequest) -> dict[str, Any]:
    account, batch = _account(request, account_id)
    if not NAME.fullmatch(body.dataset_id):
        raise GatewayError(400, "datasetId must be lower-case letters, digits and dashes")
    if await batch.files.find(account.id, body.dataset_id) is not None:
        raise GatewayError(409, f"Dataset {body.dataset_id} exists")
    await batch.files.check_count(account.id)
    name = str(body.dataset.get("displayName") or body.dataset_id)[:255]
    stored = await batch.files.write(account.id, "dataset", f"{body.dataset_id}.jsonl", b"",
                                     body.dataset_id)
    stored = StoredFile(**(stored.__dict__ | {"display_name": name}))
    await batch.files.save(stored)
    return fireworks_dataset(stored)


async def _dataset(batch: BatchParts, account: Account, dataset_id: str) -> StoredFile:
    stored = await batch.files.find(account.id, dataset_id)
    if stored is None or stored.purpose != "dataset":
        raise GatewayError(404, f"No such dataset: {dataset_id}")
    return stored


@router.post("/accounts/{account_id}/datasets/{dataset_id}:upload")
async def upload_dataset(request: Request, account_id: str,
                         dataset_id: str) -> dict[str, Any]:
    account, batch = _account(request, account_id)
    existing = await _dataset(batch, account, dataset_id)
    if existing.bytes:
        raise GatewayError(409, f"Dataset {dataset_id} holds its data already")

    def check(fields: dict[str, str]) -> None:
        fields.update(purpose="dataset", display_name=existing.display_name)
    return fireworks_dataset(await upload(request, batch.files, account, check, dataset_id))


@router.get("/accounts/{account_id}/datasets/{dataset_id}:download")
async def download_dataset(request: Request, account_id: str,
                           dataset_id: str) -> FileResponse:
    account, batch = _account(request, account_id)
    stored = await _dataset(batch, account, dataset_id)
    return FileResponse(batch.files.path(stored), media_type="application/jsonl")


@router.get("/accounts/{account_id}/datasets/{dataset_id}")
async def get_dataset(request: Request, account_id: str, dataset_id: str) -> dict[str, Any]:
    account, batch = _account(request, account_id)
    return fireworks_dataset(await _dataset(batch, account, dataset_id))


@router.get("/accounts/{account_id}/datasets")
async def list_datasets(request: Request, account_id: str) -> dict[str, Any]:
    account, batch = _account(request, account_id)
    found = await batch.files.listed(account.id, "dataset", LISTED)
    return {"datasets": [fireworks_dataset(f) for f in found], "nextPageToken": "",
            "totalSize": len(found)}


@router.delete("/accounts/{account_id}/datasets/{dataset_id}")
async def delete_dataset(request: Request, account_id: str,
                         dataset_id: str) -> dict[str, Any]:
    account, batch = _account(request, account_id)
    await _dataset(batch, account, dataset_id)
    await batch.files.delete(account.id, dataset_id)
    return {}


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str
    input_dataset_id: str = Field(alias="inputDatasetId")
    output_dataset_id: str | None = Field(None, alias="outputDatasetId")
    inference_parameters: dict[str, Any] = Field({}, alias="inferenceParameters")
    display_name: str = Field("", alias="displayName", max_length=255)
    precision: str | None = None
    continued_from_job_name: str | None = Field(None, alias="continuedFromJobName")


def request_fields(parameters: dict[str, Any]) -> dict[str, Any]:
    """inferenceParameters -> the fields every line's request gets (its own win)."""
    fields = {PARAMETERS[k]: v for k, v in parameters.items() if k in PARAMETERS}
    unknown = set(parameters) - set(PARAMETERS) - {"extraBody"}
    if unknown:
        raise GatewayError(400, f"Unknown inferenceParameters: {', '.join(sorted(unknown))}")
    extra = parameters.get("extraBody")
    if extra:
        try:
            more = orjson.loads(extra) if isinstance(extra, str) else extra
        except orjson.JSONDecodeError:
            more = None
        if not isinstance(more, dict):
            raise GatewayError(400, "inferenceParameters.extraBody must be a JSON object")
        fields |= more
    return fields


@router.post("/accounts/{account_id}/batchInferenceJobs")
async def create_job(request: Request, account_id: str, body: JobRequest,
                     job_id: str | None = Query(None, alias="batchInferenceJobId")
                     ) -> dict[str, Any]:
    account, batch = _account(request, account_id)
    gateway: Gateway = request.app.state.gateway
    gateway.store.current.resolve(body.model, account)  # 404 now, not on every line
    job_id = job_id or new_job_id("fireworks")
    if not NAME.fullmatch(job_id) or await batch.engine.jobs.find(account.id, job_id):
        raise GatewayError(400 if not NAME.fullmatch(job_id) else 409,
                           f"batchInferenceJobId {job_id} is not valid or is taken")
    source = await _dataset(batch, account,
                            _short(body.input_dataset_id, account.id, "datasets"))
    output = _short(body.output_dataset_id or f"{job_id}-output", account.id, "datasets")
    if await batch.files.find(account.id, output) is not None:
        raise GatewayError(409, f"Dataset {output} exists; name another outputDatasetId")
    done_before = None
    continued = ""
    if body.continued_from_job_name:
        earlier = await batch.engine.jobs.find(
            account.id, _short(body.continued_from_job_name, account.id,
                               "batchInferenceJobs"))
        if earlier is None or earlier.spec["shape"] != "fireworks":
            raise GatewayError(404, f"No such job: {body.continued_from_job_name}")
        if earlier.status not in FINAL:
            raise GatewayError(400, "The job continued from must have finished")
        continued = f"accounts/{account.id}/batchInferenceJobs/{earlier.id}"
        done_before = await _succeeded(batch, account, earlier.spec["output_dataset"])
    if len(orjson.dumps(body.inference_parameters)) > PARAMETERS_MAX \
            or len(body.precision or "") > 64:
        raise GatewayError(400, f"inferenceParameters are larger than {PARAMETERS_MAX} "
                                "bytes")
    job = Job(job_id, account.id, {
        "shape": "fireworks", "model": body.model, "input_file": source.id,
        "output_dataset": output, "parameters": request_fields(body.inference_parameters),
        "inference_parameters": body.inference_parameters,
        "display_name": body.display_name, "precision": body.precision or
        "PRECISION_UNSPECIFIED", "continued_from": continued,
        "expires_at": int(time.time()) + WINDOW})
    return fireworks_job(await batch.engine.create(job, source, done_before))


async def _succeeded(batch: BatchParts, account: Account,
                     dataset: str) -> dict[str, dict[str, Any]]:
    """custom_id -> the response of each line an earlier job's output holds."""
    stored = await batch.files.find(account.id, dataset)
    found: dict[str, dict[str, Any]] = {}
    if stored is None:
        return found
    for raw in (await asyncio.to_thread(batch.files.read, stored)).splitlines():
        try:  # (the dataset may have been replaced by the account since)
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(line, dict) and isinstance(line.get("custom_id"), str) \
                and isinstance(line.get("response"), dict):
            found[line["custom_id"]] = line["response"]
    return found


async def _job(request: Request, account_id: str, job_id: str) -> tuple[Job, BatchParts]:
    account, batch = _account(request, account_id)
    job = await batch.engine.jobs.find(account.id, job_id)
    if job is None or job.spec["shape"] != "fireworks":
        raise GatewayError(404, f"No such batch inference job: {job_id}")
    return job, batch


@router.get("/accounts/{account_id}/batchInferenceJobs/{job_id}")
async def get_job(request: Request, account_id: str, job_id: str) -> dict[str, Any]:
    job, _ = await _job(request, account_id, job_id)
    return fireworks_job(job)


@router.get("/accounts/{account_id}/batchInferenceJobs")
async def list_jobs(request: Request, account_id: str) -> dict[str, Any]:
    account, batch = _account(request, account_id)
    jobs = [j for j in await batch.engine.jobs.listed(account.id, LISTED)
            if j.spec["shape"] == "fireworks"]
    return {"batchInferenceJobs": [fireworks_job(j) for j in jobs], "nextPageToken": "",
            "totalSize": len(jobs)}


@router.delete("/accounts/{account_id}/batchInferenceJobs/{job_id}")
async def delete_job(request: Request, account_id: str, job_id: str) -> dict[str, Any]:
    """A running job is cancelled first (what finished stays in its output dataset)."""
    job, batch = await _job(request, account_id, job_id)
    if job.status not in FINAL:
        job = await batch.engine.cancel(job)
        if job.status not in FINAL:
            raise GatewayError(409, "The job is being cancelled; delete it once it is "
                                    "JOB_STATE_CANCELLED")
    await batch.engine.jobs.forget(job)
    return {}
