"""A soak: a steady mixed load through the fleet, sampled as it runs, judged at the end.

Shared by the short form in ``make test`` (tests/fleet/test_soak.py) and the long one by hand
(``bench/fleet_soak.py --minutes 30``). The load goes to three backends in turn (``SOAK_BACKENDS``):
fast, slow, and flaky (5 % of calls answer 503, retried by the worker). Every ``sample_s`` the soak
reads each host's resident memory (the sum of ``VmRSS`` over the processes of its network namespace)
and the Redis primary's ``used_memory`` and key count.

What it judges, from the job rows (the system of record): none lost (accepted, never terminal), none
left ``running``, memory flat after the warm-up (each host's and Redis's samples within ±10 % of their
mean after it), and the end-to-end p99 (``finished_at - created_at``) of the last third of the jobs
against the first.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.models import Job, JobAttempt, JobState
from tests.fleet import rig
from tests.fleet.client import DB, Client, Stream, wait_terminal

# name -> the dev backend's config (created by the fleet's set-up, tests/fleet/conftest.py)
SOAK_BACKENDS = {
    "fast": {"latency_ms": 20},
    "slow": {"latency_ms": 1000},
    "flaky": {"latency_ms": 100, "fail_rate": 0.05, "fail_status": 503},
}


def host_rss_kb(host: rig.Host) -> int:
    """The resident memory of every process on ``host`` (its network namespace), in kB."""
    total = 0
    for pid in rig.sh("ip", "netns", "pids", host.netns, check=False).stdout.split():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@dataclass
class Sample:
    at: float  # seconds since the soak began
    rss_kb: dict[str, int]  # host name -> kB
    redis_used: int
    redis_keys: int


@dataclass
class SoakResult:
    duration_s: float
    per_s: float
    warmup_s: float
    samples: list[Sample] = field(default_factory=list)
    jobs: int = 0
    states: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    stuck_running: int = 0
    answers: dict[int, int] = field(default_factory=dict)
    p50_ms: list[float] = field(default_factory=list)  # per third of the jobs, by submission
    p99_ms: list[float] = field(default_factory=list)
    drained_after_s: float = 0.0
    attempts_503: int = 0  # calls the flaky backend refused (each job then tried again)

    def after_warmup(self) -> list[Sample]:
        return [s for s in self.samples if s.at >= self.warmup_s]

    def spread(self, values: list[float]) -> float:
        """The largest deviation from the mean, as a fraction of it."""
        mean = statistics.fmean(values)
        return max(abs(v - mean) for v in values) / mean if mean else 0.0

    def rss_spread(self) -> dict[str, float]:
        later = self.after_warmup()
        return {name: self.spread([s.rss_kb[name] for s in later]) for name in later[0].rss_kb}

    def redis_spread(self) -> float:
        return self.spread([s.redis_used for s in self.after_warmup()])

    def series(self, points: int = 12) -> dict[str, list]:
        """Up to ``points`` samples spread over the whole run: seconds, then each host's RSS in MiB and Redis's."""
        picked = self.samples[:: max(1, len(self.samples) // points)] if self.samples else []
        out: dict[str, list] = {"at_s": [round(s.at) for s in picked]}
        for name in picked[0].rss_kb if picked else ():
            out[name] = [round(s.rss_kb[name] / 1024, 1) for s in picked]
        out["redis_used"] = [round(s.redis_used / 2**20, 2) for s in picked]
        return out

    def figures(self) -> dict[str, object]:
        later = self.after_warmup()
        return {
            "duration_s": round(self.duration_s),
            "per_s": self.per_s,
            "jobs": self.jobs,
            "states": self.states,
            "lost": self.lost,
            "stuck_running": self.stuck_running,
            "answers": self.answers,
            "p50_ms_by_third": [round(v) for v in self.p50_ms],
            "p99_ms_by_third": [round(v) for v in self.p99_ms],
            "drained_after_s": round(self.drained_after_s, 1),
            "flaky_503_calls": self.attempts_503,
            "rss_mb_after_warmup_first_last": {
                name: [round(later[0].rss_kb[name] / 1024, 1), round(later[-1].rss_kb[name] / 1024, 1)]
                for name in later[0].rss_kb
            },
            "rss_spread_pct": {k: round(100 * v, 1) for k, v in self.rss_spread().items()},
            "rss_mb_series": self.series(),
            "redis_used_mb_first_last": [round(later[0].redis_used / 2**20, 2), round(later[-1].redis_used / 2**20, 2)],
            "redis_used_spread_pct": round(100 * self.redis_spread(), 1),
            "redis_keys_min_max": [min(s.redis_keys for s in later), max(s.redis_keys for s in later)],
        }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run(
    fleet: rig.Fleet, client: Client, duration_s: float, per_s: float, warmup_s: float, sample_s: float = 5
) -> SoakResult:
    """Submit ``per_s`` jobs a second for ``duration_s``, sampling memory; wait for every job; judge."""
    result = SoakResult(duration_s, per_s, warmup_s)
    hosts = {name: fleet.hosts[name] for name in (*rig.Fleet.WEBS, *rig.Fleet.WORKERS)}
    names = list(SOAK_BACKENDS)
    turn = itertools.count()
    client.fields = lambda: {"backend": names[next(turn) % len(names)]}
    r = fleet.redis()
    began = time.monotonic()
    with Stream(client, per_s=per_s, label="soak") as stream:
        while (now := time.monotonic()) - began < duration_s:
            info = r.info("memory")
            result.samples.append(
                Sample(now - began, {n: host_rss_kb(h) for n, h in hosts.items()}, info["used_memory"], r.dbsize())
            )
            time.sleep(max(0.0, sample_s - (time.monotonic() - now)))
    ended = time.monotonic()
    assert not stream.errors, stream.errors[:3]
    ids = list(client.accepted)
    try:
        wait_terminal(ids, timeout=120)
    finally:
        result.drained_after_s = time.monotonic() - ended
        rows = list(Job.objects.using(DB).filter(pk__in=ids).values_list("state", "created_at", "finished_at"))
        result.jobs = len(ids)
        result.states = dict(sorted({s: sum(1 for row in rows if row[0] == s) for s, _, _ in rows}.items()))
        terminal = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED}
        result.lost = len(ids) - sum(1 for row in rows if row[0] in terminal)
        result.stuck_running = sum(1 for row in rows if row[0] == JobState.RUNNING)
        result.answers = dict(client.statuses())
        result.attempts_503 = (
            JobAttempt.objects.using(DB)
            .filter(job_id__in=ids, error__contains="HTTP 503")
            .exclude(outcome="succeeded")
            .count()
        )
        done = sorted((c, (f - c).total_seconds() * 1000) for _, c, f in rows if f is not None)
        thirds = [done[i * len(done) // 3 : (i + 1) * len(done) // 3] for i in range(3)]
        result.p50_ms = [percentile([ms for _, ms in t], 0.50) for t in thirds]
        result.p99_ms = [percentile([ms for _, ms in t], 0.99) for t in thirds]
    return result
