"""The GPU worker: jobs submitted over the API, batched from Redis, each finished in the database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from rq.job import Job as RQJob
from rq.registry import FinishedJobRegistry, StartedJobRegistry

from jobs import fair_queue
from jobs.models import AttemptOutcome, Job, JobState, storable
from orchestrator_site.redis import redis_client
from routing import circuit, policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import ROOT, process_env
from tests.gpu_model import TEST_CONFIG, save_tiny_model
from workers.backends import hf_local
from workers.backends.base import BackendConfig, GenerationRequest
from workers.backends.hf_local import HFLocalAdapter
from workers.fleet.status import GPU_STATUS_KEY as STATUS_KEY
from workers.runtime.gpu import BatchLimits, GpuWorker

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.django_db(transaction=True)]
QUEUES = ["gpu-high", "gpu-normal", "gpu-low"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-worker"))


@pytest.fixture
def gpu_backend(db, tiny_model_dir) -> Backend:
    backend = Backend.objects.create(
        name="tiny", kind=BackendKind.HF_LOCAL, model=str(tiny_model_dir), pool="gpu", config=dict(TEST_CONFIG)
    )
    policies.activate(RoutingPolicy.objects.create(name="gpu", strategy="ordered", params={"order": ["tiny"]}))
    return backend


def submit(api, prompt: str, **body) -> str:
    r = api.post("/jobs", {"prompt": prompt, "backend": "tiny", "max_tokens": 6, **body}, format="json")
    assert r.status_code == 202, r.content
    return r.json()["id"]


def metrics_text() -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    from orchestrator_site.metrics import FleetCollector

    registry = CollectorRegistry()
    registry.register(FleetCollector())
    return generate_latest(registry).decode()


def gpu_worker(max_jobs: int = 64, round_tokens: int = 128) -> GpuWorker:
    worker = GpuWorker(QUEUES, connection=redis_client())
    worker.batch_limits = BatchLimits(max_jobs=max_jobs, wait_s=0.01, round_tokens=round_tokens)
    return worker


def work(max_jobs: int = 64, round_tokens: int = 128) -> GpuWorker:
    worker = gpu_worker(max_jobs, round_tokens)
    worker.work(burst=True)
    return worker


def alone(backend: Backend, prompt: str, max_tokens: int = 6) -> str:
    """The answer ``prompt`` gets on its own, as a job's row keeps it (``storable``)."""
    request = GenerationRequest(job_id="x", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
    cfg = BackendConfig(name=backend.name, kind=backend.kind, model=backend.model, config=backend.config)
    return storable(HFLocalAdapter().generate(cfg, request).output)


def test_waiting_jobs_run_as_one_batch_each_with_its_own_result(api, gpu_backend):
    prompts = ["first prompt", "second, longer prompt", "3", "the fourth one"]
    ids = [submit(api, p) for p in prompts]
    assert Job.objects.get(pk=ids[0]).queue == "gpu-normal"
    worker = work()
    jobs = [Job.objects.get(pk=i) for i in ids]
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 4
    assert [j.output for j in jobs] == [alone(gpu_backend, p) for p in prompts]
    assert [j.prompt_tokens for j in jobs] == [len(p.encode()) for p in prompts]
    assert all(j.completion_tokens <= 6 and j.finish_reason in ("length", "stop") for j in jobs)
    assert all(j.worker == worker.name and j.latency_ms is not None and j.cost == 0 for j in jobs)
    assert all(j.attempts.get().outcome == AttemptOutcome.SUCCEEDED for j in jobs)
    status = redis_client().hgetall(STATUS_KEY.format(name=worker.name))
    assert int(status[b"batch_size"]) == 4  # one batch, not four
    # Nothing of RQ's is left behind: the rows hold the outcome, the RQ job hashes are deleted,
    # no registry keeps them (as for the thread workers' own tasks).
    conn = redis_client()
    assert StartedJobRegistry("gpu-normal", connection=conn).get_job_ids() == []
    assert FinishedJobRegistry("gpu-normal", connection=conn).get_job_ids() == []
    assert RQJob.fetch_many(ids, connection=conn, serializer="rq.serializers.JSONSerializer") == [None] * 4
    assert len(fair_queue.waiting_ids("gpu-normal")) == 0
    # Batched jobs feed the fleet metrics and the dashboard like any other job.
    text = metrics_text()
    assert 'llm_orchestrator_jobs_finished_total{backend="tiny",outcome="succeeded"} 4.0' in text


def test_batches_are_taken_in_priority_order(api, gpu_backend):
    order = ["low", "normal", "high", "normal", "high"]
    ids = [submit(api, f"{p} {n}", priority=p) for n, p in enumerate(order)]
    work(max_jobs=2)
    started = {i: Job.objects.get(pk=i).started_at for i in ids}
    by = {p: [started[i] for i, q in zip(ids, order, strict=True) if q == p] for p in ("high", "normal", "low")}
    assert max(by["high"]) < min(by["normal"]) and max(by["normal"]) < min(by["low"])
    assert Job.objects.filter(state=JobState.SUCCEEDED).count() == 5


def test_a_bad_job_fails_alone_and_the_batch_succeeds(api, gpu_backend):
    good = [submit(api, "fine one"), submit(api, "fine two")]
    too_long = submit(api, "x" * 300)  # past the tiny model's 256-token context
    work()
    bad = Job.objects.get(pk=too_long)
    assert bad.state == JobState.FAILED and "exceeds the model's context of 256 tokens" in bad.error
    assert bad.attempts.get().outcome == AttemptOutcome.FAILED
    assert [Job.objects.get(pk=i).state for i in good] == [JobState.SUCCEEDED] * 2


def test_a_crashing_batch_is_split_until_the_bad_job_is_alone(api, tmp_path):
    """A real crash inside ``generate``: a model whose vocabulary (100 ids) is smaller than its
    tokenizer's, so a prompt with a space (byte-level id 223) indexes past the embedding table.
    The batch of 8 is tried in halves: the good jobs finish in the halves without a failed attempt,
    the bad one ends up alone and goes the one-job way, where it fails with its traceback."""
    path = save_tiny_model(tmp_path / "small-vocab", vocab_size=100)
    Backend.objects.create(name="tiny", kind=BackendKind.HF_LOCAL, model=str(path), pool="gpu", config=TEST_CONFIG)
    policies.activate(RoutingPolicy.objects.create(name="gpu", strategy="ordered", params={"order": ["tiny"]}))
    good = [submit(api, f"greedy{n}") for n in range(6)]
    bad = submit(api, "has a space")
    good.append(submit(api, "sampled", temperature=0.7))
    work()
    job = Job.objects.get(pk=bad)
    assert job.state == JobState.FAILED and "IndexError" in job.error
    # Its batch's call (closed as failed), then the call alone, which crashed: errored, traceback kept.
    attempts = list(job.attempts.order_by("number"))
    assert [a.outcome for a in attempts] == [AttemptOutcome.FAILED, AttemptOutcome.ERRORED]
    assert "batch of 8 failed" in attempts[0].error and "Traceback" in attempts[1].traceback
    for job in (Job.objects.get(pk=i) for i in good):
        assert job.state == JobState.SUCCEEDED, job.error
        assert list(job.attempts.values_list("outcome", flat=True)) == [AttemptOutcome.SUCCEEDED]
    # The batch was one call: one failure for the breaker, not eight (5 in a row open it).
    assert circuit.status("tiny").state == "closed"


def test_a_long_job_continues_across_rounds_with_the_same_answer(api, gpu_backend):
    long_id = submit(api, "long one", max_tokens=20)
    work(round_tokens=4)
    job = Job.objects.get(pk=long_id)
    assert job.state == JobState.SUCCEEDED
    assert job.output == alone(gpu_backend, "long one", 20)


def test_canceled_job_is_skipped(api, gpu_backend):
    keep, cancel = submit(api, "keep"), submit(api, "cancel me")
    assert Job.objects.get(pk=cancel).cancel()
    work()
    assert Job.objects.get(pk=keep).state == JobState.SUCCEEDED
    assert Job.objects.get(pk=cancel).state == JobState.CANCELED


@pytest.mark.slow
def test_end_to_end_through_a_real_gpu_worker_process(api, gpu_backend):
    prompts = ["one", "two two", "three three three"]
    ids = [submit(api, p, priority="high" if n == 0 else "normal") for n, p in enumerate(prompts)]
    cmd = [sys.executable, "manage.py", "rqworker", *QUEUES, "--burst"]
    cmd += ["--worker-class", "workers.runtime.gpu.GpuWorker"]
    proc = subprocess.run(cmd, cwd=ROOT, env=process_env(BATCH_MAX="8"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    jobs = [Job.objects.get(pk=i) for i in ids]
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 3, [j.error for j in jobs]
    assert [j.output for j in jobs] == [alone(gpu_backend, p) for p in prompts]
    r = api.get(f"/jobs/{ids[2]}/result")
    assert r.status_code == 200 and r.json()["output"] == jobs[2].output
    assert r.json()["usage"]["prompt_tokens"] == len(prompts[2])


def test_a_gpu_worker_warms_its_model_up_for_a_full_round_of_its_batches(db, tmp_path):
    """The preload decodes one round at ``BATCH_MAX`` rows x ``BATCH_ROUND_TOKENS`` tokens, so the
    first batch does not pay the cold costs that grow with the sequence length (on a GPU: seconds)."""
    import torch
    from transformers import LlamaForCausalLM

    path = save_tiny_model(tmp_path / "fresh")  # not resident yet: this preload loads it
    Backend.objects.create(name="fresh", kind=BackendKind.HF_LOCAL, model=str(path), pool="gpu", config=TEST_CONFIG)
    rows: list[int] = []

    def count(module, args, output):
        if isinstance(module, LlamaForCausalLM):
            rows.append(output.logits.shape[0])

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        worker = GpuWorker(QUEUES, connection=redis_client())
        worker.batch_limits = BatchLimits(max_jobs=8, wait_s=0.01, round_tokens=12)
        worker.preload()
    finally:
        hook.remove()
    assert rows.count(8) == 12  # one forward per new token, all 8 rows
    assert rows.count(1) >= 1 and set(rows) == {1, 8}
    assert any(m["path"] == str(path) for m in hf_local.resident_models())


# --- doing the damage for real: a GPU worker killed with SIGKILL ------------------------------------
GPU_WORKER = "workers.runtime.gpu.GpuWorker"
FAST_RECOVERY = {"WORKER_HEARTBEAT_MS": "300", "WORKER_LEASE_TTL_MS": "1500", "RECONCILE_INTERVAL_MS": "500"}


def wait_for_state(ids: list[str], state: str, timeout: float) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = list(Job.objects.filter(pk__in=ids))
        if all(j.state == state for j in jobs):
            return jobs
        time.sleep(0.05)
    raise AssertionError(f"not all {state} after {timeout}s: {[(j.state, j.error) for j in jobs]}")


def full_length_prompts(backend: Backend, n: int, max_tokens: int) -> list[str]:
    """``n`` prompts the tiny random model answers without an early EOS (so a batch of them runs
    for all of ``max_tokens`` rounds), picked with one batched call."""
    cfg = BackendConfig(name=backend.name, kind=backend.kind, model=backend.model, config=backend.config)
    candidates = [f"survive {i}" for i in range(120)]
    requests = [
        GenerationRequest(job_id=str(i), messages=[{"role": "user", "content": p}], max_tokens=max_tokens)
        for i, p in enumerate(candidates)
    ]
    results = HFLocalAdapter().generate_batch(cfg, requests)
    picked = [p for p, r in zip(candidates, results, strict=True) if r.completion_tokens == max_tokens]
    assert len(picked) >= n, f"only {len(picked)} of {len(candidates)} prompts run to {max_tokens} tokens"
    return picked[:n]


@pytest.mark.slow
def test_a_sigkilled_gpu_workers_batch_finishes_on_another_worker(api, gpu_backend, worker_process):
    prompts = full_length_prompts(gpu_backend, 3, 200)
    ids = [submit(api, p, max_tokens=200) for p in prompts]
    # One token per round: the batch takes a couple of hundred rounds, time enough to kill it mid-way.
    first = worker_process(*QUEUES, worker_class=GPU_WORKER, BATCH_ROUND_TOKENS="1", **FAST_RECOVERY)
    lost = {j.worker for j in wait_for_state(ids, JobState.RUNNING, timeout=60)}
    assert len(lost) == 1
    os.kill(first.pid, signal.SIGKILL)  # no cleanup: its heartbeat just stops
    first.wait()
    worker_process(*QUEUES, worker_class=GPU_WORKER, **FAST_RECOVERY)
    jobs = {j.pk: j for j in wait_for_state(ids, JobState.SUCCEEDED, timeout=60)}
    for job_id, prompt in zip(ids, prompts, strict=True):
        job = jobs[uuid.UUID(job_id)]
        assert job.attempt_count == 2 and job.completion_tokens == 200
        assert job.output == alone(gpu_backend, prompt, 200)  # the rerun starts over: the same answer
        outcomes = list(job.attempts.order_by("number").values_list("outcome", "worker"))
        assert outcomes[0] == (AttemptOutcome.INTERRUPTED, *lost) and outcomes[1][0] == AttemptOutcome.SUCCEEDED


@pytest.mark.slow
def test_jobs_a_gpu_worker_popped_but_never_claimed_are_pushed_again(api, gpu_backend, worker_process):
    ids = [submit(api, f"popped {n}") for n in range(3)]
    # Ten seconds' wait to fill the batch: the worker holds the popped jobs, unclaimed, when it dies.
    first = worker_process(*QUEUES, worker_class=GPU_WORKER, BATCH_WAIT_MS="10000", **FAST_RECOVERY)
    deadline = time.monotonic() + 60
    while len(fair_queue.waiting_ids("gpu-normal")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert len(fair_queue.waiting_ids("gpu-normal")) == 0, first.log_path.read_text()[-3000:]
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert {j.state for j in Job.objects.filter(pk__in=ids)} == {JobState.QUEUED}
    worker_process(*QUEUES, worker_class=GPU_WORKER, **FAST_RECOVERY)  # its reconciler pushes them again
    jobs = wait_for_state(ids, JobState.SUCCEEDED, timeout=60)
    assert all(j.attempt_count == 1 for j in jobs)


def test_a_batch_costs_the_same_database_statements_whatever_its_size(api, gpu_backend):
    """Claims and results are written for the whole batch at once, not per job (on a fast GPU a
    batch of short answers takes well under a second; per-job writes would cost a large share)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    counts = []
    for n in (2, 8):
        ids = [submit(api, f"batch of {n}, job {i}") for i in range(n)]
        with CaptureQueriesContext(connection) as queries:
            work()
        assert {j.state for j in Job.objects.filter(pk__in=ids)} == {JobState.SUCCEEDED}
        counts.append(len(queries))
    assert counts[0] == counts[1], counts


def refuse_job_updates(should_refuse):
    """Make the database refuse batched ``UPDATE`` statements of the job table that
    ``should_refuse(rows)`` picks (``rows``: each row's parameters, as text): the failure comes from
    where the database's would (Django's ``execute_wrapper``), and all of our write path runs."""
    from django.db import connection

    prefix = f"UPDATE {connection.ops.quote_name(Job._meta.db_table)} "

    def wrapper(execute, sql, params, many, context):
        if many and sql.startswith(prefix):
            should_refuse([[str(v).replace("-", "") for v in row] for row in params])
        return execute(sql, params, many, context)

    return connection.execute_wrapper(wrapper)


def test_a_result_the_database_refuses_fails_alone(api, gpu_backend):
    from django.db import DataError

    ids = [submit(api, p) for p in ("fine one", "poison", "fine two")]
    poisoned = ids[1].replace("-", "")

    def refuse(rows):
        if any(poisoned in row for row in rows):
            raise DataError("value refused")  # as PostgreSQL refuses a row, failing its whole statement

    with refuse_job_updates(refuse):
        work()
    states = {i: Job.objects.get(pk=i) for i in ids}
    assert [states[i].state for i in ids] == [JobState.SUCCEEDED, JobState.FAILED, JobState.SUCCEEDED]
    bad = states[ids[1]]
    assert "DataError" in bad.error and bad.attempts.get().outcome == AttemptOutcome.ERRORED


def test_result_writes_wait_out_a_database_outage_however_long(api, gpu_backend, monkeypatch):
    """Giving up would leave the jobs running on a live worker for good; meanwhile the worker's
    status (the admin's worker list) says how many results wait."""
    from django.db import OperationalError

    from workers.fleet.status import read_workers
    from workers.runtime import group_commit as module

    monkeypatch.setattr(module, "RETRY_PAUSE_S", 0.001)
    ids = [submit(api, f"outage {n}") for n in range(3)]
    worker = gpu_worker()
    refusals, shown = [], []

    def down(rows):
        if len(refusals) < 150:  # the worker used to give up after 120 tries
            refusals.append(len(rows))
            if len(refusals) == 5:
                worker.publish_status()
                shown.extend(w.unwritten for w in read_workers() if w.name == worker.name)
            raise OperationalError("server closed the connection unexpectedly")

    with refuse_job_updates(down):
        worker.work(burst=True)
    assert set(refusals) == {3} and shown == [3]  # the whole batch, tried again as one
    assert {Job.objects.get(pk=i).state for i in ids} == {JobState.SUCCEEDED}
    assert worker.unwritten() == 0


def test_a_worker_stopped_during_an_outage_leaves_its_jobs_to_recovery(api, gpu_backend, monkeypatch, settings):
    """After the stop's grace, results that cannot be written are not turned into failures: the
    rows stay running, the worker leaves, and crash recovery runs the jobs again."""
    from django.db import OperationalError, connection

    from workers.runtime import group_commit as module

    monkeypatch.setattr(module, "RETRY_PAUSE_S", 0.001)
    settings.WORKER_SHUTDOWN_GRACE_S = 0  # the stop's grace is over as soon as it is asked
    ids = [submit(api, f"stopped {n}") for n in range(3)]
    worker = gpu_worker()
    refusals = []

    def database_down(execute, sql, params, many, context):
        # The round's result write is refused three times, the third with a stop on its way; the
        # database answers again right after, so a worker that went on writing would show it here.
        if sql.startswith(("UPDATE", "INSERT")) and (many or refusals) and len(refusals) < 3:
            refusals.append(sql[:30])
            if len(refusals) == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # the worker's own handler (RQ's warm stop) takes it
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(database_down):
        worker.work(burst=True)
    jobs = [Job.objects.get(pk=i) for i in ids]
    assert [j.state for j in jobs] == [JobState.RUNNING] * 3 and not any(j.error for j in jobs)
    assert {j.attempts.get().outcome for j in jobs} == {AttemptOutcome.RUNNING}  # open: recovery closes it


@pytest.mark.slow
def test_a_stopped_gpu_worker_hands_its_batch_back_after_the_grace(api, gpu_backend, worker_process):
    prompts = full_length_prompts(gpu_backend, 2, 200)
    ids = [submit(api, p, max_tokens=200) for p in prompts]
    first = worker_process(
        *QUEUES, worker_class=GPU_WORKER, BATCH_ROUND_TOKENS="1", WORKER_SHUTDOWN_GRACE_MS="300", **FAST_RECOVERY
    )
    wait_for_state(ids, JobState.RUNNING, timeout=60)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 0, first.log_path.read_text()[-3000:]
    jobs = list(Job.objects.filter(pk__in=ids))
    assert {j.state for j in jobs} == {JobState.QUEUED}  # back in line, not left running for the reconciler
    assert {j.attempts.get().outcome for j in jobs} == {AttemptOutcome.INTERRUPTED}
    assert "grace 0.3s" in jobs[0].attempts.get().error
    assert len(fair_queue.waiting_ids("gpu-normal")) == 2
    worker_process(*QUEUES, worker_class=GPU_WORKER, **FAST_RECOVERY)
    for job in wait_for_state(ids, JobState.SUCCEEDED, timeout=60):
        assert job.attempt_count == 2 and job.output == alone(gpu_backend, prompts[ids.index(str(job.pk))], 200)


@pytest.mark.slow
def test_a_job_arriving_during_a_long_batch_joins_it_and_finishes_first(api, gpu_backend, worker_process):
    [long_prompt] = full_length_prompts(gpu_backend, 1, 200)
    long_id = submit(api, long_prompt, max_tokens=200)
    worker_process(*QUEUES, worker_class=GPU_WORKER, BATCH_ROUND_TOKENS="2")  # ~100 rounds for the long job
    [long_job] = wait_for_state([long_id], JobState.RUNNING, timeout=60)
    late_id = submit(api, "late and short", max_tokens=4)
    [late] = wait_for_state([late_id], JobState.SUCCEEDED, timeout=60)
    assert Job.objects.get(pk=long_id).state == JobState.RUNNING  # joined between rounds, did not wait
    [long_job] = wait_for_state([long_id], JobState.SUCCEEDED, timeout=60)
    assert late.worker == long_job.worker and long_job.started_at < late.started_at
    assert late.finished_at < long_job.finished_at
    assert late.output == alone(gpu_backend, "late and short", 4)
    assert long_job.output == alone(gpu_backend, long_prompt, 200)  # joining did not change the long answer
