"""Plain functions for the raw-RQ baselines in ``bench/p3_p5_workers.py`` (no Django, no database)."""

import time


def noop() -> None:
    return None


def sleep_100ms() -> None:
    time.sleep(0.1)
