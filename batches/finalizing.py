"""Finalizing a batch: its output and error files, written from the rows in a worker.

Lines are read from the database a page at a time (keyset on ``custom_id``, the batch's unique
index) and written to a temporary file on disk, which the storage then takes: memory stays flat
however many lines there are. Idempotent: it only acts once every line has ended, and when two
finalizers race, the status move decides the winner and the loser deletes what it wrote.

Output lines (OpenAI's format): ``{"id": "batch_req_…", "custom_id", "response": {"status_code",
"request_id", "body"}, "error": null}``: the body a ``chat.completion`` for a line that succeeded
(output file), OpenAI's error object for one that failed (error file, with the status
``/v1/chat/completions`` answers for it). A line that expired or was cancelled before it ran has
``"response": null`` and ``"error": {"code": "batch_expired" | "batch_cancelled", "message"}``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from typing import IO, Any

from django.core.files import File as DjangoFile
from django.db import transaction

from batches.models import Batch, BatchStatus, File, FilePurpose, files_storage
from jobs.models import ACTIVE_STATES, JobState
from openai_api import relay, translate

log = logging.getLogger(__name__)

PAGE = 1000
FIELDS = (
    "id",
    "custom_id",
    "state",
    "model",
    "requested_backend",
    "backend_name",
    "output",
    "tool_calls",
    "finish_reason",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "finished_at",
)
NOT_RUN = {
    JobState.EXPIRED: ("batch_expired", "This request could not be executed before the completion window expired."),
    JobState.CANCELED: ("batch_cancelled", "This request was cancelled with its batch before it ran."),
}


def finalize(batch_id: str) -> None:
    """The ``finalize`` task: when every line has ended, write the files and end the batch."""
    batch = Batch.objects.filter(pk=batch_id).first()
    if batch is None or batch.status not in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.FINALIZING):
        return
    if batch.status == BatchStatus.IN_PROGRESS and batch.lines_created < batch.total:
        return  # still being created
    if batch.jobs.filter(state__in=ACTIVE_STATES).exists():
        return  # not done: the last line's end enqueues this again
    lost = batch.status == BatchStatus.IN_PROGRESS and not batch.transition(BatchStatus.FINALIZING)
    if lost and batch.status != BatchStatus.CANCELLING:  # a cancel won: finish as cancelled; else another did
        return
    written = write_files(batch)
    target = _final_status(batch, written)
    fields = {
        "output_file": written["output"],
        "error_file": written["error"],
        "completed": written["completed"],
        "failed": written["failed"],
        "prompt_tokens": written["prompt_tokens"],
        "completion_tokens": written["completion_tokens"],
    }
    with transaction.atomic():
        won = batch.transition(target, **fields)
    if not won:
        for file in (written["output"], written["error"]):
            if file is not None:
                delete_file(file)


def _final_status(batch: Batch, written: dict[str, Any]) -> str:
    if batch.status == BatchStatus.CANCELLING:
        return BatchStatus.CANCELLED
    return BatchStatus.EXPIRED if written["expired"] else BatchStatus.COMPLETED


def output_line(row: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(succeeded, the line) for one ended job's values."""
    job_id = str(row["id"])
    line: dict[str, Any] = {"id": "batch_req_" + job_id.replace("-", ""), "custom_id": row["custom_id"]}
    if row["state"] == JobState.SUCCEEDED:
        doc = {
            "id": job_id,
            "output": row["output"],
            "tool_calls": row["tool_calls"],
            "finish_reason": row["finish_reason"],
            "model": row["model"],
            "backend": row["backend_name"],
            "usage": {"prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"]},
        }
        created = int(row["finished_at"].timestamp()) if row["finished_at"] else 0
        # The model that answered: the pinned backend, else the job's model, else the backend routing chose.
        model = row["requested_backend"] or row["model"] or row["backend_name"]
        body = translate.completion(doc, model=model, created=created)
        response = {"status_code": 200, "request_id": "req_" + job_id.replace("-", ""), "body": body}
        return True, {**line, "response": response, "error": None}
    if row["state"] in NOT_RUN:
        code, message = NOT_RUN[row["state"]]
        return False, {**line, "response": None, "error": {"code": code, "message": message}}
    status, body, _ = relay.failure({"state": row["state"], "error": row["error"]}, job_id)
    response = {"status_code": status, "request_id": "req_" + job_id.replace("-", ""), "body": body}
    return False, {**line, "response": response, "error": None}


def write_files(batch: Batch) -> dict[str, Any]:
    """Write the output and error files from the rows; the File rows (None for an empty one) and the counts."""
    out = {"completed": 0, "failed": 0, "expired": 0, "prompt_tokens": 0, "completion_tokens": 0}
    with tempfile.TemporaryFile() as ok_tmp, tempfile.TemporaryFile() as err_tmp:
        after = None
        while True:
            page = batch.jobs.order_by("custom_id")
            if after is not None:
                page = page.filter(custom_id__gt=after)
            rows = list(page.values(*FIELDS)[:PAGE])
            if not rows:
                break
            after = rows[-1]["custom_id"]
            for row in rows:
                succeeded, line = output_line(row)
                (ok_tmp if succeeded else err_tmp).write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
                out["completed" if succeeded else "failed"] += 1
                out["expired"] += row["state"] == JobState.EXPIRED
                out["prompt_tokens"] += row["prompt_tokens"] or 0
                out["completion_tokens"] += row["completion_tokens"] or 0
        out["output"] = save_file(batch, ok_tmp, f"{batch.pk}_output.jsonl") if out["completed"] else None
        out["error"] = save_file(batch, err_tmp, f"{batch.pk}_error.jsonl") if out["failed"] else None
    return out


def save_file(batch: Batch, tmp: IO[bytes], filename: str) -> File:
    """Store ``tmp``'s bytes as a ``batch_output`` file of the batch's owner."""
    size = tmp.tell()
    tmp.seek(0)
    file = File(purpose=FilePurpose.BATCH_OUTPUT, filename=filename, bytes=size)
    file.created_by_id, file.tenant_id = batch.created_by_id, batch.tenant_id
    file.blob = files_storage().save(f"{file.id}.jsonl", DjangoFile(tmp, name=filename))
    file.save(force_insert=True)
    return file


def delete_file(file: File) -> None:
    """The row and the bytes (a missing blob is not an error: deleting twice is deleting)."""
    try:
        files_storage().delete(file.blob)
    except OSError as exc:
        log.warning("file contents not deleted", extra={"file_id": file.pk, "error": str(exc)})
    File.objects.filter(pk=file.pk).delete()
