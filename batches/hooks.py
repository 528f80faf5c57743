"""Callbacks on a batch's final state (``completed``, ``failed``, ``expired``, ``cancelled``).

``Batch.transition`` calls ``ended`` after a move into a final state commits, once per winning move
(its compare-and-set has exactly one winner). Apps register in ``AppConfig.ready`` (webhooks publish
``batch.<status>`` from here), so ``batches`` never imports them. A callback that raises is logged
and skipped: the batch's outcome is already committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Callback = Callable[[Any], None]  # called with the Batch instance, current
_ended: list[Callback] = []


def on_batch_ended(callback: Callback) -> Callback:
    """Call ``callback(batch)`` after a batch reached a final state (committed)."""
    if callback not in _ended:
        _ended.append(callback)
    return callback


def ended(batch: Any) -> None:
    for callback in list(_ended):
        try:
            callback(batch)
        except Exception as exc:
            log.error(
                "batch hook failed",
                extra={
                    "batch_id": batch.pk,
                    "callback": getattr(callback, "__qualname__", repr(callback)),
                    "error": repr(exc),
                },
            )
