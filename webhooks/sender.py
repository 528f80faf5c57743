"""Sending deliveries: one attempt (``attempt``), everything due (``send_due``), and the ``Sender``
threads every worker process runs beside its jobs.

Why threads in the worker and not RQ jobs: our workers take RQ jobs through the fair queue and run
any other RQ job in their main loop, where a receiver taking its full timeout would hold up every
job behind it; and a retry hours later would need RQ's scheduler running somewhere. Here the
delivery row is the record and the schedule (``next_attempt_at``): a sender claims what is due with
a compare-and-set that moves it a lease ahead (``WebhookDelivery.claim_due``), so a sender killed
mid-send leaves its delivery due again once the lease passes, and another sends it, with the same
``webhook-id`` (at-least-once). Redis only rings a bell so an idle sender starts at once.

``Sender``: one dispatcher thread claims as many due deliveries as it has idle sending threads
(``WEBHOOK_SENDER_THREADS``) and hands them over; idle, it blocks on the bell for at most
``WEBHOOK_POLL_S``, then looks for retries that came due.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone
from redis.exceptions import RedisError

from orchestrator_site import metrics
from orchestrator_site.redis import redis_client
from webhooks import backoff, signing, transport
from webhooks.events import BELL_KEY
from webhooks.models import WebhookDelivery

log = logging.getLogger(__name__)
BELL_WAIT_S = 2.0  # one blocking wait (below the Redis client's socket timeout)
GONE = 410  # the receiver wants no more: the endpoint is disabled (Standard Webhooks)


def lease() -> timedelta:
    """How long a claim holds a delivery: past any attempt's hard deadline (twice the timeout)."""
    return timedelta(seconds=2 * float(settings.WEBHOOK_TIMEOUT_S) + 5)


def attempt(delivery: WebhookDelivery, token: str, *, worker: str = "") -> transport.Answer | None:
    """Send ``delivery`` (claimed with ``token``) once and record the outcome; None when nothing was
    sent (its endpoint is disabled: it ends ``failed``)."""
    endpoint = delivery.endpoint
    if not endpoint.enabled:
        why = f": {endpoint.disabled_reason}" if endpoint.disabled_reason else ""
        delivery.fail_unsent(token, f"Endpoint disabled{why}; not sent.")
        return None
    payload = delivery.payload.encode("utf-8")
    headers = signing.headers(endpoint.secret, delivery.message_id, int(time.time()), payload)
    answer = transport.post(endpoint.url, payload, headers)
    failures = delivery.attempts - delivery.round_start + 1
    gone = answer.status_code == GONE
    retry_in = None if answer.succeeded or gone else backoff.delay(failures, retry_after_s=answer.retry_after_s)
    delivery.record_attempt(
        token,
        succeeded=answer.succeeded,
        status_code=answer.status_code,
        latency_ms=answer.latency_ms,
        error=answer.error + (" The receiver answered 410 Gone: endpoint disabled." if gone else ""),
        response=answer.response,
        retry_in=retry_in,
        worker=worker,
        disable_endpoint="The receiver answered 410 Gone." if gone else "",
    )
    _count(answer)
    if answer.succeeded:
        log.info("webhook delivered", extra={"delivery": delivery.message_id, "status": answer.status_code})
    else:
        log.warning(
            "webhook attempt failed",
            extra={"delivery": delivery.message_id, "outcome": answer.outcome, "error": answer.error[:300]},
        )
    return answer


def _count(answer: transport.Answer) -> None:
    try:
        pipe = redis_client().pipeline(transaction=False)
        metrics.inc(pipe, metrics.WEBHOOK_ATTEMPTS, answer.outcome)
        metrics.observe(pipe, metrics.WEBHOOK_ATTEMPT_SECONDS, answer.latency_ms / 1000, answer.outcome)
        pipe.execute()
    except RedisError as exc:
        log.warning("webhook metrics not recorded", extra={"error": str(exc)})


def send_due(limit: int = 1000, *, worker: str = "") -> int:
    """Send every delivery due now, one after another (``manage.py send_webhooks --burst``, tests);
    returns how many attempts were made. A retry that comes due meanwhile waits for the next call."""
    sent = 0
    started = timezone.now()
    while sent < limit:
        token, rows = WebhookDelivery.claim_due(min(50, limit - sent), lease(), due_by=started)
        if not rows:
            break
        for delivery in rows:
            attempt(delivery, token, worker=worker)
            sent += 1
    return sent


def release(token: str, ids: list[int]) -> None:
    """Claimed deliveries this sender will not send (it is stopping): due again now."""
    if ids:
        WebhookDelivery.objects.filter(pk__in=ids, claim=token, state="pending").update(
            next_attempt_at=timezone.now(), claim=""
        )


class Sender:
    """A dispatcher thread and ``threads`` sending threads, in a worker process (or ``send_webhooks``)."""

    def __init__(self, name: str, threads: int | None = None) -> None:
        self.name = name
        self.threads = int(settings.WEBHOOK_SENDER_THREADS if threads is None else threads)
        self._stop = threading.Event()
        self._work: queue.Queue[tuple[str, WebhookDelivery] | None] = queue.Queue()
        self._idle = threading.Semaphore(self.threads)
        self._all: list[threading.Thread] = []

    def start(self) -> None:
        if self.threads <= 0:
            return
        self._all = [threading.Thread(target=self._dispatch, name=f"webhooks-{self.name}", daemon=True)]
        self._all += [
            threading.Thread(target=self._send_loop, name=f"webhooks-{self.name}-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for thread in self._all:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming; sends in progress finish (each is bounded by its own deadline). The
        dispatcher is not waited for (it may be blocked on the bell for a moment): whatever it claims
        after this is never sent here, and comes due again when its lease passes."""
        if not self._all:
            return
        self._stop.set()
        for _ in range(self.threads):
            self._work.put(None)
        wait = 2 * float(settings.WEBHOOK_TIMEOUT_S) + 1 if timeout is None else timeout
        until = time.monotonic() + wait
        dispatcher, *senders = self._all
        for thread in senders:
            thread.join(timeout=max(0.0, until - time.monotonic()))
        dispatcher.join(timeout=min(0.1, max(0.0, until - time.monotonic())))

    def _dispatch(self) -> None:
        poll = float(settings.WEBHOOK_POLL_S)
        try:
            while not self._stop.is_set():
                free = 0
                while self._idle.acquire(blocking=False):
                    free += 1
                if not free:
                    self._stop.wait(0.05)  # every thread busy: wait for one to finish
                    continue
                try:
                    token, rows = WebhookDelivery.claim_due(free, lease())
                except Exception as exc:  # the database away: try again later
                    log.warning("webhook deliveries not claimed", extra={"error": str(exc)})
                    close_old_connections()
                    token, rows = "", []
                    self._stop.wait(poll)
                for delivery in rows:
                    self._work.put((token, delivery))
                for _ in range(free - len(rows)):
                    self._idle.release()
                if rows and len(rows) == free:
                    continue  # maybe more due
                if not rows:
                    self._wait_for_bell(poll)
        finally:
            connection.close()

    def _wait_for_bell(self, seconds: float) -> None:
        """Until a publish rings or ``seconds`` pass, in waits short enough for Redis's socket timeout."""
        until = time.monotonic() + seconds
        while not self._stop.is_set() and (left := until - time.monotonic()) > 0:
            try:
                if redis_client().blpop([BELL_KEY], timeout=max(min(left, BELL_WAIT_S), 0.01)) is not None:
                    return
            except RedisError:
                self._stop.wait(min(left, BELL_WAIT_S))

    def _send_loop(self) -> None:
        try:
            while True:
                item = self._work.get()
                if item is None:
                    return
                token, delivery = item
                try:
                    if self._stop.is_set():
                        release(token, [delivery.pk])
                    else:
                        attempt(delivery, token, worker=self.name)
                except Exception:  # the database away mid-record: the lease passes and it is sent again
                    log.exception("webhook delivery failed to send", extra={"delivery": delivery.message_id})
                    close_old_connections()
                finally:
                    self._idle.release()
        finally:
            connection.close()
