"""The fleet-wide max_concurrency semaphore (routing.capacity) on the real Redis."""

from __future__ import annotations

import threading
import time

import pytest
from django.test import override_settings

from orchestrator_site.redis import redis_client
from routing import capacity, stats


@pytest.fixture(autouse=True)
def no_leases_held():
    """Leases are per process: start and end each test holding none."""
    with capacity._lock:
        capacity._held.clear()
    yield
    with capacity._lock:
        capacity._held.clear()


def in_flight(name: str) -> int:
    return stats.read_stats([name])[name].in_flight


def test_slots_are_granted_up_to_the_limit_and_freed_on_release():
    leases = [capacity.try_acquire("b", 3) for _ in range(3)]
    assert all(leases) and in_flight("b") == 3
    assert capacity.try_acquire("b", 3) is None  # full
    capacity.release(leases[0])
    again = capacity.try_acquire("b", 3)
    assert again is not None and in_flight("b") == 3
    for lease in [*leases[1:], again]:
        capacity.release(lease)
    assert in_flight("b") == 0 and capacity.held_count() == 0


def test_slot_context_releases_even_when_the_call_raises():
    try:
        with capacity.slot("b", 1) as lease:
            assert lease is not None and in_flight("b") == 1
            with capacity.slot("b", 1) as second:
                assert second is None
            raise RuntimeError("adapter crashed")
    except RuntimeError:
        pass
    assert in_flight("b") == 0


def test_many_threads_never_exceed_the_limit():
    peak, current, lock = [0], [0], threading.Lock()
    seen: list[int] = []  # slots held in Redis, as each holder saw it (asserted here: a thread's assert is lost)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(30):
                lease = capacity.try_acquire("b", 4)
                if lease is None:
                    continue
                with lock:
                    current[0] += 1
                    peak[0] = max(peak[0], current[0])
                seen.append(redis_client().zcard(stats.inflight_key("b")))
                with lock:
                    current[0] -= 1
                capacity.release(lease)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen and max(seen) <= 4
    assert 1 <= peak[0] <= 4 and in_flight("b") == 0


@override_settings(WORKER_LEASE_TTL_S=0.3)
def test_a_slot_of_a_dead_process_expires_unless_renewed():
    held = capacity.try_acquire("b", 2)
    capacity.try_acquire("b", 2)
    # A killed process never renews: simulate by forgetting one lease locally.
    with capacity._lock:
        capacity._held.pop(held)
    time.sleep(0.2)
    assert capacity.renew_held() == 1
    time.sleep(0.2)
    assert in_flight("b") == 1  # the renewed one still counts, the orphan expired
    assert capacity.try_acquire("b", 2) is not None


def test_renewal_writes_held_slots_back_after_redis_lost_them():
    lease = capacity.try_acquire("b", 2)
    redis_client().flushdb()
    assert in_flight("b") == 0
    capacity.renew_held()
    assert in_flight("b") == 1
    capacity.release(lease)
    assert in_flight("b") == 0


def test_release_owner_frees_every_slot_of_one_job():
    a1 = capacity.try_acquire("a", 5, owner="job-1")
    capacity.try_acquire("b", 5, owner="job-1")
    other = capacity.try_acquire("a", 5, owner="job-2")
    assert capacity.release_owner("job-1") == 2
    assert (in_flight("a"), in_flight("b")) == (1, 0)
    capacity.release(a1)  # already released: a no-op
    capacity.release(other)
