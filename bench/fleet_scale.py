#!/usr/bin/env python3
"""The fleet's scale curve on the multi-host rig (tests/fleet): 1, 2 and 3 worker hosts, and what a job costs.

    sudo .venv/bin/python bench/fleet_scale.py [--jobs 600] [--concurrency 16] [--json out.json]

Starts the rig (two web hosts, Redis with Sentinels, its own PostgreSQL; needs root) with one worker host,
then adds the second and the third. For each count, two phases, each measured on its own:

* **submit**: with the workers suspended (``rq suspend``: they take nothing), ``--jobs`` jobs are posted
  to the two web hosts in turn by ``--concurrency`` client threads (keep-alive connections);
* **drain**: the workers resume and run them all (the ``fast`` dev backend, 20 ms a call; each worker
  ``MAX_CONCURRENCY=16``, so the slots are not what limits it). Jobs/s = jobs / (last ``finished_at`` -
  first ``started_at``).

For each phase: the CPU seconds of every host (``utime + stime`` of the processes in its network
namespace, from ``/proc/<pid>/stat``) per job, the Redis primary's commands per job (``INFO
commandstats`` deltas, by command) and PostgreSQL's transactions per job (``pg_stat_database``
``xact_commit + xact_rollback`` of ``llmo_fleet``). Prints a JSON report. Exit status 2 when the rig
cannot run here. One rig per machine at a time: do not run it beside ``tests/fleet``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")
os.environ.setdefault("DEBUG", "1")

TICKS = os.sysconf("SC_CLK_TCK")


def host_cpu_s(netns: str) -> float:
    """CPU seconds (user + system) of the processes now in ``netns``, their reaped children included."""
    from tests.fleet import rig

    total = 0
    for pid in rig.sh("ip", "netns", "pids", netns, check=False).stdout.split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / TICKS


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Meter:
    """CPU per host, Redis commands and PostgreSQL transactions between ``start`` and ``stop``."""

    def __init__(self, fleet, hosts: list[str]) -> None:
        self.fleet, self.hosts = fleet, hosts

    def read(self) -> dict:
        import psycopg

        r = self.fleet.redis()
        stats = r.info("commandstats")
        with psycopg.connect(self.fleet.local_database_url, autocommit=True) as conn:
            (xacts,) = conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
        return {
            "cpu": {h: host_cpu_s(self.fleet.hosts[h].netns) for h in self.hosts} | {"client": self_cpu_s()},
            "redis": Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}),
            "pg": xacts,
            "at": time.monotonic(),
        }

    def delta(self, a: dict, b: dict, jobs: int) -> dict:
        redis_calls = b["redis"] - a["redis"]
        for noise in ("info", "ping", "publish", "role", "replconf", "client|setinfo", "client|setname"):
            redis_calls.pop(noise, None)  # the meter's own, Sentinel's and replication's
        cpu = {h: b["cpu"][h] - a["cpu"][h] for h in a["cpu"]}
        return {
            "wall_s": round(b["at"] - a["at"], 2),
            "cpu_ms_per_job": {h: round(1000 * v / jobs, 2) for h, v in cpu.items()},
            "cpu_s": {h: round(v, 2) for h, v in cpu.items()},
            "redis_cmds_per_job": round(sum(redis_calls.values()) / jobs, 2),
            "redis_top": {k: round(v / jobs, 2) for k, v in redis_calls.most_common(8)},
            "pg_xacts_per_job": round((b["pg"] - a["pg"] - 1) / jobs, 2),  # less the meter's own
        }


def submit_all(fleet, n: int, concurrency: int) -> tuple[list[str], Counter]:
    import httpx

    from tests.fleet import rig

    urls = [fleet.web_url(name) for name in rig.Fleet.WEBS]
    ids: list[str] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    todo = iter(range(n))

    def worker(k: int) -> None:
        with httpx.Client(base_url=urls[k % len(urls)], timeout=30) as http:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                r = http.post(
                    "/jobs",
                    json={"prompt": f"scale {i}", "backend": "fast"},
                    headers={"Authorization": f"Token {fleet.token}", "Idempotency-Key": uuid.uuid4().hex},
                )
                with lock:
                    statuses[r.status_code] += 1
                    if r.status_code == 202:
                        ids.append(r.json()["id"])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids, statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--hosts", type=int, default=3, help="measure 1..HOSTS worker hosts (at most 3)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import logging

    import django

    django.setup()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    from django.db.models import Max, Min
    from rq.suspension import resume, suspend

    from jobs.models import Job
    from tests.fleet import boot, rig
    from tests.fleet.client import DB, wait_terminal

    why = boot.unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    worker_env = {**boot.WORKER_ENV, "MAX_CONCURRENCY": "16"}
    names = list(rig.Fleet.WORKERS)[: args.hosts]
    report: dict = {"jobs": args.jobs, "concurrency": args.concurrency, "runs": []}
    with boot.booted(workers=names[:1], worker_env=worker_env) as fleet:
        tiers = [*(h for h in fleet.PG if h in fleet.hosts), *rig.Fleet.REDIS, *rig.Fleet.WEBS, *names]
        meter = Meter(fleet, tiers)
        for n in range(1, len(names) + 1):
            if n > 1:
                fleet.start_worker(names[n - 1], **worker_env)
                boot.wait_workers(fleet, n, names=names[:n])
            r = fleet.redis()
            suspend(r)
            time.sleep(1.5)  # every worker has seen the suspension
            a = meter.read()
            ids, statuses = submit_all(fleet, args.jobs, args.concurrency)
            time.sleep(1.5)  # PostgreSQL's statistics reach pg_stat_database at most a second late
            b = meter.read()
            submit = meter.delta(a, b, len(ids)) | {"answers": dict(statuses)}
            submit["jobs_per_s"] = round(len(ids) / (b["at"] - a["at"] - 1.5), 1)
            resume(r)
            wait_terminal(ids, timeout=600)
            time.sleep(1.5)
            c = meter.read()
            drain = meter.delta(b, c, len(ids))
            span = Job.objects.using(DB).filter(pk__in=ids).aggregate(a=Min("started_at"), b=Max("finished_at"))
            drain["jobs_per_s"] = round(len(ids) / (span["b"] - span["a"]).total_seconds(), 1)
            drain["states"] = dict(Counter(Job.objects.using(DB).filter(pk__in=ids).values_list("state", flat=True)))
            run = {"worker_hosts": n, "submit": submit, "drain": drain}
            print(json.dumps(run), flush=True)
            report["runs"].append(run)
    report["load_average"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
