"""Faults done for real to a fleet on separate network hosts; each says what the clients saw and what
became of every accepted job: none lost, none with two results. Figures: docs/reliability.md.

The module shares one fleet (start-up is most of its cost); each test leaves it whole for the next.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis
from django.db import connections

from jobs import fair_queue
from jobs.models import Job, JobAttempt
from orchestrator_site.redis import async_client
from tests.fleet import rig
from tests.fleet.boot import WORKER_ENV, wait_workers
from tests.fleet.client import DB, Client, Stream, verdict, wait_terminal

pytestmark = pytest.mark.usefixtures("fleet_db")


def report(name: str, **figures: object) -> None:
    """One line per fault, picked up by `pytest -s` runs that fill docs/reliability.md."""
    print(f"\nFLEET {name} {json.dumps(figures, default=str)}")


@pytest.fixture
def client(fleet) -> Client:
    return Client({name: fleet.web_url(name) for name in rig.Fleet.WEBS}, fleet.token)


def test_every_web_host_takes_jobs_and_every_worker_host_runs_them(fleet, client):
    ids = [client.submit(f"warm up {i}") for i in range(12)]
    wait_terminal(ids, timeout=60)
    v = verdict(client.accepted)
    assert (v.succeeded, v.lost, v.written_twice, v.wrong_output) == (12, 0, 0, 0)
    hosts = {
        a.split("-")[0] for a in JobAttempt.objects.using(DB).filter(job_id__in=ids).values_list("worker", flat=True)
    }
    assert hosts == set(rig.Fleet.WORKERS), hosts  # each worker host took some of the 12 (4 slots each)
    assert {a.web for a in client.answers} == set(rig.Fleet.WEBS)


def test_web_host_dies_mid_request_and_the_retry_on_the_other_gets_the_same_job(fleet, client):
    """web1 is killed while it holds requests; each client sends its request again, with its key, to web2."""
    started = time.monotonic()
    with Stream(client, per_s=8, label="web-death") as stream:
        time.sleep(1.5)
        fleet.net.kill_host(fleet.hosts["web1"])
        killed = time.monotonic()
        time.sleep(2)
    assert not stream.errors, stream.errors[:3]
    replay_keys = {}
    for job_id in list(client.accepted)[:3]:  # the same key again gives the same job (not a second one)
        key = Job.objects.using(DB).get(pk=job_id).idempotency_key
        r = httpx.post(
            f"{fleet.web_url('web2')}/jobs",
            json={"prompt": client.accepted[job_id]},
            headers={"Authorization": f"Token {fleet.token}", "Idempotency-Key": key},
            timeout=10,
        )
        replay_keys[job_id] = (r.status_code, r.json()["id"])
    assert all(status == 200 and same == job_id for job_id, (status, same) in replay_keys.items()), replay_keys
    done = wait_terminal(list(client.accepted), timeout=60)
    v = verdict(client.accepted)
    statuses = client.statuses(since=started)
    report(
        "web-death",
        submitted=v.jobs,
        lost=v.lost,
        rerun=v.rerun,
        written_twice=v.written_twice,
        no_answer=statuses[0],
        answers=dict(statuses),
        all_done_after_kill_s=round(done - killed, 1),
    )
    assert (v.lost, v.written_twice, v.wrong_output, v.succeeded) == (0, 0, 0, v.jobs)
    assert statuses[500] == 0
    assert Job.objects.using(DB).filter(pk__in=list(client.accepted)).count() == v.jobs
    fleet.start_web("web1")  # back for the next test
    fleet.wait_web("web1")


def test_redis_primary_killed_sentinel_promotes_the_replica_and_no_job_is_lost(fleet, client):
    old = fleet.primary()
    replica = redis.Redis(fleet.hosts["redis2"].address, rig.REDIS_PORT, socket_timeout=2)
    push_sha = hashlib.sha1(fair_queue._PUSH.encode()).hexdigest()
    queued_before = [client.submit(f"before failover {i}") for i in range(24)]  # 12 slots: half wait in Redis
    started = time.monotonic()
    with Stream(client, per_s=6, label="failover") as stream:
        time.sleep(1)
        replica_knew_push = replica.script_exists(push_sha) == [True]
        killed = time.monotonic()
        fleet.net.kill_host(fleet.hosts["redis1"])
        deadline = time.monotonic() + 30
        while fleet.primary() == old and time.monotonic() < deadline:
            time.sleep(0.1)
        promoted = time.monotonic()
        time.sleep(6)
    assert not stream.errors, stream.errors[:3]
    assert fleet.primary() == fleet.hosts["redis2"].address
    # Lua scripts live in each server's own cache: the processes loaded theirs again (NOSCRIPT, then load).
    assert not replica_knew_push and replica.script_exists(push_sha) == [True]
    done = wait_terminal(list(client.accepted), timeout=90)
    v = verdict(client.accepted)
    during = [a for a in client.answers if a.at >= killed]
    refused = [a for a in during if a.status == 503]
    no_answer = [a for a in during if a.status == 0]
    ok_after = [a.at for a in during if a.status in (200, 202)]
    window = (max(a.at for a in refused) - killed) if refused else 0.0
    report(
        "redis-failover",
        submitted_during=sum(1 for a in during if a.status in (200, 202)),
        queued_before=len(queued_before),
        lost=v.lost,
        rerun=v.rerun,
        written_twice=v.written_twice,
        answers=dict(client.statuses(since=started)),
        promoted_after_s=round(promoted - killed, 1),
        last_503_after_s=round(window, 1),
        first_2xx_after_kill_s=round(min(ok_after) - killed, 1) if ok_after else None,
        all_done_after_kill_s=round(done - killed, 1),
    )
    assert client.statuses(since=started)[500] == 0
    assert all(a.retry_after for a in refused), "every 503 says when to retry"
    assert not no_answer, f"{len(no_answer)} submissions got no answer at all"
    assert window < 15, f"submissions refused for {window:.1f} s after the kill"
    assert (v.lost, v.written_twice, v.wrong_output, v.succeeded) == (0, 0, 0, v.jobs)
    assert v.rerun == 0, "a failover alone must not presume a worker dead"
    # The old primary comes back as a replica of the new one (Sentinel reconfigures it).
    fleet.start_redis_node("redis1", replica_of=None)
    deadline = time.monotonic() + 30
    node = redis.Redis(fleet.hosts["redis1"].address, rig.REDIS_PORT, socket_timeout=1)
    while time.monotonic() < deadline:
        try:
            if node.info("replication")["role"] == "slave":
                break
        except redis.RedisError:
            pass
        time.sleep(0.3)
    assert node.info("replication")["role"] == "slave"


def busy_worker_host(fleet, ids: list[str], timeout: float = 20) -> tuple[str, set]:
    """The worker host that holds the most of ``ids`` mid-call now, and those jobs."""
    deadline = time.monotonic() + timeout
    while True:
        running = JobAttempt.objects.using(DB).filter(job_id__in=ids, outcome="running")
        held: dict[str, set] = {}
        for job_id, worker in running.values_list("job_id", "worker"):
            held.setdefault(worker.split("-")[0], set()).add(job_id)
        if held:
            name = max(held, key=lambda h: len(held[h]))
            return name, held[name]
        assert time.monotonic() < deadline, "no worker host took any of the jobs"
        time.sleep(0.05)


def test_worker_host_killed_mid_run_its_jobs_run_elsewhere_once(fleet, client):
    ids = [client.submit(f"kill worker {i}") for i in range(12)]
    name, in_hand = busy_worker_host(fleet, ids)
    killed = time.monotonic()
    fleet.net.kill_host(fleet.hosts[name])
    done = wait_terminal(ids, timeout=60)
    v = verdict(client.accepted)
    report(
        "worker-kill",
        submitted=len(ids),
        in_hand_of_killed=len(in_hand),
        lost=v.lost,
        rerun=v.rerun,
        written_twice=v.written_twice,
        all_done_after_kill_s=round(done - killed, 1),
    )
    assert (v.lost, v.written_twice, v.wrong_output, v.succeeded) == (0, 0, 0, v.jobs)
    assert v.rerun >= len(in_hand) > 0  # at-least-once: the killed host's jobs were called again elsewhere
    fleet.start_worker(name, **WORKER_ENV)
    wait_workers(fleet, 3)


def test_worker_host_cut_off_its_leases_expire_and_its_late_results_are_refused(fleet, client):
    ids = [client.submit(f"cut worker {i}") for i in range(12)]
    name, in_hand = busy_worker_host(fleet, ids)
    host = fleet.hosts[name]
    cut, cut_wall = time.monotonic(), datetime.now(UTC)
    fleet.net.cut(host)
    try:
        done = wait_terminal(ids, timeout=40)
        time.sleep(max(0.0, 30 - (time.monotonic() - cut)))
    finally:
        fleet.net.plug(host)
    plugged = time.monotonic()
    time.sleep(8)  # the returning host tries to write what it finished while cut off
    v = verdict(client.accepted)
    by_cut_host = JobAttempt.objects.using(DB).filter(
        job_id__in=ids, outcome="succeeded", worker__startswith=f"{name}-"
    )
    late = by_cut_host.filter(finished_at__gt=cut_wall + timedelta(seconds=0.5))  # written after the cut
    report(
        "worker-cut-30s",
        submitted=len(ids),
        in_hand_of_cut=len(in_hand),
        lost=v.lost,
        rerun=v.rerun,
        written_twice=v.written_twice,
        all_done_after_cut_s=round(done - cut, 1),
        finished_by_cut_host_before_cut=by_cut_host.count() - late.count(),
        late_results_written=late.count(),
    )
    assert (v.lost, v.written_twice, v.wrong_output, v.succeeded) == (0, 0, 0, v.jobs)
    assert v.rerun >= len(in_hand) > 0
    assert not late.exists(), "the cut host's late results were refused (the fence on the job's version)"
    assert not by_cut_host.filter(job_id__in=in_hand).exists()
    assert host.procs[-1].poll() is None, f"the cut host's worker lives on:\n{fleet.logs(name)}"
    # Back on the network, every host takes work again.
    ids = [client.submit(f"after cut {i}") for i in range(12)]
    wait_terminal(ids, timeout=60)
    assert time.monotonic() - plugged < 90


def test_postgresql_restarted_under_load_web_answers_503_and_workers_write_their_results_after(fleet, client):
    """PostgreSQL stops (a fast shutdown: sessions ended, new ones refused) for 10 s while jobs are mid-call
    and clients submit: the web tier answers 503 with ``Retry-After``, the workers keep the results they
    finish meanwhile and write them once it is back; nothing is lost and nothing runs twice."""
    down_s = 10
    client.retry_cap_s = 1.0  # the 503s say 5 s; 1 s keeps the test short and the retries few
    ids = [client.submit(f"before pg restart {i}") for i in range(12)]
    busy_worker_host(fleet, ids)  # jobs are mid-call now (1 s each)
    started = time.monotonic()
    with Stream(client, per_s=4, label="pg-restart") as stream:
        time.sleep(0.3)
        stopped, stop_wall = time.monotonic(), datetime.now(UTC)
        fleet.stop_database()
        gone = time.monotonic()  # the server has exited: a request sent from now on finds no database
        time.sleep(down_s)
        restarting = time.monotonic()  # from here the server may accept again before start_database returns
        fleet.start_database()
        back, back_wall = time.monotonic(), datetime.now(UTC)
        time.sleep(3)
    assert not stream.errors, stream.errors[:3]
    connections[DB].close()  # this process's own session ended with the restart too
    done = wait_terminal(list(client.accepted), timeout=90)
    v = verdict(client.accepted)
    during = [a for a in client.answers if stopped <= a.at < back]
    after = [a for a in client.answers if a.at >= back]
    refused = [a for a in during + after if a.status == 503]
    ok_after = [a.at for a in after if a.status in (200, 201, 202)]
    # Mid-call when the database stopped: attempts begun before and not ended by then (rows read now).
    attempts = JobAttempt.objects.using(DB).filter(job_id__in=ids, started_at__lt=stop_wall)
    in_hand = [pk for pk, end in attempts.values_list("job_id", "finished_at") if end is None or end > stop_wall]
    # Their results came while the database was away (``finished_at``: when the call ended), so they were
    # kept and written once it was back: nothing could be written meanwhile.
    held = attempts.filter(job_id__in=in_hand, outcome="succeeded", finished_at__range=(stop_wall, back_wall))
    ready = {name: httpx.get(f"{fleet.web_url(name)}/readyz", timeout=10).status_code for name in rig.Fleet.WEBS}
    statuses = client.statuses(since=started)
    # Sent once the server had exited and answered before it was started again.
    down = [a for a in client.answers if a.sent >= gone and a.at < restarting]
    accepted_while_down = [a for a in down if 200 <= a.status < 300]
    report(
        "pg-restart",
        down_s=down_s,
        mid_call_at_stop=len(in_hand),
        results_kept_and_written_after=held.count(),
        submitted_during=len([a for a in client.answers if a.at >= stopped and a.status in (200, 201, 202)]),
        accepted_while_down=len(accepted_while_down),
        lost=v.lost,
        rerun=v.rerun,
        written_twice=v.written_twice,
        answers=dict(statuses),
        first_2xx_after_start_s=round(min(ok_after) - back, 1) if ok_after else None,
        last_503_after_start_s=round(max((a.at for a in refused), default=back) - back, 1),
        all_done_after_start_s=round(done - back, 1),
    )
    assert statuses[500] == 0 and statuses[0] == 0, statuses
    assert refused and all(a.retry_after for a in refused), "the web tier refused with 503 + Retry-After"
    # (A request sent before the server exited may commit and be answered just after the stop began.)
    assert not accepted_while_down, "nothing is accepted without the database"
    assert (v.lost, v.written_twice, v.wrong_output, v.succeeded) == (0, 0, 0, v.jobs)
    assert v.rerun == 0, "a database restart alone must not run a job twice"
    assert in_hand and held.count() == len(in_hand), "the results in hand were kept and written after the restart"
    assert ready == {name: 200 for name in rig.Fleet.WEBS}, ready
    for name in rig.Fleet.WORKERS:
        assert fleet.hosts[name].procs[-1].poll() is None, f"{name}'s worker outlived the restart:\n{fleet.logs(name)}"


def test_the_asyncio_client_finds_the_primary_through_the_sentinels(fleet):
    """The ASGI relay's client (``async_client``) reads the same Sentinel URL; after the failover above,
    the primary it finds is the promoted replica."""

    async def round_trip() -> tuple[bytes | None, str]:
        client = async_client(fleet.redis_url)
        try:
            await client.set("llmo:fleet:probe", "ok", ex=60)
            info = await client.info("server")
            return await client.get("llmo:fleet:probe"), str(info.get("tcp_port"))
        finally:
            await client.aclose()

    value, port = asyncio.run(round_trip())
    assert (value, port) == (b"ok", str(rig.REDIS_PORT))
    assert fleet.redis().get("llmo:fleet:probe") == b"ok"  # written on the primary the Sentinels name
