"""Live backend figures in Redis: what workers write, what routing reads, in one round trip each."""

from __future__ import annotations

import statistics
import time

import pytest

from orchestrator_site.redis import redis_client
from routing import stats
from routing.registry import PolicySnapshot, Snapshot
from routing.services import route
from routing.strategies import BackendStats, Candidate, JobFacts


def commands_sent(fn) -> list[str]:
    """The commands our connection sent while ``fn`` ran, as MONITOR sees them (not Lua's own).

    MONITOR sees every client of the server, so only those from the connection that sent the
    start marker count (one thread: the pool hands the same connection back).
    """
    client = redis_client()
    with client.monitor() as monitor:
        client.echo("start-marker")
        while (cmd := monitor.next_command())["command"] != "ECHO start-marker":
            pass
        ours = (cmd["client_address"], cmd["client_port"])
        fn()
        client.echo("end-marker")
        sent = []
        while (cmd := monitor.next_command())["command"] != "ECHO end-marker":
            if (cmd["client_address"], cmd["client_port"]) == ours:
                sent.append(cmd["command"].split()[0])
    return sent


def test_a_backend_without_figures_reads_as_zeros():
    assert stats.read_stats(["nobody"]) == {"nobody": BackendStats()}
    assert stats.read_stats([]) == {}


def test_record_call_keeps_ewma_p95_error_rate_and_last_error():
    latencies = [100.0, 200.0, 300.0, 400.0] + [50.0] * 16
    for ms in latencies:
        stats.record_call("gpu", latency_ms=ms, ok=True)
    stats.record_call("gpu", latency_ms=5, ok=False, error="HTTP 503 from upstream")
    s = stats.read_stats(["gpu"], details=True)["gpu"]

    ewma = latencies[0]
    for ms in latencies[1:]:
        ewma += stats.EWMA_ALPHA * (ms - ewma)
    assert s.ewma_latency_ms == pytest.approx(ewma, abs=0.01)  # the failed call did not pull it down
    assert s.p95_latency_ms == 300.0  # 19th of 20 successful calls, sorted
    assert s.calls == 21
    assert s.error_rate == pytest.approx(1 / 21, abs=1e-5)
    assert s.last_error == "HTTP 503 from upstream"
    assert s.last_error_at == pytest.approx(time.time(), abs=5)


def test_the_window_slides():
    for _ in range(stats.WINDOW):
        stats.record_call("b", latency_ms=1000, ok=False, error="down")
    for _ in range(stats.WINDOW):
        stats.record_call("b", latency_ms=10, ok=True)
    s = stats.read_stats(["b"], details=True)["b"]
    assert (s.calls, s.error_rate, s.p95_latency_ms) == (stats.WINDOW, 0.0, 10.0)
    assert s.last_error == "down"  # kept for the operator after recovery
    assert redis_client().llen(stats.window_key("b")) == stats.WINDOW


@pytest.mark.parametrize("state, is_open", [("open", True), ("half_open", False), ("closed", False)])
def test_circuit_state_is_read_from_the_breakers_key(state, is_open):
    redis_client().hset("llmo:circuit:b", "state", state)
    s = stats.read_stats(["b"])["b"]
    assert (s.circuit_state, s.circuit_open) == (state, is_open)


def test_each_write_and_the_read_of_twenty_backends_is_one_command():
    names = [f"b{i}" for i in range(20)]
    for n in names:
        stats.record_call(n, latency_ms=10, ok=True)
    assert commands_sent(lambda: stats.read_stats(names)) == ["EVALSHA"]
    assert commands_sent(lambda: stats.record_call("b0", latency_ms=10, ok=True)) == ["EVALSHA"]


def test_the_read_can_ride_in_another_pipeline():
    stats.record_call("b", latency_ms=42, ok=True)
    pipe = redis_client().pipeline(transaction=False)
    pipe.get("llmo:routing:version")
    parse = stats.queue_read(pipe, ["b", "c"])
    version, raw = pipe.execute()
    got = parse(raw)
    assert version is None and got["b"].ewma_latency_ms == 42.0 and got["c"] == BackendStats()


def test_routing_reads_live_figures_when_not_given_them(settings):
    settings.ROUTING_STATS_MAX_AGE_S = 0  # read on every decision
    snap = Snapshot(
        token="t",
        policy=PolicySnapshot(1, "p", "fastest", {}, 1),
        candidates=(Candidate(name="slow", kind="dev"), Candidate(name="quick", kind="dev")),
        backends={},
    )
    for _ in range(5):
        stats.record_call("slow", latency_ms=900, ok=True)
        stats.record_call("quick", latency_ms=90, ok=True)
    decision = route(JobFacts(), snap)
    assert decision.backend == "quick" and "ewma 90 ms" in decision.reason

    redis_client().hset("llmo:circuit:quick", "state", "open")
    decision = route(JobFacts(), snap)
    assert decision.backend == "slow" and decision.rejected == {"quick": "circuit open"}


def test_a_web_process_reuses_a_stats_read_briefly(settings):
    """A process reuses a read of the figures for ROUTING_STATS_MAX_AGE_S, then reads them again."""
    settings.ROUTING_STATS_MAX_AGE_S = 60  # both decisions below fall inside it, however slow the machine
    snap = Snapshot(
        token="t",
        policy=PolicySnapshot(1, "p", "ordered", {"order": ["a"]}, 1),
        candidates=(Candidate(name="a", kind="dev"), Candidate(name="b", kind="dev")),
        backends={},
    )
    assert route(JobFacts(), snap).backend == "a"
    redis_client().hset("llmo:circuit:a", "state", "open")
    assert route(JobFacts(), snap).backend == "a"  # within the reuse window
    settings.ROUTING_STATS_MAX_AGE_S = 0.05
    time.sleep(0.06)  # the read is now older than the window (a sleep never ends early)
    assert route(JobFacts(), snap).backend == "b"  # the open circuit is seen after it


def test_ewma_follows_a_latency_shift():
    for _ in range(30):
        stats.record_call("b", latency_ms=100, ok=True)
    for _ in range(30):
        stats.record_call("b", latency_ms=500, ok=True)
    s = stats.read_stats(["b"])["b"]
    assert s.ewma_latency_ms == pytest.approx(500, rel=0.01)
    assert statistics.median([100, 500]) < s.p95_latency_ms <= 500


def test_routing_reads_skip_the_error_text_and_tabs_in_errors_survive():
    stats.record_call("b", latency_ms=1, ok=False, error="bad\tgateway\nupstream")
    assert stats.read_stats(["b"])["b"].last_error == ""
    assert stats.read_stats(["b"], details=True)["b"].last_error == "bad\tgateway\nupstream"


@pytest.mark.django_db(transaction=True)
def test_worker_feeds_the_live_figures(api, policy):
    from tests.conftest import run_worker_burst

    for _ in range(3):
        assert api.post("/jobs", {"prompt": "hi"}, format="json").status_code == 202
    run_worker_burst()
    s = stats.read_stats(["dev"])["dev"]
    assert s.calls == 3 and s.error_rate == 0 and s.ewma_latency_ms is not None and s.in_flight == 0
