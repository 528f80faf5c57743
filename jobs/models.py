"""The Job row (the system of record) and its state machine.

Every state change goes through ``Job.transition`` (below), a compare-and-set
``UPDATE ... WHERE state IN (allowed)``: when two processes race (a duplicate RQ
delivery, a cancel during a run) exactly one wins and the loser sees ``False``.
After a change commits, the status document is re-mirrored into Redis.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connections, models, router, transaction
from django.db.models import F, Q, prefetch_related_objects
from django.db.models.expressions import Combinable
from django.utils import timezone
from redis.exceptions import RedisError

from jobs import cancellation, fair_queue, hooks, status_mirror
from jobs.images import ImageBlob, to_base64
from orchestrator_site.redis import redis_client

log = logging.getLogger(__name__)


class JobState(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"  # not started within its queue timeout: no backend call, no attempt


ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING})
TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED})
TEXT_MAX = 10_000  # an error message kept on a row
# What a success writes: a backend result's own fields, then what the call cost.
RESULT_FIELDS = ("output", "finish_reason", "prompt_tokens", "completion_tokens", "latency_ms")
SUCCESS_FIELDS = (*RESULT_FIELDS, "cost")


def storable(text: str, limit: int | None = None) -> str:
    """``text`` as every database can keep it, cut to ``limit`` characters.

    PostgreSQL's text cannot hold NUL, and a backend can send one (a byte-level tokenizer decodes
    any byte; an API relays what its model wrote): it becomes U+FFFD, as an invalid byte would.
    """
    if limit is not None:
        text = text[:limit]
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _leave_queues(jobs: Sequence[Job]) -> None:
    """Waiting jobs that will not run give up their places (after commit). If Redis does not answer,
    a worker that takes one later finds it not claimable and drops it."""
    try:
        pipe = redis_client().pipeline(transaction=False)
        for job in jobs:
            fair_queue.remove(
                job.queue, fair_queue.tenant_key(job.tenant_id), job.rq_job_id or str(job.pk), pipeline=pipe
            )
        pipe.execute()
    except RedisError as exc:
        log.warning("jobs not taken off their queues", extra={"jobs": len(jobs), "error": str(exc)})


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _api_datetime(value: datetime | None) -> str | None:
    """ISO 8601 in the current time zone with UTC as ``Z``: DRF's format, which the API has always answered."""
    if not value:
        return None
    if settings.USE_TZ:
        zone = timezone.get_current_timezone()
        value = value.astimezone(zone) if timezone.is_aware(value) else timezone.make_aware(value, zone)
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


# target state -> states it may be entered from. The one table of legal moves.
TRANSITIONS: dict[str, frozenset[str]] = {
    # a re-queue, or an operator's retry
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED}),
    JobState.RUNNING: frozenset({JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset({JobState.RUNNING}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.RUNNING}),
    JobState.CANCELED: frozenset({JobState.QUEUED, JobState.RUNNING}),
    JobState.EXPIRED: frozenset({JobState.QUEUED}),
}


class Priority(models.TextChoices):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class AttemptOutcome(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    ERRORED = "errored"  # the adapter crashed (unexpected exception); traceback saved
    INTERRUPTED = "interrupted"  # its worker stopped (shutdown, crash) before it ended; the job ran again


class Job(models.Model):
    """One inference request, from submission to its single final state."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.QUEUED)
    priority = models.CharField(max_length=8, choices=Priority.choices, default=Priority.NORMAL)
    version = models.PositiveIntegerField(default=1, help_text="Bumped on every state change; orders cache writes.")

    # The request, as submitted.
    prompt = models.TextField(blank=True)
    messages = models.JSONField(default=list, blank=True)
    # The images live in JobImage (content-addressed, linked in order): counted here so a text job's
    # worker never queries for them and list pages never load them.
    image_count = models.PositiveSmallIntegerField(default=0)
    requires_multimodal = models.BooleanField(default=False)
    model = models.CharField(max_length=200, blank=True)
    requested_backend = models.CharField(max_length=64, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    temperature = models.FloatField(null=True, blank=True)
    params = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    # Publish the output as it comes (jobs/deltas.py): only for a client that reads it, it costs Redis.
    stream = models.BooleanField(default=False)
    timeout_s = models.PositiveIntegerField()
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    tenant = models.ForeignKey("tenants.Tenant", null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    # The tenant's name at submission (the status document and the metrics read it without a query).
    tenant_name = models.CharField(max_length=64, blank=True)
    # Tokens admission reserved against the tenant's tokens_per_day (None: none); settled when the job ends.
    reserved_tokens = models.PositiveIntegerField(null=True, blank=True)
    # A line of an OpenAI batch (the batches app): its batch and the line's custom_id.
    batch = models.ForeignKey(
        "batches.Batch", null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs", editable=False
    )
    custom_id = models.CharField(max_length=512, blank=True, editable=False)
    # Not started by then, the job ends `expired` (None: it may wait for ever).
    queue_timeout_s = models.PositiveIntegerField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    # Idempotency: Redis answers fast; this unique key is the backstop when Redis lost it.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True)
    idempotency_expires_at = models.DateTimeField(null=True, blank=True)

    # Routing decision.
    backend = models.ForeignKey("routing.Backend", null=True, blank=True, on_delete=models.SET_NULL)
    backend_name = models.CharField(max_length=64, blank=True, help_text="Kept when the backend is deleted.")
    policy_name = models.CharField(max_length=64, blank=True)
    policy_version = models.PositiveIntegerField(null=True, blank=True)
    routing = models.JSONField(default=dict, blank=True, help_text="Candidates, scores and reasons.")
    # The submitting request's trace (hex), when tracing is on: the timeline links the job to its trace.
    trace_id = models.CharField(max_length=32, blank=True, default="")
    queue = models.CharField(max_length=80, blank=True)
    rq_job_id = models.CharField(max_length=64, blank=True)

    # Outcome.
    output = models.TextField(blank=True)
    # The tools the model called, in OpenAI's message shape (finish_reason "tool_calls").
    tool_calls = models.JSONField(default=list, blank=True)
    finish_reason = models.CharField(max_length=32, blank=True)
    error = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    cost = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True)
    latency_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Backend call time of the last attempt.")
    attempt_count = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["state", "created_at"], name="job_state_created"),
            models.Index(fields=["backend_name", "created_at"], name="job_backend_created"),
            models.Index(fields=["priority", "created_at"], name="job_priority_created"),
            # The live dashboard's "jobs per backend under the active policy, last hour": an index-only range scan.
            models.Index(fields=["created_at", "policy_name", "backend_name"], name="job_created_policy_backend"),
            # The reconciler's "queued jobs past their queue timeout": only waiting jobs with a timeout are in it.
            models.Index(
                fields=["expires_at"],
                condition=Q(state="queued", expires_at__isnull=False),
                name="job_queued_expiry",
            ),
            models.Index(fields=["tenant", "created_at"], name="job_tenant_created"),
            # Batch lines held back by their batch's window (batches.window), in the order it pushes them:
            # only held lines are in it, so a refill or a held line's queue position reads a few rows.
            models.Index(
                fields=["batch", "custom_id"],
                condition=Q(state="queued", enqueued_at__isnull=True, batch__isnull=False),
                name="job_batch_held",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["created_by", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="unique_idempotency_key_per_user",
            ),
            # One job per custom_id in a batch; its index serves every "lines of this batch" query.
            models.UniqueConstraint(
                fields=["batch", "custom_id"], condition=Q(batch__isnull=False), name="unique_custom_id_per_batch"
            ),
        ]

    # The attempts as this process wrote them since it claimed a fresh job (None: unknown, read the
    # table). The worker's status documents and metrics read them instead of querying per change.
    _known_attempts: list[JobAttempt] | None = None

    def __str__(self) -> str:
        return f"{self.id} ({self.state})"

    def attempt_rows(self) -> list[JobAttempt]:
        """This job's attempts in order: from memory on the worker's path, else from the table."""
        if self._known_attempts is not None:
            return list(self._known_attempts)
        return list(self.attempts.all())

    def update_current_attempt(self, **fields: Any) -> None:
        """Write ``fields`` on the open attempt (number ``attempt_count``, still running), in memory too."""
        JobAttempt.objects.filter(job=self, number=self.attempt_count, outcome=AttemptOutcome.RUNNING).update(**fields)
        for attempt in self._known_attempts or ():
            if attempt.number == self.attempt_count and attempt.outcome == AttemptOutcome.RUNNING:
                for name, value in fields.items():
                    setattr(attempt, name, value)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def usage(self) -> dict[str, int | None]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    def image_payloads(self) -> list[str]:
        """The job's images as submitted (plain base64), in order: the one way to read them."""
        if not self.image_count:
            return []
        rows = JobImageLink.objects.filter(job=self).order_by("position").values_list("image__data", flat=True)
        return [to_base64(data) for data in rows]

    def attach_images(self, payloads: Sequence[str]) -> None:
        """Store ``payloads`` (validated base64) and link them to this saved job, in order.

        Call inside the transaction that inserts the job. Each distinct image is stored once: the
        upsert locks an existing row until commit, so a purge cannot delete it under this link.
        One image is decoded and written at a time, so a request's images are never all held
        decoded at once.
        """
        hashes: list[str] = []
        for payload in payloads:
            blob = ImageBlob.from_base64(payload)
            if blob.sha256 not in hashes:
                JobImage.objects.bulk_create(
                    [JobImage(sha256=blob.sha256, media_type=blob.media_type, size=len(blob.data), data=blob.data)],
                    update_conflicts=True,
                    unique_fields=["sha256"],
                    update_fields=["media_type"],
                )
            hashes.append(blob.sha256)
            del blob
        JobImageLink.objects.bulk_create(JobImageLink(job=self, image_id=h, position=i) for i, h in enumerate(hashes))

    def chat_messages(self) -> list[dict[str, Any]]:
        """The request as a chat: ``messages`` as given, or the prompt as one user message."""
        return list(self.messages) if self.messages else [{"role": "user", "content": self.prompt}]

    def status_document(self) -> dict[str, Any]:
        """What ``GET /jobs/<id>`` answers and the Redis status mirror holds, JSON-ready, in the API's order.

        Built here, beside the state machine that re-mirrors it after every change (the API's serializer
        only describes it for the schema). On that hot path it reads the instance alone: the attempts
        come from memory on the worker's path, so it adds no query there.
        """
        pk, attempts = self.pk, self.attempt_count
        return {
            "id": _str(pk),
            "state": _str(self.state),
            "priority": _str(self.priority),
            "backend": _str(self.backend_name),
            "policy": _str(self.policy_name),
            "policy_version": _int(self.policy_version),
            "model": _str(self.model),
            "queue": _str(self.queue),
            "attempts": _int(attempts),
            "created_at": _api_datetime(self.created_at),
            "enqueued_at": _api_datetime(self.enqueued_at),
            "started_at": _api_datetime(self.started_at),
            "finished_at": _api_datetime(self.finished_at),
            "error": _str(self.error),
            "usage": self.usage,
            "cost": float(self.cost) if self.cost is not None else None,
            "latency_ms": _int(self.latency_ms),
            "finish_reason": _str(self.finish_reason),
            "output": _str(self.output),
            "tool_calls": self.tool_calls or [],
            "metadata": self.metadata,
            "attempt_log": [
                {
                    "number": a.number,
                    "backend": a.backend_name,
                    "worker": a.worker,
                    "outcome": a.outcome,
                    "started_at": a.started_at.isoformat() if a.started_at else None,
                    "finished_at": a.finished_at.isoformat() if a.finished_at else None,
                    "latency_ms": a.latency_ms,
                    "error": a.error,
                }
                for a in (self.attempt_rows() if attempts else ())
            ],
            "links": {"self": f"/jobs/{pk}", "result": f"/jobs/{pk}/result", "cancel": f"/jobs/{pk}/cancel"},
            "tenant": self.tenant_name or None,
            "queue_timeout_s": _int(self.queue_timeout_s),
            "expires_at": _api_datetime(self.expires_at),
            "owner_id": _int(self.created_by_id),
            "tenant_id": _int(self.tenant_id),
        }

    # --- state machine -------------------------------------------------------------
    def transition(self, target: str, *, fence: bool = False, **fields: Any) -> bool:
        """Move to ``target`` if the current DB state allows it; returns whether this call won.

        ``fields`` are written in the same UPDATE, and the Redis status mirror is rewritten after
        commit. ``fence`` also requires the version this instance holds to be the current one:
        nobody moved the job since this process last did (a worker that lost its job, re-queued
        after a shutdown or a lost heartbeat and claimed again elsewhere, cannot end the new run).
        A fenced move then knows the row exactly and updates the instance in memory (the worker's
        hot path: no re-read); an unfenced one (an operator's cancel or retry) re-reads the row.
        """
        allowed = TRANSITIONS[target]
        now = timezone.now()
        if fence:
            assert not any(isinstance(v, Combinable) for v in fields.values()), "fenced fields are plain values"
            updated = Job.objects.filter(pk=self.pk, state__in=allowed, version=self.version).update(
                state=target, version=self.version + 1, updated_at=now, **fields
            )
        else:
            updated = Job.objects.filter(pk=self.pk, state__in=allowed).update(
                state=target, version=F("version") + 1, updated_at=now, **fields
            )
        if not updated:
            if fence:
                self.refresh_from_db(fields=["state", "version", "attempt_count"])
            return False
        if fence:
            self.state, self.version, self.updated_at = target, self.version + 1, now
            for name, value in fields.items():
                setattr(self, name, value)
        else:
            self.refresh_from_db()
            self._known_attempts = None
        job = self
        transaction.on_commit(lambda: status_mirror.publish(job))
        if target in TERMINAL_STATES:  # this call won the move: the job's books close once
            transaction.on_commit(lambda: hooks.ended([job]))
        return True

    def mark_running(self, worker: str) -> bool:
        """queued -> running for this one delivery: ``claim`` of one row (one move, written once);
        False when another delivery got there first or the job was canceled. This instance then
        holds the row it won, so its version is the fence for the job's later moves."""
        won = type(self).claim([self.pk], worker)
        if not won:
            self.refresh_from_db(fields=["state", "version", "attempt_count"])
            return False
        row = won[0]
        for field in self._meta.concrete_fields:
            setattr(self, field.attname, getattr(row, field.attname))
        self._known_attempts = row._known_attempts
        return True

    @classmethod
    def claim(cls, ids: Collection[str], worker: str) -> list[Job]:
        """queued -> running for many deliveries at once (a worker's batch); returns the rows it won.

        The one place a job starts running (``mark_running`` is its one-row case), in three
        statements: one compare-and-set ``UPDATE ... RETURNING`` over the claimable rows (each
        instance returned is exactly the row it committed, so its version is the fence for its
        later moves), one read of their backends, one INSERT of the attempts. An id another
        delivery won, or that was canceled or deleted meanwhile, or is listed twice, is not
        returned twice.
        """
        if not ids:
            return []
        now = timezone.now()
        meta = cls._meta
        conn = connections[router.db_for_write(cls)]
        q = conn.ops.quote_name
        col = {name: q(meta.get_field(name).column) for name in ("state", "version", "attempt_count")}
        expires = q(meta.get_field("expires_at").column)
        allowed = sorted(TRANSITIONS[JobState.RUNNING])
        pks = list(dict.fromkeys(meta.pk.get_db_prep_value(i, conn) for i in ids))
        sql = (
            f"UPDATE {q(meta.db_table)} SET {col['state']} = %s, {col['version']} = {col['version']} + 1,"
            f" {col['attempt_count']} = {col['attempt_count']} + 1, {q(meta.get_field('worker').column)} = %s,"
            f" {q(meta.get_field('started_at').column)} = %s, {q(meta.get_field('updated_at').column)} = %s"
            f" WHERE {q(meta.pk.column)} IN ({', '.join(['%s'] * len(pks))})"
            f" AND {col['state']} IN ({', '.join(['%s'] * len(allowed))})"
            f" AND ({expires} IS NULL OR {expires} > %s)"  # past its queue timeout: expire_due's, not ours
            f" RETURNING {', '.join(q(f.column) for f in meta.concrete_fields)}"
        )
        at = meta.get_field("started_at").get_db_prep_save(now, conn)
        with transaction.atomic(using=conn.alias, savepoint=False):  # no savepoint inside a caller's transaction
            params = [JobState.RUNNING, worker, at, at, *pks, *allowed, at]
            jobs = list(cls.objects.db_manager(conn.alias).raw(sql, params))
            if not jobs:
                return []
            prefetch_related_objects(jobs, "backend")
            attempts = JobAttempt.objects.bulk_create(
                JobAttempt(
                    job=job, number=job.attempt_count, backend_name=job.backend_name, worker=worker, started_at=now
                )
                for job in jobs
            )
            for job, attempt in zip(jobs, attempts, strict=True):
                job._known_attempts = [attempt] if job.attempt_count == 1 else None
                transaction.on_commit(lambda job=job: status_mirror.publish(job), using=conn.alias)
        return jobs

    def start_attempt(self, backend, worker: str, *, reuse_current: bool = False) -> bool:
        """The next try of a running job (a retry, or a fallback to ``backend``); False when it stopped running.

        ``reuse_current`` relabels the attempt ``mark_running`` opened instead of opening another (the
        first call goes to a fallback). A CAS on ``running`` and on the version this instance holds: a
        job canceled during a backoff stops here, and so does a run whose job was recovered as lost
        and claimed again elsewhere (else its retry would take the job back from the current run).
        """
        now = timezone.now()
        fields: dict[str, Any] = {
            "backend": backend,
            "backend_name": backend.name,
            "version": F("version") + 1,
            "updated_at": now,
        }
        if not reuse_current:
            fields["attempt_count"] = F("attempt_count") + 1
        with transaction.atomic():
            if not Job.objects.filter(pk=self.pk, state=JobState.RUNNING, version=self.version).update(**fields):
                self.refresh_from_db()
                return False
            known = self._known_attempts
            self.refresh_from_db()
            self._known_attempts = known
            if reuse_current:
                self.update_current_attempt(backend_name=backend.name, started_at=now)
            else:
                attempt = JobAttempt.objects.create(
                    job=self, number=self.attempt_count, backend_name=backend.name, worker=worker, started_at=now
                )
                if known is not None:
                    known.append(attempt)
            job = self
            transaction.on_commit(lambda: status_mirror.publish(job))
        return True

    def mark_succeeded(self, **fields: Any) -> bool:
        """running -> succeeded with the result (``SUCCESS_FIELDS``, as ``workers.execution.request.success_fields``
        builds them); False when the job stopped being ours (canceled)."""
        if fields.keys() - {"tool_calls"} != set(SUCCESS_FIELDS):
            raise TypeError(f"mark_succeeded takes {', '.join(SUCCESS_FIELDS)}; got {', '.join(sorted(fields))}")
        return Job.mark_succeeded_many([(self, fields)])[0]

    @classmethod
    def mark_succeeded_many(cls, results: Sequence[tuple[Job, dict[str, Any]]]) -> list[bool]:
        """``mark_succeeded`` for many jobs in two statements (a worker's group commit); who won, in order.

        ``results``: each job with its ``SUCCESS_FIELDS``, plus ``finished_at`` when the result came
        earlier than this write (default: now).
        """
        now = timezone.now()
        moves = [
            (
                job,
                {
                    **{n: f[n] for n in SUCCESS_FIELDS},
                    "output": storable(f["output"]),
                    "tool_calls": f.get("tool_calls") or [],  # optional: only a tool-calling answer has them
                    "error": "",
                    "finished_at": f.get("finished_at") or now,
                },
            )
            for job, f in results
        ]

        def close_attempts(winners: list[Job]) -> None:
            won = {id(job) for job in winners}
            JobAttempt.close_open_many(
                [
                    (
                        job,
                        {
                            "outcome": AttemptOutcome.SUCCEEDED,
                            "error": "",
                            "traceback": "",
                            "latency_ms": job_fields["latency_ms"],
                            "finished_at": job_fields["finished_at"],
                        },
                    )
                    for job, job_fields in moves
                    if id(job) in won
                ]
            )

        return cls.transition_many(JobState.SUCCEEDED, moves, then=close_attempts)

    @classmethod
    def transition_many(
        cls,
        target: str,
        moves: Sequence[tuple[Job, dict[str, Any]]],
        then: Callable[[list[Job]], None] | None = None,
    ) -> list[bool]:
        """The fenced ``transition`` of many jobs at once; returns, in order, whether each won.

        One UPDATE statement executed for each row (``executemany``: compiled once, no ORM work
        per row), fenced like ``transition(fence=True)`` on the state and the version each instance
        holds. Every move sets the same fields (plain values). ``then(winners)`` runs in the same
        transaction. Losers re-read their state; winners change in memory when the transaction
        commits (so a write whose commit failed can be tried again as it was), and the status
        mirror is rewritten then, as for one move.
        """
        if not moves:
            return []
        allowed = sorted(TRANSITIONS[target])
        names = list(moves[0][1])
        conn = connections[router.db_for_write(cls)]
        now = timezone.now()
        for _, values in moves:
            assert list(values) == names, "every move sets the same fields"
        with transaction.atomic(using=conn.alias, savepoint=False):
            changed = _update_each(
                cls,
                ["state", "version", "updated_at", *names],
                ["pk", "version"],
                [([target, job.version + 1, now, *values.values()], [job.pk, job.version]) for job, values in moves],
                also=("state", allowed),
            )
            if changed == len(moves):
                won = [True] * len(moves)
            else:  # some lost (a cancel got there first): a winner holds exactly the version and time it set
                # (the time too: a stale copy one version behind, such as a retried write that had in fact
                # committed, would otherwise pass for the winner and end the job twice)
                now_at = {
                    pk: (version, at)
                    for pk, version, at in cls.objects.filter(
                        pk__in=[job.pk for job, _ in moves], state=target
                    ).values_list("pk", "version", "updated_at")
                }
                won = [now_at.get(job.pk) == (job.version + 1, now) for job, _ in moves]
            if then is not None:
                then([job for (job, _), ok in zip(moves, won, strict=True) if ok])
            for (job, _), ok in zip(moves, won, strict=True):
                if not ok:
                    job.refresh_from_db(fields=["state", "version", "attempt_count"])

            def settle(job: Job, values: dict[str, Any]) -> None:
                job.state, job.version, job.updated_at = target, job.version + 1, now
                for name, value in values.items():
                    setattr(job, name, value)
                status_mirror.publish(job)

            # Memory follows the rows once they are committed: if the commit fails, each instance
            # still holds its committed version, so the same write can be tried again.
            for job, values in (move for move, ok in zip(moves, won, strict=True) if ok):
                transaction.on_commit(lambda job=job, values=values: settle(job, values), using=conn.alias)
            if target in TERMINAL_STATES:  # after the settles above: the instances hold the outcome
                winners = [job for (job, _), ok in zip(moves, won, strict=True) if ok]
                transaction.on_commit(lambda: hooks.ended(winners), using=conn.alias)
        return won

    def mark_failed(
        self, error: str, *, outcome: str = AttemptOutcome.FAILED, traceback: str = "", latency_ms: int | None = None
    ) -> bool:
        with transaction.atomic():
            won = self.transition(
                JobState.FAILED,
                fence=True,
                error=storable(error, TEXT_MAX),
                finished_at=timezone.now(),
                latency_ms=latency_ms,
            )
            if won:
                self._close_attempt(outcome, error=error, traceback=traceback, latency_ms=latency_ms)
        return won

    def cancel(self) -> bool:
        """queued|running -> canceled. A running job's late result is then discarded by the CAS."""
        with transaction.atomic():
            was_running = self.state == JobState.RUNNING
            won = self.transition(JobState.CANCELED, finished_at=timezone.now())
            if won and was_running:
                self._close_attempt(AttemptOutcome.CANCELED)
                job_id = str(self.pk)
                transaction.on_commit(lambda: cancellation.request_stop(job_id))
            elif won:
                job = self
                transaction.on_commit(lambda: _leave_queues([job]))
        return won

    def requeue_lost(self, reason: str) -> bool:
        """running -> queued when its worker died or shut down before the job ended.

        The open attempt is closed as ``interrupted`` with ``reason``. Fenced on the attempt, so a
        stale copy cannot re-queue a run that was already recovered and claimed again.
        """
        with transaction.atomic():
            number = self.attempt_count
            won = self.transition(JobState.QUEUED, fence=True, started_at=None, enqueued_at=timezone.now(), worker="")
            if won:
                JobAttempt.objects.filter(job=self, number=number, outcome=AttemptOutcome.RUNNING).update(
                    outcome=AttemptOutcome.INTERRUPTED, error=storable(reason, TEXT_MAX), finished_at=timezone.now()
                )
                self._known_attempts = None
        return won

    def requeue(self) -> bool:
        """failed|canceled|expired -> queued (operator retry): clears the outcome, keeps the attempt
        history; a queue timeout starts again from now, and ``jobs.hooks.reopened`` runs after commit
        (admission reserves the job's tokens again)."""
        now = timezone.now()
        was_final = self.state in TERMINAL_STATES
        won = self.transition(
            JobState.QUEUED,
            expires_at=now + timedelta(seconds=self.queue_timeout_s) if self.queue_timeout_s else None,
            output="",
            tool_calls=[],
            error="",
            finish_reason="",
            finished_at=None,
            started_at=None,
            enqueued_at=now,
            prompt_tokens=None,
            completion_tokens=None,
            cost=None,
            latency_ms=None,
        )
        if won and was_final:  # its books were closed when it ended: they open again
            job = self
            transaction.on_commit(lambda: hooks.reopened([job]))
        return won

    @classmethod
    def expire_due(cls, ids: Collection[str] | None = None, *, limit: int = 500) -> list[Job]:
        """queued -> expired for jobs past their queue timeout (of ``ids``, or any); returns those moved.

        No backend was called and no attempt opened: the job simply waited too long. Whoever finds
        one calls this (the worker that took it, the reconciler's pass), and each expired job
        leaves its queue, so it holds no place in it.
        """
        now = timezone.now()
        due = cls.objects.filter(state=JobState.QUEUED, expires_at__lte=now)
        if ids is not None:
            due = due.filter(pk__in=list(ids))
        rows = list(due.order_by("expires_at")[:limit])
        if not rows:
            return []
        moves = [
            (job, {"finished_at": now, "error": f"not started within its queue timeout ({job.queue_timeout_s} s)"})
            for job in rows
        ]
        won = cls.transition_many(JobState.EXPIRED, moves)
        expired = [job for job, ok in zip(rows, won, strict=True) if ok]
        if expired:
            transaction.on_commit(lambda: _leave_queues(expired))
        return expired

    @classmethod
    def cancel_queued(cls, rows: Sequence[Job]) -> list[Job]:
        """queued -> canceled for many waiting jobs at once (a batch's cancel); returns those moved.

        Fenced per row like ``transition_many``: a job that started meanwhile is left to run. The
        moved jobs leave their queues.
        """
        now = timezone.now()
        queued = [job for job in rows if job.state == JobState.QUEUED]
        won = cls.transition_many(JobState.CANCELED, [(job, {"finished_at": now}) for job in queued])
        moved = [job for job, ok in zip(queued, won, strict=True) if ok]
        if moved:
            transaction.on_commit(lambda: _leave_queues(moved))
        return moved

    def _close_attempt(
        self, outcome: str, *, error: str = "", traceback: str = "", latency_ms: int | None = None
    ) -> None:
        self.update_current_attempt(
            outcome=outcome,
            error=storable(error, TEXT_MAX),
            traceback=storable(traceback),
            latency_ms=latency_ms,
            finished_at=timezone.now(),
        )


class JobAttempt(models.Model):
    """One try of a job on one backend by one worker; every try is kept."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    backend_name = models.CharField(max_length=64, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices, default=AttemptOutcome.RUNNING)
    error = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job", "number"]
        constraints = [models.UniqueConstraint(fields=["job", "number"], name="unique_attempt_number")]

    def __str__(self) -> str:
        return f"{self.job_id} #{self.number} on {self.backend_name}: {self.outcome}"

    @classmethod
    def close_open_many(cls, closes: Sequence[tuple[Job, dict[str, Any]]]) -> None:
        """Write ``fields`` on each job's open attempt (``Job.update_current_attempt`` for many, in
        one ``executemany``); every close sets the same fields (plain values)."""
        if not closes:
            return
        names = list(closes[0][1])
        for _, values in closes:
            assert list(values) == names, "every close sets the same fields"
        _update_each(
            cls,
            names,
            ["job", "number", "outcome"],
            [(list(values.values()), [job.pk, job.attempt_count, AttemptOutcome.RUNNING]) for job, values in closes],
        )
        conn = connections[router.db_for_write(cls)]

        def settle() -> None:  # memory follows the rows once committed
            for job, values in closes:
                for attempt in job._known_attempts or ():
                    if attempt.number == job.attempt_count and attempt.outcome == AttemptOutcome.RUNNING:
                        for name, value in values.items():
                            setattr(attempt, name, value)

        transaction.on_commit(settle, using=conn.alias)


class JobImage(models.Model):
    """One image, stored once however many jobs send it: keyed by the SHA-256 of its bytes.

    Out of the job row, so listing jobs, status reads and a worker's claim never load megabytes.
    Deleted when no job links to it any more (``jobs.retention``).
    """

    sha256 = models.CharField(max_length=64, primary_key=True)
    media_type = models.CharField(max_length=64)
    size = models.PositiveIntegerField(help_text="Bytes.")
    data = models.BinaryField()
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.sha256[:12]} ({self.media_type}, {self.size} bytes)"

    @classmethod
    def delete_unreferenced(cls, hashes: Collection[str] | None = None) -> int:
        """Delete the images (of ``hashes``, or all) that no job links to; returns how many went."""
        qs = cls.objects.filter(~models.Exists(JobImageLink.objects.filter(image_id=models.OuterRef("pk"))))
        if hashes is not None:
            qs = qs.filter(pk__in=list(hashes))
        _, per_model = qs.only("pk").delete()  # only the keys: never load the bytes to delete them
        return per_model.get(cls._meta.label, 0)


class JobImageLink(models.Model):
    """Image ``position`` of a job (the order it was submitted in)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="image_links")
    # PROTECT: an image is deleted only once nothing links to it, never from under a job.
    image = models.ForeignKey(JobImage, on_delete=models.PROTECT, related_name="links")
    position = models.PositiveSmallIntegerField()

    class Meta:
        ordering = ["job", "position"]
        constraints = [models.UniqueConstraint(fields=["job", "position"], name="unique_image_position")]

    def __str__(self) -> str:
        return f"{self.job_id} image {self.position}: {self.image_id[:12]}"


def _update_each(
    model: type[models.Model],
    set_names: list[str],
    where_names: list[str],
    rows: list[tuple[list[Any], list[Any]]],
    also: tuple[str, list[Any]] | None = None,
) -> int:
    """One ``UPDATE … SET set_names WHERE where_names [AND also IN …]`` statement run for each row
    (``executemany``: compiled once, no ORM work per row); ``rows`` are (set values, where values),
    prepared for the database by their fields. Returns how many rows changed."""
    meta = model._meta
    conn = connections[router.db_for_write(model)]
    q = conn.ops.quote_name
    sets = [meta.get_field(name) if name != "pk" else meta.pk for name in set_names]
    wheres = [meta.get_field(name) if name != "pk" else meta.pk for name in where_names]
    sql = (
        f"UPDATE {q(meta.db_table)} SET {', '.join(f'{q(f.column)} = %s' for f in sets)}"
        f" WHERE {' AND '.join(f'{q(f.column)} = %s' for f in wheres)}"
    )
    extra: list[Any] = []
    if also is not None:
        name, values = also
        sql += f" AND {q(meta.get_field(name).column)} IN ({', '.join(['%s'] * len(values))})"
        extra = list(values)
    params = [
        [f.get_db_prep_save(v, conn) for f, v in zip(sets, set_values, strict=True)]
        + [f.get_db_prep_value(v, conn) for f, v in zip(wheres, where_values, strict=True)]
        + extra
        for set_values, where_values in rows
    ]
    with conn.cursor() as cursor:
        cursor.executemany(sql, params)
        return cursor.rowcount
