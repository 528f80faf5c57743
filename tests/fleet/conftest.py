"""The ``fleet`` fixture: one fleet (tests/fleet/boot.py) for the whole session (the faults, then the soak), torn
down even on failure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fleet import boot, rig


@pytest.fixture(scope="session")
def fleet() -> Iterator[rig.Fleet]:
    """The fleet of :func:`tests.fleet.boot.booted`; the tests skip, saying why, where it cannot start."""
    why = boot.unavailable()
    if why:
        pytest.skip(why)
    with boot.booted() as fleet:
        yield fleet


@pytest.fixture
def fleet_db(fleet, django_db_blocker) -> Iterator[None]:
    """Reading the fleet's database (alias ``fleet``) in a test; the test run's own stays untouched."""
    with django_db_blocker.unblock():
        yield
