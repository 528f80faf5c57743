"""The fleet's client: submits jobs as a careful program would, and checks what became of them.

A submission carries an ``Idempotency-Key``; on a 503 (or no answer) it is sent again with the same key,
to the other web host, after ``Retry-After`` (capped, to keep the tests short). Every answer is recorded,
so a test can say how many 503s came, whether each had ``Retry-After``, and that no 500 ever did.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from jobs.models import AttemptOutcome, Job, JobAttempt, JobState

DB = "fleet"  # the fleet's database, as an alias of the test process (tests/fleet/conftest.py)


@dataclass
class Answer:
    at: float  # time.monotonic()
    web: str
    status: int  # 0: no answer (connection refused, reset, timeout)
    retry_after: str | None
    sent: float = 0.0  # time.monotonic() when the request went out


@dataclass
class Client:
    urls: dict[str, str]  # web host name -> base URL
    token: str
    answers: list[Answer] = field(default_factory=list)
    accepted: dict[str, str] = field(default_factory=dict)  # job id -> prompt
    retry_cap_s: float = 0.5
    fields: Callable[[], dict] | None = None  # more of each job's body (e.g. its backend), drawn per job
    _turn: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, prompt: str, key: str | None = None, deadline_s: float = 60) -> str:
        """Submit until accepted (same key every try, web hosts in turn); returns the job id."""
        key = key or uuid.uuid4().hex
        body = {"prompt": prompt, **(self.fields() if self.fields else {})}
        names = list(self.urls)
        deadline = time.monotonic() + deadline_s
        with self._lock:
            self._turn += 1
            turn = self._turn
        while time.monotonic() < deadline:
            web = names[turn % len(names)]
            turn += 1
            sent = time.monotonic()
            try:
                r = httpx.post(
                    f"{self.urls[web]}/jobs",
                    json=body,
                    headers={"Authorization": f"Token {self.token}", "Idempotency-Key": key},
                    timeout=10,
                )
            except httpx.HTTPError:
                self._record(Answer(time.monotonic(), web, 0, None, sent))
                time.sleep(0.1)
                continue
            self._record(Answer(time.monotonic(), web, r.status_code, r.headers.get("Retry-After"), sent))
            if r.status_code in (200, 201, 202):
                job_id = r.json()["id"]
                with self._lock:
                    self.accepted[job_id] = prompt
                return job_id
            if r.status_code in (409, 503):  # 409: the same key still in progress elsewhere
                wait = float(r.headers.get("Retry-After") or 0.2)
                time.sleep(min(wait, self.retry_cap_s))
                continue
            raise AssertionError(f"{web} answered {r.status_code}: {r.text[:500]}")
        raise AssertionError(f"no web host accepted {prompt!r} within {deadline_s:g} s")

    def _record(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)

    def statuses(self, since: float = 0.0) -> Counter:
        return Counter(a.status for a in self.answers if a.at >= since)


class Stream:
    """Submissions at a steady rate from a thread, until stopped (the load a fault happens under)."""

    def __init__(self, client: Client, per_s: float, label: str) -> None:
        self.client, self.interval, self.label = client, 1 / per_s, label
        self.stop_event = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.workers: list[threading.Thread] = []

    def __enter__(self) -> Stream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=70)
        for t in self.workers:
            t.join(timeout=70)

    def _run(self) -> None:
        i = 0
        while not self.stop_event.wait(self.interval):
            t = threading.Thread(target=self._one, args=(f"{self.label} {i}",), daemon=True)
            t.start()
            self.workers.append(t)
            i += 1

    def _one(self, prompt: str) -> None:
        try:
            self.client.submit(prompt)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)


def wait_terminal(ids: list[str], timeout: float) -> float:
    """Wait until every job is in a terminal state; returns when (monotonic); fails naming the stragglers."""
    deadline = time.monotonic() + timeout
    while True:
        open_ids = list(
            Job.objects.using(DB).filter(pk__in=ids).exclude(state__in=_terminal()).values_list("pk", "state")
        )
        if not open_ids:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(open_ids)} jobs not finished after {timeout:g} s: {open_ids[:5]}")
        time.sleep(0.3)


def _terminal() -> list[str]:
    return [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED]


@dataclass
class Verdict:
    jobs: int
    succeeded: int
    lost: int  # accepted (2xx) but never finished, or missing
    runs: int  # backend calls that started, over all jobs (attempt rows)
    rerun: int  # jobs whose backend was called more than once (at-least-once: a presumed-dead run)
    written_twice: int  # jobs with more than one succeeded attempt (must be 0: exactly-once outcome)
    wrong_output: int


def verdict(accepted: dict[str, str]) -> Verdict:
    """What became of the accepted jobs, from their rows and attempt rows (the system of record)."""
    rows = {str(j.pk): j for j in Job.objects.using(DB).filter(pk__in=list(accepted))}
    attempts = Counter()
    succeeded_attempts = Counter()
    for job_id, outcome in (
        JobAttempt.objects.using(DB).filter(job_id__in=list(accepted)).values_list("job_id", "outcome")
    ):
        attempts[str(job_id)] += 1
        if outcome == AttemptOutcome.SUCCEEDED:
            succeeded_attempts[str(job_id)] += 1
    return Verdict(
        jobs=len(accepted),
        succeeded=sum(1 for j in rows.values() if j.state == JobState.SUCCEEDED),
        lost=len(accepted) - sum(1 for j in rows.values() if j.state in _terminal()),
        runs=sum(attempts.values()),
        rerun=sum(1 for n in attempts.values() if n > 1),
        written_twice=sum(1 for n in succeeded_attempts.values() if n > 1),
        wrong_output=sum(1 for pk, j in rows.items() if j.state == JobState.SUCCEEDED and j.output != accepted[pk]),
    )
