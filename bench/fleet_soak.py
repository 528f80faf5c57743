#!/usr/bin/env python3
"""The fleet soak's long form: the multi-host rig (tests/fleet), a steady mixed load for ``--minutes``.

    sudo .venv/bin/python bench/fleet_soak.py --minutes 30 [--per-s 8] [--warmup-s 120] [--json out.json]

Starts the same fleet as ``tests/fleet`` (two web hosts, three worker hosts, Redis with Sentinels, its own
PostgreSQL; needs root), runs ``tests/fleet/soak.py`` on it and prints its figures: jobs, states, lost,
stuck ``running``, answers, p50/p99 end-to-end by third, each host's RSS and Redis ``used_memory`` after
the warm-up and their spread. Exit status: 0 when every check of the short form holds, 1 otherwise,
2 when the rig cannot run here. One rig per machine at a time: do not run it beside ``tests/fleet``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")
os.environ.setdefault("DEBUG", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--per-s", type=float, default=8, help="submissions a second (about half the capacity)")
    parser.add_argument("--warmup-s", type=float, default=120)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import django

    django.setup()
    from tests.fleet import boot, rig, soak
    from tests.fleet.client import Client

    why = boot.unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    with boot.booted() as fleet:
        client = Client({name: fleet.web_url(name) for name in rig.Fleet.WEBS}, fleet.token, retry_cap_s=1.0)
        result = soak.run(fleet, client, args.minutes * 60, args.per_s, args.warmup_s, sample_s=15)
    figures = result.figures()
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    first, _, last = result.p99_ms
    checks = {
        "nothing lost or stuck": result.lost == 0 and result.stuck_running == 0,
        "no 500, every request answered": result.answers.get(500, 0) == 0 and result.answers.get(0, 0) == 0,
        "RSS flat (±10 %)": all(v <= 0.10 for v in result.rss_spread().values()),
        "Redis memory flat (±10 %)": result.redis_spread() <= 0.10,
        "p99 stable": last <= max(1.5 * first, first + 1000),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
