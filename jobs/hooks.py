"""Callbacks on a job's final state, for apps that keep books on jobs (``tenants`` settles its limits).

The state machine (``jobs.models``) calls ``ended`` after a move into a final state commits, once
per winning move (its compare-and-set has exactly one winner), and ``reopened`` after an operator's
retry puts a finished job back in the queue. Apps register in ``AppConfig.ready``, so ``jobs``
never imports them. A callback that raises is logged and skipped: book-keeping must not fail a job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

Callback = Callable[[Sequence[Any]], None]  # called with Job instances
_ended: list[Callback] = []
_reopened: list[Callback] = []


def on_ended(callback: Callback) -> Callback:
    """Call ``callback(jobs)`` after jobs reached a final state (committed; the instances are current)."""
    if callback not in _ended:
        _ended.append(callback)
    return callback


def on_reopened(callback: Callback) -> Callback:
    """Call ``callback(jobs)`` after finished jobs were put back in the queue (an operator's retry)."""
    if callback not in _reopened:
        _reopened.append(callback)
    return callback


def ended(jobs: Sequence[Any]) -> None:
    _run(_ended, jobs, "ended")


def reopened(jobs: Sequence[Any]) -> None:
    _run(_reopened, jobs, "reopened")


def _run(callbacks: list[Callback], jobs: Sequence[Any], what: str) -> None:
    if not jobs:
        return
    for callback in list(callbacks):
        try:
            callback(jobs)
        except Exception as exc:
            log.error(
                "job hook failed",
                extra={"hook": what, "callback": getattr(callback, "__qualname__", repr(callback)), "error": repr(exc)},
            )
