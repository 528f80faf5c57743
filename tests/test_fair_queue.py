"""The fair queue on a real Redis: stride scheduling by weight, strict priority with aging, FIFO per
tenant, exact put-back, removal, positions and depth counters."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from django.test import override_settings

from jobs import fair_queue as fq


def push(queue: str, tenant: str, job: str, *, at: float | None = None, weight: int | None = None) -> None:
    fq.push(queue, tenant, job, fq.score_of(time.time() if at is None else at), weight=weight)


def take_ids(queues: list[str], n: int) -> list[str]:
    return [t.job_id for t in fq.take(queues, n)]


def test_each_tenant_is_fifo_and_tenants_alternate() -> None:
    for i in range(5):
        push("normal", "a", f"a{i}", at=1000 + i)
    for i in range(2):
        push("normal", "b", f"b{i}", at=2000 + i)
    assert take_ids(["normal"], 10) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]
    assert fq.depths(["normal"]) == {"normal": 0}


def test_a_new_tenant_waits_behind_at_most_one_dispatch_per_active_tenant() -> None:
    for i in range(1000):
        push("normal", "a", f"a{i}", at=1000 + i)
    assert take_ids(["normal"], 100)[-1] == "a99"
    for i in range(10):
        push("normal", "b", f"b{i}", at=5000 + i)
    order = take_ids(["normal"], 20)
    assert [j for j in order if j.startswith("b")] == [f"b{i}" for i in range(10)]
    assert order.index("b9") <= 19  # interleaved one for one: B's tenth job is the 20th dispatch at worst


def test_weights_share_dispatches_between_backlogged_tenants() -> None:
    for i in range(400):
        push("normal", "a", f"a{i}", at=1000 + i, weight=3)
        push("normal", "b", f"b{i}", at=1000 + i, weight=1)
    counts = Counter(j[0] for j in take_ids(["normal"], 400))
    assert counts["a"] == 300 and counts["b"] == 100


def test_emptying_and_refilling_gains_no_credit() -> None:
    for i in range(50):
        push("normal", "a", f"a{i}", at=1000 + i)
    push("normal", "b", "b0", at=1000)
    assert take_ids(["normal"], 2) == ["a0", "b0"]
    push("normal", "b", "b1", at=3000)  # b comes back at once: it is not owed the dispatches it missed
    assert take_ids(["normal"], 4) == ["a1", "b1", "a2", "a3"]


def test_priorities_are_strict_without_starvation() -> None:
    now = time.time()
    push("high", "a", "h1", at=now)
    push("low", "a", "l1", at=now)
    push("normal", "a", "n1", at=now)
    assert take_ids(["high", "normal", "low"], 3) == ["h1", "n1", "l1"]


@override_settings(MAX_STARVATION_S=60)
def test_a_starving_low_job_is_served_next() -> None:
    now = time.time()
    for i in range(5):
        push("high", "a", f"h{i}", at=now + i / 1000)
    push("low", "b", "old-low", at=now - 61)
    push("low", "b", "new-low", at=now)
    assert take_ids(["high", "normal", "low"], 3) == ["old-low", "h0", "h1"]


def test_put_back_restores_the_exact_place() -> None:
    for i in range(3):
        push("normal", "a", f"a{i}", at=1000 + i)
    push("normal", "b", "b0", at=1000)
    taken = fq.take(["normal"], 2)
    fq.put_back(taken)
    assert take_ids(["normal"], 4) == ["a0", "b0", "a1", "a2"]


def test_remove_frees_the_place_and_the_counters() -> None:
    push("normal", "a", "a0")
    push("normal", "a", "a1")
    fq.remove("normal", "a", "a0")
    fq.remove("normal", "a", "a0")  # twice is harmless
    assert fq.depths(["normal"]) == {"normal": 1}
    assert int(fq.redis_client().get(fq.tenant_queued_key("a"))) == 1
    assert take_ids(["normal"], 5) == ["a1"]
    assert int(fq.redis_client().get(fq.tenant_queued_key("a"))) == 0


def test_pushing_twice_keeps_one_place() -> None:
    push("normal", "a", "a0", at=1000)
    push("normal", "a", "a0", at=1000)
    assert fq.depths(["normal"]) == {"normal": 1}
    assert take_ids(["normal"], 5) == ["a0"]


def test_positions_follow_the_dispatch_order() -> None:
    now = time.time()
    for i in range(6):
        push("normal", "a", f"a{i}", at=now + i / 1000)
    for i in range(3):
        push("normal", "b", f"b{i}", at=now + 1 + i / 1000)
    push("high", "c", "h0")
    jobs = [*(f"a{i}" for i in range(6)), "b0", "b2"]
    predicted = {j: fq.position("normal", j[0], j, higher=["high"]) for j in jobs}
    order = take_ids(["high", "normal"], 10)
    for job, pos in predicted.items():
        assert pos == order.index(job) + 1, (job, pos, order)
    assert fq.position("normal", "a", "gone") is None


def test_positions_past_the_tenants_counted_one_by_one_are_estimated_closely(monkeypatch) -> None:
    now = time.time()
    tenants = [f"t{i:02d}" for i in range(12)]
    for t in tenants:
        for i in range(8):
            push("normal", t, f"{t}-{i}", at=now + i / 1000, weight=2 if t == "t03" else None)
    take_ids(["normal"], 5)  # passes off the tie
    monkeypatch.setattr(fq, "POSITION_SCAN_MAX", 4)
    past_scan = len(tenants) - 1 - 4  # about one dispatch each, either way
    jobs = [f"{t}-{i}" for t in tenants for i in (0, 3, 7)]
    predicted = {j: fq.position("normal", j[:3], j) for j in jobs}
    order = take_ids(["normal"], 100)
    for job in jobs:
        if job in order:
            exact = order.index(job) + 1
            assert abs(predicted[job] - exact) <= past_scan, (job, predicted[job], exact)


def test_jobs_on_rqs_own_list_are_taken_after_the_sub_queues() -> None:
    fq.redis_client().rpush("rq:queue:normal", "legacy")
    push("normal", "a", "a0")
    taken = fq.take(["normal"], 5)
    assert [t.job_id for t in taken] == ["a0", "legacy"]
    fq.put_back(taken[1:])
    assert fq.redis_client().lrange("rq:queue:normal", 0, -1) == [b"legacy"]


def test_drain_rate_counts_taken_jobs() -> None:
    client = fq.redis_client()
    for k in fq.drain_keys("normal"):
        client.set(k, 6)
    assert fq.drain_rate(["normal"]) == pytest.approx(36 / 60)


@pytest.mark.django_db(transaction=True)
def test_a_tenants_new_weight_governs_its_next_dispatch() -> None:
    from tenants.models import Tenant

    tenant = Tenant.objects.create(name="t", weight=1)
    assert fq.redis_client().hget(fq.PREFIX + "weights", str(tenant.pk)) == b"1"
    tenant.weight = 5
    tenant.save()
    assert fq.redis_client().hget(fq.PREFIX + "weights", str(tenant.pk)) == b"5"


def test_a_submission_costs_two_redis_round_trips(user, policy, monkeypatch, django_capture_on_commit_callbacks):
    """The first (admission, idempotency claim) and the after-commit one; no SCRIPT EXISTS in between."""
    from redis.connection import Connection

    from jobs import services

    with django_capture_on_commit_callbacks(execute=True):  # scripts loaded once
        services.submit({"prompt": "warm"}, user=user, body={}, idempotency_key="k0")
    sent = []
    original = Connection.send_packed_command

    def counted(self, command, check_health=True):
        sent.append(command)
        return original(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counted)
    with django_capture_on_commit_callbacks(execute=True):
        services.submit({"prompt": "x"}, user=user, body={}, idempotency_key="k1")
    assert len(sent) == 2, sent
