"""``GET /jobs/<id>``: a queued job's ``queue_position`` and ``eta_s``; cancel gives the place up."""

from __future__ import annotations

import pytest

from jobs import fair_queue, queue_position
from tests.conftest import submit_jobs

pytestmark = pytest.mark.django_db(transaction=True)


def test_queued_jobs_report_their_position_and_no_eta_without_a_drain_rate(api, policy):
    ids = submit_jobs(api, 3)
    high = submit_jobs(api, 1, priority="high")[0]
    docs = [api.get(f"/jobs/{i}").json() for i in ids]
    assert [d["queue_position"] for d in docs] == [2, 3, 4]  # the high job goes first
    assert api.get(f"/jobs/{high}").json()["queue_position"] == 1
    assert all(d["eta_s"] is None for d in docs)


def test_eta_follows_the_measured_drain_rate(api, policy):
    ids = submit_jobs(api, 4)
    client = fair_queue.redis_client()
    for k in fair_queue.drain_keys("normal"):
        client.set(k, 20)  # 120 jobs in the last minute: 2 per second
    assert api.get(f"/jobs/{ids[3]}").json()["eta_s"] == 2.0


def test_a_canceled_job_gives_up_its_place(api, policy):
    ids = submit_jobs(api, 3)
    assert api.post(f"/jobs/{ids[0]}/cancel").status_code == 200
    assert api.get(f"/jobs/{ids[0]}").json()["queue_position"] is None
    assert api.get(f"/jobs/{ids[2]}").json()["queue_position"] == 2
    assert fair_queue.depths(["normal"]) == {"normal": 2}


def test_pool_queues_rank_behind_their_own_pools_higher_priorities():
    assert queue_position.pool_queues("gpu-low") == (["gpu-high", "gpu-normal"], ["gpu-high", "gpu-normal", "gpu-low"])
    assert queue_position.pool_queues("high") == ([], ["high", "normal", "low"])


def test_the_jobs_admin_page_shows_its_queue_position(api, policy, admin_client):
    ids = submit_jobs(api, 2)
    page = admin_client.get(f"/admin/jobs/job/{ids[1]}/change/")
    assert page.status_code == 200
    assert "2, no drain rate measured yet" in page.content.decode()
