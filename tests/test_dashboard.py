"""The live operator dashboard (/admin/dashboard/): panels, refresh endpoints, aggregates, access, cost."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from dashboard import aggregates
from jobs import queueing
from jobs.models import Job, JobState
from orchestrator_site.redis import redis_client
from routing import stats
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import ROOT, process_env, run_worker_burst
from tests.factories import make_job
from workers.execution.run_facts import AttemptFacts, RunFacts
from workers.execution.run_figures import record_fleet_figures
from workers.fleet.status import GPU_STATUS_KEY, WorkerReport, publish

pytestmark = pytest.mark.django_db

URL = "/admin/dashboard/"


def run_facts(
    job: Job | None = None,
    *,
    backend: str = "dev",
    state: str = "succeeded",
    wait_s: float = 0.5,
    exec_s: float = 1.0,
    cost: str | None = "0.25",
    finished_ago_s: float = 30,
) -> RunFacts:
    """What a worker reports for one finished execution (as ``run_facts.read_run`` builds it)."""
    finished = timezone.now() - timedelta(seconds=finished_ago_s)
    started = finished - timedelta(seconds=exec_s)
    enqueued = started - timedelta(seconds=wait_s)
    return RunFacts(
        job_id=str(job.pk) if job else "00000000-0000-0000-0000-000000000000",
        queue="normal",
        state=state,
        backend=backend,
        policy="default",
        enqueued_at=enqueued,
        started_at=started,
        finished_at=finished,
        prompt_tokens=10,
        completion_tokens=5,
        cost=Decimal(cost) if cost else None,
        attempts=[
            AttemptFacts(
                number=1,
                backend=backend,
                outcome=state,
                error="",
                latency_s=exec_s,
                started_at=started,
                finished_at=finished,
            )
        ],
    )


def read_window() -> aggregates.Window:
    pipe = redis_client().pipeline(transaction=False)
    parse = aggregates.queue_read(pipe)
    return parse(pipe.execute())


# --- access and mounting ---------------------------------------------------------------------------
def test_url_is_admin_dashboard():
    assert reverse("admin:dashboard") == URL
    assert reverse("admin:dashboard_panels") == URL + "panels/"
    assert reverse("admin:dashboard_data") == URL + "data/"


@pytest.mark.parametrize("path", [URL, URL + "panels/", URL + "data/"])
def test_dashboard_and_its_refresh_endpoints_need_a_staff_login(client, user, path):
    r = client.get(path)
    assert r.status_code == 302 and r["Location"].startswith("/admin/login/")
    client.force_login(user)  # logged in, but not staff
    r = client.get(path)
    assert r.status_code == 302 and r["Location"].startswith("/admin/login/")


def test_admin_index_links_the_dashboard(admin_client):
    html = admin_client.get("/admin/").content.decode()
    assert 'id="live-dashboard-link"' in html
    assert f'href="{URL}"' in html
    # the app-list entry opens the dashboard too
    r = admin_client.get("/admin/dashboard/dashboard/")
    assert r.status_code == 302 and r["Location"] == URL


# --- the page ----------------------------------------------------------------------------------------
@pytest.fixture
def busy_system(dev_backend, policy):
    """Something in every panel: queued RQ jobs, finished runs, live backend figures, a GPU worker."""
    gpu = Backend.objects.create(name="gpu-llama", kind=BackendKind.HF_LOCAL, pool="gpu", max_concurrency=4)
    RoutingPolicy.objects.create(name="cheap", strategy="ordered", params={"order": ["dev"]})
    queued = make_job(dev_backend, policy_name="default", priority="high", queue="high")
    queued.enqueued_at = timezone.now()
    queued.save()
    queueing.enqueue(queued)
    done = make_job(dev_backend, policy_name="default", state=JobState.SUCCEEDED)
    make_job(gpu, policy_name="old-policy")
    record_fleet_figures(run_facts(done, wait_s=0.2, exec_s=1.5))
    record_fleet_figures(run_facts(backend="dev", state="failed", cost=None))
    stats.record_call("dev", latency_ms=120, ok=True)
    stats.record_call("dev", latency_ms=80, ok=False, error="HTTP 503 from upstream")
    publish(
        WorkerReport(
            name="gpu-box.1",
            host="gpu-box",
            pid=42,
            queues=["gpu-high", "gpu-normal"],
            state="busy",
            in_flight=3,
            max_concurrency=8,
            unwritten=2,
        )
    )
    client = redis_client()
    client.hset(
        GPU_STATUS_KEY.format(name="gpu-box.1"),
        mapping={"models": json.dumps([{"path": "Qwen/Qwen2.5-0.5B"}]), "batch_size": 64, "tokens_per_s": 1234.5},
    )
    return {"queued": queued, "done": done, "gpu": gpu}


def section(html: str, panel_id: str) -> str:
    match = re.search(rf'<section[^>]*id="{panel_id}".*?</section>', html, re.S)
    assert match, panel_id
    return match.group(0)


def test_page_shows_every_panel_with_data(admin_client, busy_system, policy):
    r = admin_client.get(URL)
    assert r.status_code == 200
    html = r.content.decode()

    queues = section(html, "dash-queues")
    assert re.search(r'data-queue="high"><th scope="row">high</th><td class="num">1</td>', queues)
    assert "<svg" in queues  # throughput chart
    assert 'id="dash-succeeded-rate"' in queues and 'id="dash-failed-rate"' in queues

    latency = section(html, "dash-latency")
    assert 'data-backend="dev"' in latency and latency.count("<svg") >= 2
    assert "1.5 s" in latency or "1.4 s" in latency  # execution percentiles of the one 1.5 s sample

    routing = section(html, "dash-routing")
    assert reverse("admin:routing_routingpolicy_change", args=[policy.pk]) in routing
    cheap = RoutingPolicy.objects.get(name="cheap")
    assert reverse("admin:routing_routingpolicy_activate", args=[cheap.pk]) in routing
    assert reverse("admin:routing_routingpolicy_changelist") in routing
    assert 'data-backend="dev"' in routing and "1 more job" in routing  # the old-policy job

    backends = section(html, "dash-backends")
    assert "HTTP 503 from upstream" in backends and "closed" in backends
    assert "0 / 16" in backends and "0 / 4" in backends  # in flight / max_concurrency
    assert "0.2500" in backends  # cost today: the succeeded run's

    workers = section(html, "dash-workers")
    assert "gpu-box.1" in workers and "gpu-high, gpu-normal" in workers and "3 / 8" in workers
    assert "Qwen/Qwen2.5-0.5B" in workers and "batch 64" in workers and "1234.5 tokens/s" in workers
    assert "2 results waiting for the database" in workers

    recent = section(html, "dash-recent")
    for job in (busy_system["queued"], busy_system["done"]):
        assert f'<tr data-job-id="{job.pk}" data-state="{job.state}">' in recent
        assert reverse("admin:jobs_job_change", args=[job.pk]) in recent


def test_recent_jobs_are_the_last_twenty_with_the_markup_browsers_wait_for(admin_client, dev_backend):
    now = timezone.now()
    jobs = [make_job(dev_backend, created_at=now - timedelta(seconds=i)) for i in range(25)]
    jobs[0].mark_running("w1")
    html = section(admin_client.get(URL).content.decode(), "dash-recent")
    rows = re.findall(r'<tr data-job-id="([0-9a-f-]{36})" data-state="(\w+)">', html)
    assert [r[0] for r in rows] == [str(j.pk) for j in jobs[:20]]
    assert rows[0][1] == "running"


def test_page_has_no_external_scripts_or_styles(admin_client, busy_system):
    html = admin_client.get(URL).content.decode()
    assert not re.search(r"<script[^>]+src=[\"']?(https?:)?//", html, re.I)
    assert not re.search(r"<link[^>]+href=[\"']?(https?:)?//", html, re.I)
    assert not re.search(r"@import\s+url\([\"']?(https?:)?//", html, re.I)
    assert "/static/dashboard/dashboard.js" in html and "/static/dashboard/dashboard.css" in html


def test_panels_fragment_is_what_the_script_swaps_in(admin_client, busy_system):
    r = admin_client.get(URL + "panels/")
    assert r.status_code == 200 and r["X-Dashboard-Fragment"] == "1"
    assert "no-cache" in r["Cache-Control"] or "max-age=0" in r["Cache-Control"]
    html = r.content.decode()
    assert "<html" not in html and 'class="dash-grid"' in html
    assert f'<tr data-job-id="{busy_system["done"].pk}" data-state="succeeded">' in html
    page = admin_client.get(URL).content.decode()
    assert 'id="dashboard-panels"' in page and f'data-refresh-url="{URL}panels/"' in page


def test_refresh_shows_a_state_change(admin_client, dev_backend):
    job = make_job(dev_backend)
    assert f'data-job-id="{job.pk}" data-state="queued"' in admin_client.get(URL + "panels/").content.decode()
    job.mark_running("w1")
    job.mark_succeeded(output="ok", finish_reason="stop", prompt_tokens=1, completion_tokens=1, latency_ms=3, cost=None)
    assert f'data-job-id="{job.pk}" data-state="succeeded"' in admin_client.get(URL + "panels/").content.decode()


def test_json_has_the_same_figures(admin_client, busy_system):
    data = admin_client.get(URL + "data/").json()
    assert {k: v for k, v in data["queues"][0].items() if k != "oldest_age_s"} == {"name": "high", "depth": 1}
    assert data["queues"][0]["oldest_age_s"] is not None
    assert data["policy"] == "default" and data["routing"] == {"dev": 2} and data["routing_other_policies"] == 1
    dev = next(b for b in data["backends"] if b["name"] == "dev")
    assert dev["last_error"] == "HTTP 503 from upstream" and dev["cost_today"] == pytest.approx(0.25)
    assert data["workers"][0]["gpu"]["batch_size"] == "64"
    assert [r["id"] for r in data["recent"]][:1] == [str(Job.objects.order_by("-created_at")[0].pk)]


@pytest.mark.parametrize("n_jobs", [3, 120])
def test_query_count_does_not_grow_with_the_jobs(
    admin_client, busy_system, dev_backend, n_jobs, django_assert_max_num_queries
):
    Job.objects.bulk_create(
        [
            Job(prompt="x", timeout_s=30, backend=dev_backend, backend_name="dev", policy_name="default")
            for _ in range(n_jobs)
        ]
    )
    # session + user, then backends, policies, routing counts, recent jobs
    with django_assert_max_num_queries(6):
        assert admin_client.get(URL + "panels/").status_code == 200


# --- aggregates ------------------------------------------------------------------------------------------
def test_record_run_writes_the_minute_aggregates_and_todays_cost():
    record_fleet_figures(run_facts(wait_s=0.2, exec_s=2.0, cost="0.5"))
    record_fleet_figures(run_facts(state="failed", wait_s=0.2, exec_s=0.01, cost=None))
    record_fleet_figures(run_facts(backend="other", state="canceled", cost=None))
    window = read_window()
    dev = window.backends["dev"]
    assert dev.total("succeeded") == 1 and dev.total("failed") == 1
    assert window.backends["other"].total("canceled") == 1
    assert sum(dev.wait) == 2  # wait counts every started run
    assert sum(dev.execution) == 1  # execution only the succeeded one: failing fast must not look fast
    assert window.cost_today == {"dev": pytest.approx(0.5)}
    keys = redis_client().keys(aggregates.count_key("*")) + redis_client().keys(aggregates.hist_key("*"))
    assert len(keys) >= 2 and all(0 < redis_client().ttl(k) <= aggregates.TTL_S for k in keys)
    assert 0 < redis_client().ttl(aggregates.cost_key(timezone.localdate())) <= aggregates.DAY_TTL_S


def test_a_run_that_did_not_finish_records_nothing():
    run = run_facts()
    unfinished = RunFacts(**{**run.__dict__, "state": "running", "finished_at": None})
    record_fleet_figures(unfinished)
    assert read_window().backends == {}


def test_percentiles_of_known_samples():
    # 100 executions: 1..100 ms -> p50 50 ms, p95 95 ms, p99 99 ms (within one bucket: at most 12% off)
    for ms in range(1, 101):
        record_fleet_figures(run_facts(exec_s=ms / 1000, wait_s=2.0, cost=None))
    dev = read_window().backends["dev"]
    q = aggregates.quantile
    assert q(dev.execution, 0.50) == pytest.approx(0.050, rel=0.122)
    assert q(dev.execution, 0.95) == pytest.approx(0.095, rel=0.122)
    assert q(dev.execution, 0.99) == pytest.approx(0.099, rel=0.122)
    assert q(dev.wait, 0.5) == pytest.approx(2.0, rel=0.122) and q(dev.wait, 0.99) == pytest.approx(2.0, rel=0.122)


def test_quantile_edges():
    hist = [0] * aggregates.N_BUCKETS
    assert aggregates.quantile(hist, 0.5) is None
    hist[aggregates.bucket_index(0.1)] = 10  # 0.1 s is a bucket bound exactly
    assert aggregates.quantile(hist, 1.0) == pytest.approx(0.1)
    hist = [0] * aggregates.N_BUCKETS
    hist[-1] = 1  # beyond the last bound: the largest value the histogram can tell
    assert aggregates.quantile(hist, 0.5) == aggregates.BOUNDS_S[-1]
    assert aggregates.bucket_index(-1) == 0


def test_minutes_older_than_the_window_are_left_out():
    record_fleet_figures(run_facts(finished_ago_s=aggregates.WINDOW_MIN * 60 + 120))
    record_fleet_figures(run_facts(finished_ago_s=5))
    assert read_window().backends["dev"].total("succeeded") == 1


def test_a_broken_run_is_logged_never_raised(caplog):
    bad = RunFacts(**{**run_facts().__dict__, "started_at": "not a datetime"})
    pipe = redis_client().pipeline(transaction=False)
    aggregates.record(pipe, bad)  # as record_run calls it, just before its pipe.execute()
    pipe.execute()
    assert "dashboard figures not recorded" in caplog.text


# --- end to end: a real worker process feeds the page ---------------------------------------------------
@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_job_run_by_a_worker_process_shows_up_on_the_dashboard(staff_api, admin_client, policy):
    r = staff_api.post("/jobs", {"prompt": "hello dashboard"}, format="json")
    assert r.status_code == 202, r.content
    job_id = r.json()["id"]
    assert f'data-job-id="{job_id}" data-state="queued"' in admin_client.get(URL + "panels/").content.decode()
    run_worker_burst()
    data = admin_client.get(URL + "data/").json()
    assert data["recent"][0] == {"id": job_id, "state": "succeeded", "priority": "normal", "backend": "dev"}
    latency = {r["backend"]: r for r in data["latency"]}
    assert latency["dev"]["execution_samples"] == 1 and latency["dev"]["wait_samples"] == 1
    html = admin_client.get(URL + "panels/").content.decode()
    assert f'data-job-id="{job_id}" data-state="succeeded"' in html


# --- Redis down: the database panels still show ----------------------------------------------------------
CLIENT = """
import django, json
django.setup()
from django.contrib.auth.models import User
from django.test import Client
c = Client()
c.force_login(User.objects.get(username="root"))
r = c.get("/admin/dashboard/")
print(json.dumps([r.status_code, r.content.decode()]))  # the last line: logs go to stdout too
"""


@pytest.mark.django_db(transaction=True)
def test_page_renders_without_redis(staff, dev_backend):
    job = make_job(dev_backend)
    env = process_env(REDIS_URL="redis://127.0.0.1:1/0")  # nothing listens on port 1
    proc = subprocess.run([sys.executable, "-c", CLIENT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status, html = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status == 200
    assert "Redis unavailable" in html
    assert f'<tr data-job-id="{job.pk}" data-state="queued">' in html
