"""SQLite, with a process's writers taking turns on a Python lock before SQLite's own.

Django's threads (the ASGI web tier's ``WEB_THREADS``, a worker's job threads) share one database
file. SQLite lets one writer in at a time and makes the others poll: its busy handler sleeps
1, 2, 5 … up to 100 ms between tries, so under load a waiting writer sleeps past the moment the lock
came free, and the web tier's tail grew to half a second at 8 requests in flight. Here a write
transaction (``BEGIN IMMEDIATE``, every ``atomic()`` block) first takes a lock shared by the
process's threads, which wakes the next writer the moment the previous one commits; only writers of
*other* processes still meet SQLite's polling. The lock is given up on commit, rollback and close.

A thread waits at most the busy timeout for it, then goes on to SQLite's own wait, so a thread that
holds a transaction open while waiting for another thread's write cannot deadlock the process.
"""

from __future__ import annotations

import threading

from django.db.backends.sqlite3 import base

_WRITERS = threading.Lock()


class DatabaseWrapper(base.DatabaseWrapper):
    _holds_writers = False

    def _start_transaction_under_autocommit(self) -> None:
        if not self._holds_writers:
            timeout = float(self.settings_dict.get("OPTIONS", {}).get("timeout", 5))
            self._holds_writers = _WRITERS.acquire(timeout=timeout)
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._release_writers()
            raise

    def _commit(self) -> None:
        try:
            return super()._commit()
        finally:
            self._release_writers()

    def _rollback(self) -> None:
        try:
            return super()._rollback()
        finally:
            self._release_writers()

    def _close(self) -> None:
        try:
            return super()._close()
        finally:
            self._release_writers()

    def _release_writers(self) -> None:
        if self._holds_writers:
            self._holds_writers = False
            _WRITERS.release()
