"""The version fence: only the run that holds the job's current version can end it.

A run whose job was recovered as lost (its heartbeat lapsed, the reconciler re-queued it) and then
claimed by another worker holds a stale version. Every write of its outcome must lose: the one-job
forms, the batched ones the thread workers' group commit and the GPU worker use, a retry or a
fallback it starts, a re-queue of its own. The current run must still win.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from jobs.models import AttemptOutcome, Job, JobState
from routing import policies, stats
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.factories import make_job
from tests.fakes.openai_server import OpenAIFake
from tests.worker_classes import GPU_WORKER

pytestmark = pytest.mark.django_db(transaction=True)

LATE = {"output": "late", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 5}


def lost_and_claimed_again(backend: Backend) -> tuple[Job, Job]:
    """A job claimed by w1, recovered the way the reconciler does it (a fresh read, then
    ``requeue_lost``) and claimed by w2: (w1's object, now stale; w2's object, current)."""
    job = make_job(backend)
    [stale] = Job.claim([job.pk], "w1")
    recovered = Job.objects.get(pk=job.pk)
    assert recovered.requeue_lost("worker w1 was lost while running this job (no heartbeat)")
    [current] = Job.claim([job.pk], "w2")
    assert stale.state == current.state == JobState.RUNNING and stale.version < current.version
    return stale, current


def assert_current_run_untouched(job_id, lost: str = "w1") -> None:
    """The job runs on in w2's attempt, as w2 claimed it; ``lost``'s attempt stays interrupted."""
    job = Job.objects.get(pk=job_id)
    assert (job.state, job.worker, job.output, job.error, job.attempt_count) == (JobState.RUNNING, "w2", "", "", 2)
    assert list(job.attempts.values_list("number", "worker", "outcome")) == [
        (1, lost, AttemptOutcome.INTERRUPTED),
        (2, "w2", AttemptOutcome.RUNNING),
    ]


def succeeded_by_current_run(job_id) -> None:
    job = Job.objects.get(pk=job_id)
    assert (job.state, job.output, job.worker) == (JobState.SUCCEEDED, "current", "w2")
    assert job.attempts.get(number=2).outcome == AttemptOutcome.SUCCEEDED
    assert job.attempts.get(number=1).outcome == AttemptOutcome.INTERRUPTED


def test_a_stale_run_cannot_succeed_and_the_current_run_can(dev_backend):
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.mark_succeeded(**LATE, cost=None)
    assert_current_run_untouched(current.pk)
    assert current.mark_succeeded(**{**LATE, "output": "current"}, cost=None)
    succeeded_by_current_run(current.pk)


def test_a_stale_run_cannot_fail_the_job_and_the_current_run_can_finish_it(dev_backend):
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.mark_failed("late failure of the lost run", latency_ms=5)
    assert_current_run_untouched(current.pk)
    assert current.mark_succeeded(**{**LATE, "output": "current"}, cost=None)
    succeeded_by_current_run(current.pk)


def test_a_stale_crash_record_cannot_fail_the_job(dev_backend):
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.mark_failed("unexpected KeyError", outcome=AttemptOutcome.ERRORED, traceback="Traceback ...")
    assert_current_run_untouched(current.pk)
    assert current.mark_failed("current failure")
    job = Job.objects.get(pk=current.pk)
    assert (job.state, job.error) == (JobState.FAILED, "current failure")
    assert job.attempts.get(number=2).traceback == ""


def test_in_a_batched_success_write_the_stale_run_loses_and_the_others_win(dev_backend):
    """The write the group commit and the GPU worker's rounds make: one statement for many rows."""
    stale, current = lost_and_claimed_again(dev_backend)
    [fresh] = Job.claim([make_job(dev_backend).pk], "w1")
    won = Job.mark_succeeded_many([(stale, {**LATE, "cost": None}), (fresh, {**LATE, "cost": None})])
    assert won == [False, True]
    assert_current_run_untouched(current.pk)
    assert Job.objects.get(pk=fresh.pk).state == JobState.SUCCEEDED
    assert Job.mark_succeeded_many([(current, {**LATE, "output": "current", "cost": None})]) == [True]
    succeeded_by_current_run(current.pk)


def test_a_batch_of_only_stale_runs_writes_nothing(dev_backend):
    runs = [lost_and_claimed_again(dev_backend) for _ in range(3)]
    assert Job.mark_succeeded_many([(stale, {**LATE, "cost": None}) for stale, _ in runs]) == [False] * 3
    for _, current in runs:
        assert_current_run_untouched(current.pk)


def test_transition_many_is_fenced_on_the_version_it_holds(dev_backend):
    stale, current = lost_and_claimed_again(dev_backend)
    winners: list[list[Job]] = []
    assert Job.transition_many(JobState.FAILED, [(stale, {"error": "late"})], then=winners.append) == [False]
    assert winners == [[]]  # nothing to close: the stale run's attempt is not touched
    assert_current_run_untouched(current.pk)
    assert Job.transition_many(JobState.FAILED, [(current, {"error": "current"})]) == [True]
    assert Job.objects.get(pk=current.pk).error == "current"


def test_a_stale_run_cannot_requeue_the_current_run(dev_backend):
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.requeue_lost("worker w1 shut down before the job finished; re-queued")
    assert_current_run_untouched(current.pk)


def test_a_stale_run_cannot_start_a_retry(dev_backend):
    """A lost run whose call failed goes on to retry: that must not take the job back from the current run."""
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.start_attempt(dev_backend, "w1")
    assert_current_run_untouched(current.pk)
    assert current.mark_succeeded(**{**LATE, "output": "current"}, cost=None)
    succeeded_by_current_run(current.pk)


def test_a_stale_run_cannot_fall_back_to_another_backend(dev_backend):
    other = Backend.objects.create(name="other", kind=dev_backend.kind)
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.start_attempt(other, "w1", reuse_current=True)
    assert_current_run_untouched(current.pk)
    assert Job.objects.get(pk=current.pk).backend_name == dev_backend.name


# --- real workers: the write a worker makes after its job was taken from it -----------------------
# No reconciler in the worker (it would recover the job from "w2", which beats no heartbeat), and a
# grace long enough that a SIGTERM lets the worker finish its call and write its outcome before it exits.
WORKER_ENV = {"RECONCILE_INTERVAL_MS": "0", "WORKER_SHUTDOWN_GRACE_MS": "120000"}


def wait_for(what: str, check, proc, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        assert proc.poll() is None, f"the worker exited: {proc.log_path.read_text()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}\n{proc.log_path.read_text()[-3000:]}")


def recover_and_claim_again(job_id: str) -> tuple[Job, str]:
    """What the reconciler and a second worker do to a job whose worker seems lost: (w2's object,
    the name of the worker that lost it)."""
    recovered = Job.objects.get(pk=job_id)
    assert recovered.state == JobState.RUNNING, "the job ended before it could be taken from its worker"
    lost = recovered.worker
    assert recovered.requeue_lost(f"worker {lost} was lost while running this job (no heartbeat)")
    [current] = Job.claim([job_id], "w2")
    return current, lost


def stop_and_wait(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.log_path.read_text()[-3000:]


@pytest.mark.slow
def test_a_thread_worker_whose_job_was_taken_from_it_cannot_finish_it(api, worker_process):
    with OpenAIFake(hold=True) as fake:  # the worker's call waits in the server until released
        Backend.objects.create(
            name="oa", kind=BackendKind.OPENAI, base_url=fake.base_url, model="gpt-test", config={"retry_max": 0}
        )
        policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["oa"]}))
        job_id = api.post("/jobs", {"prompt": "the lost run"}, format="json").json()["id"]
        worker = worker_process(MAX_CONCURRENCY="2", **WORKER_ENV)
        wait_for("the worker's call is in the server", lambda: fake.held == 1, worker)
        current, lost = recover_and_claim_again(job_id)
        fake.release()  # the lost run gets its answer now and writes it (through its group commit)
        wait_for("the call returned", lambda: stats.read_stats(["oa"])["oa"].calls, worker)
        stop_and_wait(worker)  # whatever it still had to write is written before it exits
    assert_current_run_untouched(current.pk, lost)
    assert current.mark_succeeded(**{**LATE, "output": "current"}, cost=None)
    succeeded_by_current_run(current.pk)


@pytest.fixture
def tiny_gpu_backend(db, tmp_path_factory) -> Backend:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.gpu_model import TEST_CONFIG, save_tiny_model

    path: Path = save_tiny_model(tmp_path_factory.mktemp("tiny-fence"))
    backend = Backend.objects.create(
        name="tiny", kind=BackendKind.HF_LOCAL, model=str(path), pool="gpu", config=dict(TEST_CONFIG)
    )
    policies.activate(RoutingPolicy.objects.create(name="gpu", strategy="ordered", params={"order": ["tiny"]}))
    return backend


def full_length_prompt(backend: Backend, max_tokens: int) -> str:
    """A prompt the tiny random model answers without an early end (so its batch runs every round)."""
    from workers.backends.base import BackendConfig, GenerationRequest
    from workers.backends.hf_local import HFLocalAdapter

    cfg = BackendConfig(name=backend.name, kind=backend.kind, model=backend.model, config=backend.config)
    prompts = [f"survive {i}" for i in range(40)]
    requests = [
        GenerationRequest(job_id=str(i), messages=[{"role": "user", "content": p}], max_tokens=max_tokens)
        for i, p in enumerate(prompts)
    ]
    results = HFLocalAdapter().generate_batch(cfg, requests)
    return next(p for p, r in zip(prompts, results, strict=True) if r.completion_tokens == max_tokens)


@pytest.mark.slow
def test_a_gpu_worker_whose_job_was_taken_from_it_cannot_write_its_batch_result(api, tiny_gpu_backend, worker_process):
    # One token per round, 200 rounds: the batch is still generating when the job is taken from it.
    body = {"prompt": full_length_prompt(tiny_gpu_backend, 200), "backend": "tiny", "max_tokens": 200}
    r = api.post("/jobs", body, format="json")
    assert r.status_code == 202, r.content
    job_id = r.json()["id"]
    worker = worker_process(
        "gpu-high", "gpu-normal", "gpu-low", worker_class=GPU_WORKER, BATCH_ROUND_TOKENS="1", **WORKER_ENV
    )
    wait_for("the batch is running", lambda: Job.objects.get(pk=job_id).state == JobState.RUNNING, worker)
    current, lost = recover_and_claim_again(job_id)
    stop_and_wait(worker)  # the batch runs to its end and writes its result in one batched write, then exits
    assert_current_run_untouched(current.pk, lost)
    assert current.mark_succeeded(**{**LATE, "output": "current"}, cost=None)
    succeeded_by_current_run(current.pk)
