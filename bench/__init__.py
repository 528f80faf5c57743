"""Benchmarks. Not imported by the application; `bench.urls` exists only for `bench/p1_submit.py`."""
