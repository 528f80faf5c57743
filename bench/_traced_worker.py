"""``manage.py`` under ``tracemalloc`` for ``bench/worker_rss.py --tracemalloc``.

Each ``SIGUSR1`` writes a snapshot to ``$TRACED_WORKER_SNAPSHOTS/<k>.snap`` (k = 0, 1, …), taken in the
main thread, so the bench can compare what the worker holds after different numbers of jobs.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
tracemalloc.start(8)
_count = itertools.count()


def _snapshot(signum: int, frame: object) -> None:
    folder = Path(os.environ["TRACED_WORKER_SNAPSHOTS"])
    k = next(_count)
    tmp = folder / f"{k}.tmp"
    tracemalloc.take_snapshot().dump(str(tmp))
    tmp.rename(folder / f"{k}.snap")


signal.signal(signal.SIGUSR1, _snapshot)

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(["manage.py", *sys.argv[1:]])
