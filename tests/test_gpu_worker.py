"""The GPU worker: jobs submitted over the API, batched from Redis, each finished in the database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry

from jobs.models import AttemptOutcome, Job, JobState
from orchestrator_site.redis import redis_client
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import ROOT, process_env
from tests.gpu_model import save_tiny_model
from workers.backends.base import BackendConfig, GenerationRequest
from workers.backends.hf_local import HFLocalAdapter
from workers.gpu_worker import STATUS_KEY, BatchLimits, GpuWorker

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
        name="tiny", kind=BackendKind.HF_LOCAL, model=str(tiny_model_dir), pool="gpu", config={"device": "cpu"}
    )
    RoutingPolicy.objects.create(name="gpu", strategy="ordered", params={"order": ["tiny"]}).activate()
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


def work(max_jobs: int = 64, round_tokens: int = 128) -> GpuWorker:
    worker = GpuWorker(QUEUES, connection=redis_client())
    worker.batch_limits = BatchLimits(max_jobs=max_jobs, wait_s=0.01, round_tokens=round_tokens)
    worker.work(burst=True)
    return worker


def alone(backend: Backend, prompt: str, max_tokens: int = 6) -> str:
    request = GenerationRequest(job_id="x", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
    cfg = BackendConfig(name=backend.name, kind=backend.kind, model=backend.model, config=backend.config)
    return HFLocalAdapter().generate(cfg, request).output


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
    # RQ's registries: every RQ job finished, none left as started.
    conn = redis_client()
    assert StartedJobRegistry("gpu-normal", connection=conn).get_job_ids() == []
    assert sorted(FinishedJobRegistry("gpu-normal", connection=conn).get_job_ids()) == sorted(ids)
    rq_jobs = RQJob.fetch_many(ids, connection=conn, serializer="rq.serializers.JSONSerializer")
    assert {j.get_status() for j in rq_jobs} == {JobStatus.FINISHED}
    assert {j.return_value() for j in rq_jobs} == {JobState.SUCCEEDED}
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


def test_a_crashing_batch_hands_its_jobs_to_the_one_job_path(api, gpu_backend):
    # top_p=-1 makes transformers refuse the whole sampling batch (two jobs); the greedy jobs
    # are another batch and must not notice.
    bad = [submit(api, f"sampled {n}", temperature=0.7, params={"top_p": -1}) for n in range(2)]
    good = [submit(api, "greedy"), submit(api, "greedy too")]
    work()
    for job in (Job.objects.get(pk=i) for i in bad):
        assert job.state == JobState.FAILED and "top_p" in job.error
        # The batched call (closed as failed), then the call alone, which crashed: errored, traceback kept.
        attempts = list(job.attempts.order_by("number"))
        assert [a.outcome for a in attempts] == [AttemptOutcome.FAILED, AttemptOutcome.ERRORED]
        assert "batch of 2 failed" in attempts[0].error and "Traceback" in attempts[1].traceback
    assert [Job.objects.get(pk=i).state for i in good] == [JobState.SUCCEEDED] * 2


def test_long_jobs_continue_across_rounds_and_late_jobs_join(api, gpu_backend):
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
    cmd += ["--worker-class", "workers.gpu_worker.GpuWorker"]
    proc = subprocess.run(cmd, cwd=ROOT, env=process_env(BATCH_MAX="8"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    jobs = [Job.objects.get(pk=i) for i in ids]
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 3, [j.error for j in jobs]
    assert [j.output for j in jobs] == [alone(gpu_backend, p) for p in prompts]
    r = api.get(f"/jobs/{ids[2]}/result")
    assert r.status_code == 200 and r.json()["output"] == jobs[2].output
    assert r.json()["usage"]["prompt_tokens"] == len(prompts[2])
