"""Submitting a job: idempotency, routing, the row, and the enqueue after commit.

The hot path costs two Redis round trips (claim + registry version in one pipeline;
enqueue + key + status mirror in another) and one short write transaction.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from redis.exceptions import RedisError

from jobs import idempotency, queueing, status_mirror
from jobs.models import Job, JobState
from orchestrator_site import metrics, tracing
from orchestrator_site.redis import RoundTrip, redis_client
from routing import registry
from routing.models import Backend
from routing.services import Decision, route
from routing.strategies import JobFacts
from tenants import admission
from tenants.models import Tenant

log = logging.getLogger(__name__)


@dataclass
class Submission:
    job: Job | None
    document: dict[str, Any]
    created: bool


def estimate_tokens(text: str) -> int:
    """A cheap upper-ish estimate (~4 characters per token) used only for context-size routing."""
    return math.ceil(len(text) / 4)


def job_facts(data: dict[str, Any], key: str = "", allowed_backends: Sequence[str] = ()) -> JobFacts:
    """What routing may know of a request; ``key`` (the job id) makes seeded strategies replayable;
    ``allowed_backends`` (the tenant's; empty: all) bounds what it may pick."""
    text = data.get("prompt") or "".join(str(m.get("content", "")) for m in data.get("messages") or [])
    return JobFacts(
        priority=data.get("priority", "normal"),
        has_images=bool(data.get("images")),
        requires_multimodal=bool(data.get("requires_multimodal")),
        model=data.get("model") or "",
        pinned_backend=data.get("backend") or "",
        prompt_tokens=estimate_tokens(text),
        max_tokens=data.get("max_tokens") or 0,
        allowed_backends=tuple(allowed_backends),
        key=key,
    )


def submit(
    data: dict[str, Any], *, user, body: Any, idempotency_key: str | None, tenant: Tenant | None = None
) -> Submission:
    """Create (or, for a repeated Idempotency-Key, find) the job for a validated request, for ``tenant``.

    A tenant's limits are checked first: the 403s with no I/O, the counted limits (429) by a script
    in the first round trip that also claims the Idempotency-Key (``tenants.admission``); any
    refusal, or any failure after admission, leaves no claim and no reservation behind.
    """
    admission.check_request(tenant, data)
    client = redis_client()
    fp = idempotency.fingerprint(body) if idempotency_key else ""
    rkey = idempotency.redis_key(user.pk, idempotency_key) if idempotency_key else ""
    job_id = uuid.uuid4()
    ticket = admission.ticket(tenant, data, str(job_id), idem_key=rkey, fingerprint=fp)

    # A claim can vanish under us when its owner fails, and a day's counter can be missing: then again.
    for _ in range(4):
        if ticket is not None:
            rt = RoundTrip(client)
            ticket.queue_on(rt)
            version = rt.command("get", registry.VERSION_KEY)
            rt.execute()
            token, state = version.value, ticket.outcome()  # raises AdmissionRefused
            if state.startswith("miss:"):
                ticket.rebuild(state.removeprefix("miss:"))
                continue
            claimed = state == "ok"
        else:
            pipe = client.pipeline(transaction=False)
            if idempotency_key:
                pipe.set(rkey, fp, nx=True, ex=idempotency.PENDING_TTL_S)
            pipe.get(registry.VERSION_KEY)
            results = pipe.execute()
            token, claimed = results[-1], not idempotency_key or bool(results[0])
        if claimed:
            break
        existing_id = idempotency.wait_for_job_id(client, rkey, fp)
        if existing_id:
            return replay(existing_id)
    else:
        raise idempotency.KeyInProgress("A request with this Idempotency-Key keeps failing; retry later.")

    try:
        snap = registry.snapshot(registry.ensure_token(token))
        admission.check_model(tenant, data.get("model") or "", snap)
        allowed = tenant.allowed_backends if tenant is not None else ()
        decision = route(job_facts(data, key=str(job_id), allowed_backends=allowed), snap)
        job = _build(job_id, data, user, decision, snap.backends[decision.backend], idempotency_key, fp)
        _for_tenant(job, data, tenant, ticket)
        doc = job.status_document()
        try:
            with transaction.atomic():
                job.save(force_insert=True)
                if job.image_count:
                    job.attach_images(data["images"])
                transaction.on_commit(lambda: _after_commit(job, doc, rkey, fp, ticket))
        except IntegrityError:
            if not idempotency_key:
                raise
            existing = _existing_for_key(user, idempotency_key, fp, rkey)
            if ticket is not None:  # no job of ours: give the admission back (the key is settled above)
                ticket.release(keep_idempotency=True)
            if existing is None:
                return submit(data, user=user, body=body, idempotency_key=idempotency_key, tenant=tenant)
            return existing
    except BaseException:
        if ticket is not None:
            ticket.release()  # the claim and the reservations, in one round trip
        elif idempotency_key:
            client.delete(rkey)  # release our claim so a retry is not told "in progress"
        raise
    return Submission(job, doc, created=True)


def build(
    data: dict[str, Any], *, user, decision: Decision, backend: Backend, tenant: Tenant | None, job_id: uuid.UUID
) -> Job:
    """A new ``queued`` job for a checked and routed request, not saved: for creators of many jobs at
    once (a batch's lines: one ``bulk_create``, then ``enqueue_created`` after commit)."""
    job = _build(job_id, data, user, decision, backend, None, "")
    _for_tenant(job, data, tenant, None)
    return job


def enqueue_created(jobs: Sequence[Job], pipe: Any) -> None:
    """Queue the pushes of committed ``jobs`` on ``pipe`` (the caller executes it: one round trip).

    No status mirror is written: a status read finds the row and mirrors it then, and a job that
    moves is mirrored by its move, so thousands of waiting jobs cost Redis nothing but their place.
    """
    meta = tracing.inject()
    for job in jobs:
        queueing.enqueue(job, pipeline=pipe, meta=meta)
        metrics.record_submission(pipe, priority=job.priority, policy=job.policy_name, backend=job.backend_name)


def _for_tenant(job: Job, data: dict[str, Any], tenant: Tenant | None, ticket: admission.Ticket | None) -> None:
    """The job's tenant (cached on the instance: the enqueue reads its weight), reservation and queue timeout."""
    queue_timeout_s = data.get("queue_timeout_s") or (tenant.queue_timeout_s if tenant is not None else None)
    if tenant is not None:
        job.tenant = tenant
        job.tenant_name = tenant.name
    if ticket is not None and ticket.tokens:
        job.reserved_tokens = ticket.tokens
    if queue_timeout_s:
        job.queue_timeout_s = queue_timeout_s
        job.expires_at = job.created_at + timedelta(seconds=queue_timeout_s)


def _build(
    job_id: uuid.UUID,
    data: dict[str, Any],
    user,
    decision: Decision,
    backend: Backend,
    idempotency_key: str | None,
    fp: str,
) -> Job:
    now = timezone.now()
    job = Job(
        id=job_id,
        state=JobState.QUEUED,
        priority=data.get("priority", "normal"),
        prompt=data.get("prompt") or "",
        messages=data.get("messages") or [],
        image_count=len(data.get("images") or ()),
        requires_multimodal=bool(data.get("requires_multimodal")),
        stream=bool(data.get("stream")),
        model=data.get("model") or backend.model,
        requested_backend=data.get("backend") or "",
        max_tokens=data.get("max_tokens"),
        temperature=data.get("temperature"),
        params=data.get("params") or {},
        metadata=data.get("metadata") or {},
        timeout_s=data.get("timeout_s") or min(backend.timeout_s, settings.JOB_LIMITS["timeout_s"]),
        created_by=user,
        idempotency_key=idempotency_key or None,
        request_fingerprint=fp,
        idempotency_expires_at=now + timedelta(seconds=idempotency.ttl_s()) if idempotency_key else None,
        backend=backend,
        backend_name=backend.name,
        policy_name=decision.policy,
        policy_version=decision.policy_version,
        routing=decision.as_json(),
        created_at=now,
        enqueued_at=now,
    )
    job.queue = backend.queue_for(job.priority)
    job.rq_job_id = str(job.pk)
    ids = tracing.current_ids()
    job.trace_id = ids[0] if ids else ""
    return job


def _after_commit(job: Job, doc: dict[str, Any], rkey: str, fp: str, ticket: admission.Ticket | None = None) -> None:
    """One round trip: the RQ job, the idempotency answer and the status mirror."""
    pipe = redis_client().pipeline()
    queueing.enqueue(job, pipeline=pipe, meta=tracing.inject())  # the worker's span joins this request's trace
    if ticket is not None:
        ticket.after_commit(pipe)  # queued now: counted by its queue, no longer as just admitted
    metrics.record_submission(pipe, priority=job.priority, policy=job.policy_name, backend=job.backend_name)
    if rkey:
        pipe.set(rkey, f"{fp}:{job.pk}", ex=idempotency.ttl_s())
    status_mirror.write(job, doc, pipeline=pipe)
    try:
        pipe.execute()
    except RedisError as exc:
        # The row is committed and stays `queued`: the reconciler enqueues it from the
        # database once Redis answers again. The job is accepted, not lost.
        log.error("enqueue failed; job left for the reconciler", extra={"job_id": str(job.pk), "error": str(exc)})
        Job.objects.filter(pk=job.pk, state=JobState.QUEUED).update(enqueued_at=None)


def _existing_for_key(user, idempotency_key: str, fp: str, rkey: str) -> Submission | None:
    """Redis had no claim but the database has the key: the database decides.

    None means the old key had expired and was retired: the caller submits afresh.
    """
    existing = Job.objects.filter(created_by=user, idempotency_key=idempotency_key).first()
    if existing is None:  # the conflicting row vanished between insert and lookup
        raise idempotency.KeyInProgress("A request with this Idempotency-Key is being processed; retry shortly.")
    if existing.idempotency_expires_at and existing.idempotency_expires_at < timezone.now():
        # An expired key may be reused: retire it from the old job and submit afresh.
        Job.objects.filter(pk=existing.pk).update(idempotency_key=None)
        redis_client().delete(rkey)
        return None
    if existing.request_fingerprint != fp:
        redis_client().delete(rkey)
        raise idempotency.KeyReusedWithDifferentBody(
            "This Idempotency-Key was already used with a different request body."
        )
    remaining = max(1, int((existing.idempotency_expires_at - timezone.now()).total_seconds()))
    redis_client().set(rkey, f"{fp}:{existing.pk}", ex=remaining)
    return Submission(existing, existing.status_document(), created=False)


def replay(job_id: str) -> Submission:
    doc = status_mirror.read(job_id)
    if doc is not None:
        return Submission(None, doc, created=False)
    job = Job.objects.get(pk=job_id)
    return Submission(job, job.status_document(), created=False)
