"""The soak's short form (tests/fleet/soak.py): 75 s of mixed load across the fleet's hosts, after the faults.

``FLEET_SOAK_S`` and ``FLEET_SOAK_PER_S`` lengthen or load it by hand; ``bench/fleet_soak.py`` runs the long
form on a fleet of its own. Figures: docs/reliability.md.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.fleet import rig, soak
from tests.fleet.client import Client

pytestmark = pytest.mark.usefixtures("fleet_db")

DURATION_S = float(os.environ.get("FLEET_SOAK_S", "75"))
PER_S = float(os.environ.get("FLEET_SOAK_PER_S", "8"))
WARMUP_S = 35.0  # the key TTLs of the rig (30 s, tests/fleet/boot.py) and a sample


def test_soak_mixed_backends_nothing_lost_memory_flat_latency_stable(fleet):
    client = Client({name: fleet.web_url(name) for name in rig.Fleet.WEBS}, fleet.token, retry_cap_s=1.0)
    result = soak.run(fleet, client, DURATION_S, PER_S, warmup_s=min(WARMUP_S, DURATION_S / 2))
    print(f"\nFLEET soak {json.dumps(result.figures())}")
    assert result.lost == 0 and result.stuck_running == 0, result.states
    assert result.answers.get(500, 0) == 0 and result.answers.get(0, 0) == 0, result.answers
    assert result.states.get("succeeded", 0) >= 0.99 * result.jobs, result.states  # flaky: 3 tries each
    assert all(v <= 0.10 for v in result.rss_spread().values()), result.rss_spread()
    assert result.redis_spread() <= 0.10, result.figures()
    first, _, last = result.p99_ms
    assert last <= max(1.5 * first, first + 1000), result.p99_ms
