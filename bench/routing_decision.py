#!/usr/bin/env python3
"""What does one routing decision cost? µs per decision with 20 backends, per strategy.

    .venv/bin/python bench/routing_decision.py [-n 20000] [--backends 20]

Rows: each strategy's pure decision (eligibility + rank, stats given), the live-stats read
alone (one Lua call to Redis db 13), the decision with its own stats read (``route(job, snap)``
as submission calls it today), and the submission's registry-version GET alone vs. with the
stats read pipelined into it (the saving the jobs/services.py patch buys). Redis keys used are
deleted afterwards; no database is touched.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIS_DB = 13


def timed(fn, n: int) -> float:
    """Median over 5 runs of µs per call."""
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=20000, help="decisions per pure measurement (default 20000)")
    p.add_argument("--backends", type=int, default=20)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="llmo-bench-routing-")
    os.environ.update(
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        REDIS_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
        DATABASE_URL=f"sqlite:///{tmp}/unused.sqlite3",
        VAR_DIR=tmp,
        LOG_LEVEL="WARNING",
        DEBUG="0",
        SECRET_KEY="bench-only-not-secret",
        ALLOWED_HOSTS="localhost",
    )
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.test.utils import override_settings

    from orchestrator_site.redis import redis_client
    from routing import registry, stats
    from routing.registry import PolicySnapshot, Snapshot
    from routing.services import route
    from routing.strategies import Candidate, JobFacts

    rng = random.Random(1)
    names = [f"bench-{i:02d}" for i in range(args.backends)]
    candidates = tuple(
        Candidate(
            name=n,
            kind="dev",
            model="" if i % 4 else "llama3",
            supports_multimodal=i % 3 == 0,
            max_context_tokens=rng.choice([8192, 32768, 131072]),
            max_concurrency=rng.choice([4, 16, 64]),
            weight=rng.randint(0, 5),
            cost_input_per_1k=Decimal(rng.randint(0, 100)) / 10000,
            cost_output_per_1k=Decimal(rng.randint(0, 300)) / 10000,
        )
        for i, n in enumerate(names)
    )
    client = redis_client()
    for n in names:
        for _ in range(50):
            stats.record_call(n, latency_ms=rng.uniform(20, 2000), ok=rng.random() > 0.05, error="HTTP 503")
    client.hset(stats.circuit_key(names[1]), "state", "open")
    live = stats.read_stats(names)

    params = {
        "ordered": {"order": names[::-1]},
        "cheapest": {"max_p95_ms": 1500},
        "fastest": {},
        "weighted": {},
        "least_busy": {},
    }
    job = JobFacts(prompt_tokens=700, max_tokens=300, key="job-key")

    def snap_for(strategy: str) -> Snapshot:
        policy = PolicySnapshot(1, strategy, strategy, params[strategy], 1)
        return Snapshot(token="bench", policy=policy, candidates=candidates, backends={})

    rows: list[tuple[str, float]] = []
    try:
        for strategy in params:
            snap = snap_for(strategy)
            rows.append((f"{strategy}: eligibility + rank", timed(lambda snap=snap: route(job, snap, live), args.n)))
        few = max(args.n // 10, 500)
        rows.append(
            (f"read_stats({args.backends} backends), 1 round trip", timed(lambda: stats.read_stats(names), few))
        )
        snap = snap_for("fastest")
        rows.append(("fastest: route() with stats reused per process (250 ms)", timed(lambda: route(job, snap), few)))
        with override_settings(ROUTING_STATS_MAX_AGE_S=0):
            rows.append(("fastest: route() reading stats every decision", timed(lambda: route(job, snap), few)))
        version_get = timed(lambda: client.get(registry.VERSION_KEY), few)
        rows.append(("submit: GET registry version (1 round trip)", version_get))

        def pipelined() -> None:
            pipe = client.pipeline(transaction=False)
            pipe.get(registry.VERSION_KEY)
            parse = stats.queue_read(pipe, names)
            _, raw = pipe.execute()
            parse(raw)

        rows.append(("alternative: GET version + stats read, 1 pipeline", timed(pipelined, few)))
        rows.append(("redis PING round trip (reference)", timed(client.ping, few)))
    finally:
        keys = [k for n in names for k in (stats.stats_key(n), stats.window_key(n), stats.inflight_key(n))]
        client.delete(*keys, stats.circuit_key(names[1]))

    print(f"Routing decision cost, {args.backends} backends (1 circuit open), median of 5 runs")
    print(f"{'what':<52} {'µs/decision':>12}")
    for what, us in rows:
        print(f"{what:<52} {us:>12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
