"""Every routing strategy and the eligibility filter, table-driven: pure functions, no I/O."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import pytest

from routing.eligibility import reject_reason
from routing.strategies import STRATEGIES, BackendStats, Candidate, JobFacts, get_strategy, strategy_choices


def cand(name: str, **kw) -> Candidate:
    return Candidate(name=name, kind="dev", **kw)


def names(strategy: str, job: JobFacts, candidates, stats=None, params=None) -> list[str]:
    return [r.name for r in get_strategy(strategy).rank(job, candidates, stats or {}, params or {})]


def test_every_strategy_is_registered():
    assert [n for n, _ in strategy_choices()] == ["cheapest", "fastest", "least_busy", "ordered", "weighted"]
    assert set(STRATEGIES) == {"cheapest", "fastest", "least_busy", "ordered", "weighted"}


# --- eligibility ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "job, candidate, stats, reason",
    [
        (JobFacts(), cand("a"), None, None),
        (JobFacts(), cand("a", enabled=False), None, "disabled"),
        (JobFacts(), cand("a"), BackendStats(circuit_open=True), "circuit open"),
        (JobFacts(), cand("a"), BackendStats(circuit_state="half_open"), None),
        (JobFacts(has_images=True), cand("a"), None, "no multimodal support"),
        (JobFacts(requires_multimodal=True), cand("a"), None, "no multimodal support"),
        (JobFacts(has_images=True), cand("a", supports_multimodal=True), None, None),
        (JobFacts(model="llama3"), cand("a", model="qwen"), None, "serves model 'qwen', job asks for 'llama3'"),
        (JobFacts(model="llama3"), cand("a", model="llama3"), None, None),
        (JobFacts(model="llama3"), cand("a"), None, None),  # a backend without a fixed model serves any
        (JobFacts(prompt_tokens=90, max_tokens=11), cand("a", max_context_tokens=100), None, "context 100 tokens"),
        (JobFacts(prompt_tokens=90, max_tokens=10), cand("a", max_context_tokens=100), None, None),
        (JobFacts(), cand("a", enabled=False), BackendStats(circuit_open=True), "disabled"),  # first reason wins
    ],
    ids=[
        "eligible",
        "disabled",
        "circuit-open",
        "circuit-half-open-is-eligible",
        "images-need-multimodal",
        "requires-multimodal",
        "multimodal-ok",
        "model-mismatch",
        "model-match",
        "no-fixed-model",
        "context-too-small",
        "context-exactly-fits",
        "disabled-before-circuit",
    ],
)
def test_eligibility(job, candidate, stats, reason):
    got = reject_reason(job, candidate, stats)
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason)


# --- cheapest --------------------------------------------------------------------------------------
PRICEY = cand("pricey", cost_input_per_1k=Decimal("0.01"), cost_output_per_1k=Decimal("0.03"))
CHEAP_OUT = cand("cheap-out", cost_input_per_1k=Decimal("0.02"), cost_output_per_1k=Decimal("0.001"))
FREE = cand("free")


@pytest.mark.parametrize(
    "job, params, stats, expected",
    [
        # 1000 in + 256 expected out: pricey 0.01 + 0.00768, cheap-out 0.02 + 0.000256
        (JobFacts(prompt_tokens=1000), {}, {}, ["free", "pricey", "cheap-out"]),
        # long outputs make the output price dominate
        (JobFacts(prompt_tokens=1000, max_tokens=4000), {}, {}, ["free", "cheap-out", "pricey"]),
        (JobFacts(prompt_tokens=1000), {"expected_output_tokens": 4000}, {}, ["free", "cheap-out", "pricey"]),
        # over the SLO: demoted, still a fallback
        (
            JobFacts(prompt_tokens=1000),
            {"max_p95_ms": 500},
            {"free": BackendStats(p95_latency_ms=900), "pricey": BackendStats(p95_latency_ms=100)},
            ["pricey", "cheap-out", "free"],
        ),
        # over the SLO with exclude: gone
        (
            JobFacts(prompt_tokens=1000),
            {"max_p95_ms": 500, "over_slo": "exclude"},
            {"free": BackendStats(p95_latency_ms=900)},
            ["pricey", "cheap-out"],
        ),
    ],
    ids=["default-output", "max-tokens", "expected-output-param", "slo-demotes", "slo-excludes"],
)
def test_cheapest(job, params, stats, expected):
    assert names("cheapest", job, [PRICEY, CHEAP_OUT, FREE], stats, params) == expected


def test_cheapest_scores_are_the_expected_cost_and_reasons_show_the_numbers():
    ranked = get_strategy("cheapest").rank(JobFacts(prompt_tokens=1000, max_tokens=100), [PRICEY], {}, {})
    assert ranked[0].score == pytest.approx(0.01 + 0.003)
    assert "expected cost 0.013000" in ranked[0].reason and "1000 in × 0.01/1k" in ranked[0].reason
    ranked = get_strategy("cheapest").rank(
        JobFacts(prompt_tokens=1000), [PRICEY, FREE], {"free": BackendStats(p95_latency_ms=900)}, {"max_p95_ms": 500}
    )
    assert [r.name for r in ranked] == ["pricey", "free"]
    assert ranked[0].score < ranked[1].score  # lower is better holds across the demotion
    assert "p95 unknown" in ranked[0].reason and "p95 900 ms > SLO 500 ms" in ranked[1].reason


# --- fastest ---------------------------------------------------------------------------------------
A = cand("a", max_concurrency=10)
B = cand("b", max_concurrency=10)
C = cand("c", max_concurrency=10)


@pytest.mark.parametrize(
    "stats, params, expected",
    [
        ({"a": BackendStats(ewma_latency_ms=300), "b": BackendStats(ewma_latency_ms=100)}, {}, ["b", "c", "a"]),
        # the queueing penalty: b is faster per call but full (100 × 2 = 200 > 150)
        (
            {
                "a": BackendStats(ewma_latency_ms=150),
                "b": BackendStats(ewma_latency_ms=100, in_flight=10),
                "c": BackendStats(ewma_latency_ms=400),
            },
            {},
            ["a", "b", "c"],
        ),
        # p95 instead of EWMA
        (
            {"a": BackendStats(ewma_latency_ms=100, p95_latency_ms=900), "b": BackendStats(ewma_latency_ms=200)},
            {"latency": "p95", "unknown_latency_ms": 500},
            ["b", "c", "a"],
        ),
        # nobody has figures: the least loaded wins
        ({"b": BackendStats(in_flight=1), "a": BackendStats(in_flight=3)}, {}, ["c", "b", "a"]),
        # an unknown backend is assumed median-fast (200): between a known fast and a known slow one
        ({"a": BackendStats(ewma_latency_ms=100), "b": BackendStats(ewma_latency_ms=300)}, {}, ["a", "c", "b"]),
        # unless told otherwise
        (
            {"a": BackendStats(ewma_latency_ms=100), "b": BackendStats(ewma_latency_ms=300)},
            {"unknown_latency_ms": 1000},
            ["a", "b", "c"],
        ),
    ],
    ids=["ewma", "queueing-penalty", "p95", "no-figures", "unknown-is-median", "unknown-param"],
)
def test_fastest(stats, params, expected):
    assert names("fastest", JobFacts(), [A, B, C], stats, params) == expected


def test_fastest_reason_shows_the_arithmetic():
    [r] = get_strategy("fastest").rank(JobFacts(), [A], {"a": BackendStats(ewma_latency_ms=100, in_flight=5)}, {})
    assert r.score == pytest.approx(150)
    assert r.reason == "expected 150 ms = ewma 100 ms × (1 + 5/10 in flight)"


# --- least_busy ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "candidates, stats, expected",
    [
        ([A, B, C], {"a": BackendStats(in_flight=5), "b": BackendStats(in_flight=1)}, ["c", "b", "a"]),
        # relative to capacity: 8/64 is less busy than 2/4
        ([cand("big", max_concurrency=64), cand("small", max_concurrency=4)],
         {"big": BackendStats(in_flight=8), "small": BackendStats(in_flight=2)}, ["big", "small"]),
        # equally idle: more free slots first
        ([cand("small", max_concurrency=4), cand("big", max_concurrency=64)], {}, ["big", "small"]),
    ],
    ids=["fewest-in-flight", "relative-to-capacity", "tie-more-free-slots"],
)  # fmt: skip
def test_least_busy(candidates, stats, expected):
    assert names("least_busy", JobFacts(), candidates, stats) == expected


def test_least_busy_reason():
    [r] = get_strategy("least_busy").rank(JobFacts(), [A], {"a": BackendStats(in_flight=5)}, {})
    assert (r.score, r.reason) == (0.5, "5/10 in flight (50% busy, 5 free)")


# --- weighted --------------------------------------------------------------------------------------
HEAVY = cand("heavy", weight=3)
LIGHT = cand("light", weight=1)
NEVER = cand("never", weight=0)


def test_weighted_follows_the_weights():
    first = Counter(names("weighted", JobFacts(key=f"job-{i}"), [HEAVY, LIGHT, NEVER])[0] for i in range(4000))
    assert set(first) == {"heavy", "light"}
    assert 0.70 < first["heavy"] / 4000 < 0.80  # 3 of 4


def test_weighted_is_deterministic_per_job_key_and_seed():
    pool = [HEAVY, LIGHT, cand("mid", weight=2)]
    assert len({tuple(names("weighted", JobFacts(key="k1"), pool)) for _ in range(20)}) == 1
    assert len({tuple(names("weighted", JobFacts(), pool, params={"seed": 7})) for _ in range(20)}) == 1
    # the registry's order does not change the draw
    assert names("weighted", JobFacts(key="k1"), pool) == names("weighted", JobFacts(key="k1"), pool[::-1])
    # different keys spread out
    assert len({names("weighted", JobFacts(key=f"k{i}"), pool)[0] for i in range(50)}) == 3


def test_weighted_params_override_weights_and_zero_is_fallback_only():
    ranked = get_strategy("weighted").rank(JobFacts(key="x"), [HEAVY, NEVER], {}, {"weights": {"heavy": 0}})
    assert {r.reason for r in ranked} == {"weight 0: fallback only"}
    ranked = get_strategy("weighted").rank(JobFacts(key="x"), [HEAVY, LIGHT, NEVER], {}, {})
    assert ranked[-1].name == "never"
    assert ranked[0].reason.startswith("weight ") and "of 4 (" in ranked[0].reason


# --- params validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, params, message",
    [
        ("cheapest", {"max_p95_ms": -1}, "max_p95_ms"),
        ("cheapest", {"max_p95_ms": "fast"}, "max_p95_ms"),
        ("cheapest", {"expected_output_tokens": 1.5}, "expected_output_tokens"),
        ("cheapest", {"over_slo": "ignore"}, "over_slo"),
        ("cheapest", {"max_p59_ms": 100}, "unknown"),
        ("fastest", {"latency": "p99"}, "latency"),
        ("fastest", {"unknown_latency_ms": 0}, "unknown_latency_ms"),
        ("fastest", {"speed": 1}, "unknown"),
        ("least_busy", {"x": 1}, "unknown"),
        ("weighted", {"weights": {"a": -1}}, "weights"),
        ("weighted", {"weights": ["a"]}, "weights"),
        ("weighted", {"seed": 1.5}, "seed"),
        ("weighted", {"sead": 1}, "unknown"),
    ],
)
def test_bad_params_are_rejected_naming_the_param(strategy, params, message):
    with pytest.raises(ValueError, match=message):
        get_strategy(strategy).validate_params(params)


@pytest.mark.parametrize(
    "strategy, params",
    [
        ("cheapest", {}),
        ("cheapest", {"max_p95_ms": 1500, "over_slo": "exclude", "expected_output_tokens": 100}),
        ("fastest", {"latency": "p95", "unknown_latency_ms": 250.5}),
        ("least_busy", {}),
        ("weighted", {"weights": {"a": 0, "b": 5}, "seed": "s"}),
    ],
)
def test_good_params_pass(strategy, params):
    get_strategy(strategy).validate_params(params)


@pytest.mark.parametrize("strategy", ["cheapest", "fastest", "least_busy", "ordered", "weighted"])
def test_every_strategy_ranks_every_candidate_once_with_a_reason(strategy):
    pool = [cand(f"b{i}", weight=i % 3, max_concurrency=i + 1) for i in range(8)]
    stats = {f"b{i}": BackendStats(in_flight=i, ewma_latency_ms=10.0 * i or None) for i in range(8)}
    ranked = get_strategy(strategy).rank(JobFacts(key="j"), pool, stats, {})
    assert sorted(r.name for r in ranked) == sorted(c.name for c in pool)
    assert all(r.reason for r in ranked)
    assert [r.score for r in ranked] == sorted(r.score for r in ranked)  # lower is better, in order
    assert get_strategy(strategy).rank(JobFacts(), [], {}, {}) == []
