"""The circuit breaker: its state machine on the real Redis, what routing and the admin see, and the
whole cycle (open → skipped → half-open trial → closed) across separate worker processes."""

from __future__ import annotations

import time

import pytest

from jobs.models import AttemptOutcome, Job, JobState
from orchestrator_site.redis import redis_client
from routing import circuit, policies, stats
from routing.circuit import CircuitConfig
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import run_worker_burst
from tests.fakes.openai_server import OpenAIFake

QUICK = CircuitConfig(failures=3, cooldown_s=0.3, window=10, min_calls=6, error_rate=0.5)


def fail(name: str, n: int = 1, config: CircuitConfig = QUICK) -> str:
    state = ""
    for _ in range(n):
        state = circuit.record(name, ok=False, config=config, error="HTTP 503")
    return state


def wait_out_cooldown(name: str) -> None:
    until = circuit.status(name).open_until
    assert until is not None
    secs, micros = redis_client().time()
    now = secs + micros / 1e6
    time.sleep(max(until - now, 0) + 0.05)


# --- the state machine --------------------------------------------------------------------------
def test_opens_after_n_consecutive_failures_and_a_success_resets_the_count():
    assert fail("a", 2) == "closed"
    assert circuit.record("a", ok=True, config=QUICK) == "closed"
    assert fail("a", 2) == "closed"
    assert fail("a") == "open"
    s = circuit.status("a")
    assert (s.state, s.failures) == ("open", 3)
    assert s.reason == "3 consecutive failures; last: HTTP 503"
    assert s.opened_at is not None and s.open_until == pytest.approx(s.opened_at + 0.3)
    assert circuit.allow("a") == (False, "open")
    assert stats.read_stats(["a"])["a"].circuit_open  # routing's reader sees it


def test_opens_on_the_error_rate_over_the_window():
    cfg = CircuitConfig(failures=100, cooldown_s=30, window=10, min_calls=6, error_rate=0.5)
    for ok in (True, False, True, False, True):
        assert circuit.record("a", ok=ok, config=cfg) == "closed"  # 40%, and fewer calls than min_calls
    assert circuit.record("a", ok=False, config=cfg) == "open"  # 3 of 6 = 50%
    assert circuit.status("a").reason.startswith("error rate 50% over the last 6 calls")


def test_after_the_cooldown_one_trial_goes_through_and_its_success_closes():
    fail("a", 3)
    wait_out_cooldown("a")
    assert circuit.status("a").state == "half_open"  # computed lazily: nothing wrote it yet
    assert circuit.allow("a") == (True, "half_open")  # the trial
    assert circuit.allow("a") == (False, "half_open")  # everyone else keeps skipping
    assert not stats.read_stats(["a"])["a"].circuit_open
    assert circuit.record("a", ok=True, config=QUICK) == "closed"
    assert circuit.allow("a") == (True, "closed")
    # The failures that opened it are forgotten: one more failure does not re-open it.
    assert fail("a") == "closed"
    history = [(t.from_state, t.to_state) for t in circuit.status("a").history]
    assert history == [("half_open", "closed"), ("open", "half_open"), ("closed", "open")]


def test_a_failed_trial_reopens_for_another_cooldown():
    fail("a", 3)
    wait_out_cooldown("a")
    assert circuit.allow("a")[0]
    assert fail("a") == "open"
    s = circuit.status("a")
    assert s.state == "open" and s.reason == "trial call failed: HTTP 503"
    assert circuit.allow("a") == (False, "open")


def test_a_trial_whose_worker_died_is_offered_again_after_its_lease():
    fail("a", 3)
    wait_out_cooldown("a")
    assert circuit.allow("a", trial_lease_s=1) == (True, "half_open")
    assert circuit.allow("a") == (False, "half_open")
    time.sleep(1.05)
    assert circuit.allow("a") == (True, "half_open")


def test_a_trial_handed_back_is_offered_again_at_once():
    fail("a", 3)
    wait_out_cooldown("a")
    assert circuit.allow("a") == (True, "half_open")  # the trial
    assert circuit.allow("a") == (False, "half_open")
    circuit.return_trial("a")  # its caller found no backend slot
    assert circuit.allow("a") == (True, "half_open")
    circuit.return_trial("b")  # a closed circuit: nothing to hand back, nothing changes
    assert circuit.allow("b") == (True, "closed")


@pytest.mark.django_db
def test_a_job_that_finds_no_slot_hands_a_granted_trial_back(dev_backend):
    from routing import capacity
    from tests.factories import make_job
    from workers.execution.job_run import JobRun, RunContext
    from workers.execution.retry import Deadline

    Backend.objects.filter(pk=dev_backend.pk).update(max_concurrency=1)
    dev_backend.refresh_from_db()
    held = capacity.try_acquire("dev", 1)  # another worker's call holds the only slot
    fail("dev", 3)
    wait_out_cooldown("dev")
    run = JobRun(make_job(dev_backend), RunContext("w1"), Deadline(30))
    try:
        assert run.open_call(dev_backend, wait=False) == (None, False)
        assert circuit.allow("dev") == (True, "half_open")  # the trial is still there for the next caller
    finally:
        capacity.release(held)


def test_late_outcomes_of_calls_started_before_opening_change_nothing():
    fail("a", 3)
    assert circuit.record("a", ok=True, config=QUICK) == "open"
    assert fail("a") == "open"
    assert len(circuit.status("a").history) == 1


def test_reset_closes_and_is_recorded():
    fail("a", 3)
    circuit.reset("a", reason="closed by root in the admin")
    s = circuit.status("a")
    assert (s.state, s.failures) == ("closed", 0)
    assert s.history[0].reason == "closed by root in the admin"


def test_history_is_capped():
    cfg = CircuitConfig(failures=1, cooldown_s=0)
    for _ in range(circuit.HISTORY_MAX):  # each round: open, half_open (trial), open again
        fail("a", config=cfg)
        circuit.allow("a")
    assert redis_client().llen(circuit.history_key("a")) == circuit.HISTORY_MAX


def test_config_comes_from_the_backend_and_nonsense_falls_back_to_defaults():
    cfg = CircuitConfig.from_config({"circuit_failures": 2, "circuit_cooldown_s": "soon", "circuit_error_rate": 7})
    assert (cfg.failures, cfg.cooldown_s, cfg.error_rate) == (2, 30.0, 1.0)


# --- admin ---------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_backend_page_shows_circuit_state_reason_and_history(admin_client, dev_backend):
    fail("dev", 3)
    page = admin_client.get(f"/admin/routing/backend/{dev_backend.pk}/change/").content.decode()
    assert "Circuit breaker" in page and "3 consecutive failures; last: HTTP 503" in page
    assert "closed → open" in page
    r = admin_client.post(
        "/admin/routing/backend/", {"action": "close_circuit", "_selected_action": [dev_backend.pk]}, follow=True
    )
    assert "Circuit closed for 1 backend" in r.content.decode()
    assert circuit.status("dev").state == "closed"
    assert "open → closed" in admin_client.get(f"/admin/routing/backend/{dev_backend.pk}/change/").content.decode()


# --- across worker processes ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_breaker_opened_in_one_worker_is_honoured_by_routing_and_by_another_worker(api):
    """Worker 1 opens the circuit; routing and worker 2 (its own process) skip the backend. The
    cool-down is far longer than a worker's start-up on any machine; the trial that follows it is
    tested below (``test_after_the_cooldown_routing_sends_a_job_that_becomes_the_trial``)."""
    with OpenAIFake(fail_rate=1.0, fail_status=503) as fake_a:
        config = {"retry_max": 0, "circuit_failures": 3, "circuit_cooldown_s": 3600}
        Backend.objects.create(
            name="a", kind=BackendKind.OPENAI, base_url=fake_a.base_url, model="gpt-test", config=config
        )
        Backend.objects.create(name="b", kind=BackendKind.DEV)
        policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["a", "b"]}))

        def submit(priority: str) -> str:
            r = api.post("/jobs", {"prompt": f"{priority} job", "priority": priority}, format="json")
            assert r.status_code == 202, r.content
            return r.json()["id"]

        # Routed to a while its circuit is still closed, each waiting on a queue of its own.
        opening = [submit("normal") for _ in range(3)]
        skipping = submit("low")
        assert {Job.objects.get(pk=i).backend_name for i in [*opening, skipping]} == {"a"}

        run_worker_burst("normal")  # worker 1: three failures on a, each job falls back to b
        assert fake_a.generation_calls == 3
        s = circuit.status("a")
        assert s.state == "open"
        assert s.reason.startswith("3 consecutive failures; last: The engine is currently overloaded")
        for job_id in opening:
            job = Job.objects.get(pk=job_id)
            assert (job.state, job.backend_name) == (JobState.SUCCEEDED, "b")

        # Routing (this process) skips the open backend for new submissions.
        routed = Job.objects.get(pk=submit("normal"))
        assert routed.backend_name == "b" and routed.routing["rejected"] == {"a": "circuit open"}

        run_worker_burst("low")  # worker 2: sees worker 1's open circuit, never calls a
        assert fake_a.generation_calls == 3
        job = Job.objects.get(pk=skipping)
        assert (job.state, job.backend_name) == (JobState.SUCCEEDED, "b")
        assert [(a.backend_name, a.outcome) for a in job.attempts.all()] == [("b", AttemptOutcome.SUCCEEDED)]
        assert circuit.status("a").state == "open"


@pytest.mark.django_db(transaction=True)
def test_after_the_cooldown_routing_sends_a_job_that_becomes_the_trial(api):
    """Needs the routing/stats.py patch: an open circuit past its cool-down reads half_open."""
    Backend.objects.create(name="a", kind=BackendKind.DEV, config={"circuit_failures": 3, "circuit_cooldown_s": 0.3})
    Backend.objects.create(name="b", kind=BackendKind.DEV)
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["a", "b"]}))
    fail("a", 3)
    assert stats.read_stats(["a"])["a"].circuit_state == "open"
    wait_out_cooldown("a")
    assert stats.read_stats(["a"])["a"].circuit_state == "half_open"
    time.sleep(0.3)  # past the API's stats cache
    r = api.post("/jobs", {"prompt": "trial"}, format="json")
    job_id = r.json()["id"]
    assert Job.objects.get(pk=job_id).backend_name == "a"
    run_worker_burst()  # another process: its trial call succeeds and closes the circuit
    assert Job.objects.get(pk=job_id).state == JobState.SUCCEEDED
    s = circuit.status("a")
    assert s.state == "closed"
    assert [(t.from_state, t.to_state) for t in s.history] == [
        ("half_open", "closed"),
        ("open", "half_open"),
        ("closed", "open"),
    ]
