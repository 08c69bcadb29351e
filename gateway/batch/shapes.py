"""A job and a file as each API shows them, pure: OpenAI's batch object, Fireworks' batch
inference job and dataset."""

from __future__ import annotations

import time
from typing import Any

from gateway.batch.files import StoredFile
from gateway.batch.jobs import Job

# The engine's statuses as OpenAI names them (an expiring job still runs its last lines).
OPENAI_STATUS = {"in_progress": "in_progress", "expiring": "in_progress",
                 "finalizing": "finalizing", "completed": "completed", "failed": "failed",
                 "cancelling": "cancelling", "cancelled": "cancelled", "expired": "expired"}
FIREWORKS_STATE = {"in_progress": "JOB_STATE_RUNNING", "expiring": "JOB_STATE_RUNNING",
                   "finalizing": "JOB_STATE_WRITING_RESULTS",
                   "completed": "JOB_STATE_COMPLETED", "failed": "JOB_STATE_FAILED",
                   "cancelling": "JOB_STATE_CANCELLING", "cancelled": "JOB_STATE_CANCELLED",
                   "expired": "JOB_STATE_EXPIRED"}


def openai_batch(job: Job) -> dict[str, Any]:
    at = job.times.get
    errors = None if not job.errors else {
        "object": "list", "data": [{"code": "invalid_file", "message": message,
                                    "param": "input_file_id", "line": None}
                                   for message in job.errors]}
    return {
        "id": job.id, "object": "batch", "endpoint": job.spec["endpoint"],
        "errors": errors, "input_file_id": job.spec["input_file"],
        "completion_window": "24h", "status": OPENAI_STATUS[job.status],
        "output_file_id": job.output_file, "error_file_id": job.error_file,
        "created_at": at("created"), "in_progress_at": at("in_progress"),
        "expires_at": job.spec["expires_at"], "finalizing_at": at("finalizing"),
        "completed_at": at("completed"), "failed_at": at("failed"),
        "expired_at": at("expired"), "cancelling_at": at("cancelling"),
        "cancelled_at": at("cancelled"),
        "request_counts": {"total": job.total, "completed": job.completed,
                           "failed": job.failed},
        "metadata": job.spec.get("metadata"),
        "usage": {"input_tokens": job.prompt_tokens,
                  "input_tokens_details": {"cached_tokens": job.cached_tokens},
                  "output_tokens": job.completion_tokens,
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": job.prompt_tokens + job.completion_tokens}}


def rfc3339(seconds: int | None) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                       time.gmtime(seconds))


def fireworks_job(job: Job) -> dict[str, Any]:
    spec, account = job.spec, job.account
    processed = job.completed + job.failed
    updated = max(job.times.values()) if job.times else None
    return {
        "name": f"accounts/{account}/batchInferenceJobs/{job.id}",
        "displayName": spec.get("display_name", ""),
        "createTime": rfc3339(job.times.get("created")), "updateTime": rfc3339(updated),
        "createdBy": account, "state": FIREWORKS_STATE[job.status],
        "status": {"code": "INVALID_ARGUMENT", "message": "; ".join(job.errors)}
        if job.errors else {"code": "OK", "message": ""},
        "model": spec["model"],
        "inputDatasetId": f"accounts/{account}/datasets/{spec['input_file']}",
        "outputDatasetId": f"accounts/{account}/datasets/{spec['output_dataset']}",
        "inferenceParameters": spec.get("inference_parameters") or {},
        "precision": spec.get("precision", "PRECISION_UNSPECIFIED"),
        "continuedFromJobName": spec.get("continued_from", ""),
        "jobProgress": {
            "percent": 100 * processed // job.total if job.total else 0, "epoch": 0,
            "totalInputRequests": job.total, "totalProcessedRequests": processed,
            "successfullyProcessedRequests": job.completed, "failedRequests": job.failed,
            "outputRows": processed, "inputTokens": job.prompt_tokens,
            "outputTokens": job.completion_tokens,
            "cachedInputTokenCount": job.cached_tokens}}


def fireworks_dataset(stored: StoredFile) -> dict[str, Any]:
    return {"name": f"accounts/{stored.account}/datasets/{stored.id}",
            "displayName": stored.display_name or stored.id,
            "createTime": rfc3339(stored.created_at),
            "state": "READY" if stored.bytes else "UPLOADING",
            "exampleCount": str(stored.lines), "format": "FORMAT_UNSPECIFIED",
            "userUploaded": {}}
