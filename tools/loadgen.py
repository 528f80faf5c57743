"""Drive the API at a fixed rate and mix for N seconds; plot latency over time and its histogram.

Open loop: a job is submitted every 1/rate seconds whatever the server's speed (a closed loop
would slow down with the server and hide its queueing). Each job is then waited for with the
client's ``wait`` (a long poll, answered when the job ends; ``--poll-ms`` polls instead), so the
plotted latency is what a client sees end to end: HTTP submit, queue wait, worker, backend.
Bounded in count and time: it stops after ``--duration`` (+ ``--drain`` for the last jobs to finish).

    python tools/loadgen.py --base-url http://127.0.0.1:8000 --token "$TOKEN" \\
        --rate 20 --duration 60 --mix high=0.1,normal=0.7,low=0.2 --out docs/img

Needs the client (client/) and matplotlib: ``pip install -r requirements-loadgen.txt``. Writes
``latency_over_time.png``, ``latency_histogram.png`` under ``--out`` (and every sample to ``--csv``
when given) and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import llmo


@dataclass
class Sample:
    sent_at: float  # seconds since the run started
    priority: str
    status: int = 0
    submit_ms: float = 0.0
    e2e_ms: float | None = None
    state: str = ""


def parse_mix(text: str) -> list[tuple[str, float]]:
    """``high=0.1,normal=0.9`` -> [(priority, weight)]; weights need not sum to 1."""
    mix = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in ("high", "normal", "low"):
            raise argparse.ArgumentTypeError(f"unknown priority {name!r}")
        mix.append((name.strip(), float(weight or 1)))
    return mix


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # No retries: a refused or lost request is a sample of its own, not hidden by a second try.
        self.client = llmo.Client(
            args.base_url,
            args.token or None,
            timeout=args.timeout,
            max_retries=0,
            limits=httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency),
        )
        self.samples: list[Sample] = []
        self.lock = threading.Lock()
        self.rng = random.Random(args.seed)

    def one(self, sample: Sample, t0: float, deadline: float) -> None:
        start = time.monotonic()
        try:
            job = self.client.submit(
                f"loadgen {sample.priority} {self.rng.random():.6f}",
                priority=sample.priority,
                backend=self.args.backend or None,
            )
        except llmo.ApiError as exc:
            sample.status = exc.status
            return
        except llmo.LlmoError:
            sample.status = -1
            return
        sample.status = 200 if job.replayed else 202
        sample.submit_ms = (time.monotonic() - start) * 1000
        poll = self.args.poll_ms / 1000 if self.args.poll_ms else None
        try:
            result = self.client.wait(job.id, timeout=max(0.0, deadline - time.monotonic()), poll_interval=poll)
        except llmo.WaitTimeout:
            sample.state = "timeout"
            return
        except llmo.LlmoError:
            sample.state = "error"
            return
        sample.state = result.state
        sample.e2e_ms = (time.monotonic() - start) * 1000

    def run(self) -> list[Sample]:
        mix = self.args.mix
        names, weights = [m[0] for m in mix], [m[1] for m in mix]
        interval = 1.0 / self.args.rate
        t0 = time.monotonic()
        deadline = t0 + self.args.duration + self.args.drain
        with ThreadPoolExecutor(max_workers=self.args.concurrency) as pool:
            n = 0
            while (due := t0 + n * interval) < t0 + self.args.duration:
                time.sleep(max(0.0, due - time.monotonic()))
                sample = Sample(sent_at=due - t0, priority=self.rng.choices(names, weights)[0])
                self.samples.append(sample)
                pool.submit(self.one, sample, t0, deadline)
                n += 1
        self.client.close()
        return self.samples


def summary(samples: list[Sample]) -> dict:
    done = [s.e2e_ms for s in samples if s.e2e_ms is not None and s.state == "succeeded"]
    sub = [s.submit_ms for s in samples if s.status in (200, 201, 202)]
    out: dict = {
        "sent": len(samples),
        "accepted": len(sub),
        "succeeded": len(done),
        "failed": sum(s.state == "failed" for s in samples),
        "timed_out": sum(s.state == "timeout" for s in samples),
        "http_errors": sum(s.status not in (200, 201, 202) for s in samples),
    }
    for label, values in (("submit_ms", sub), ("e2e_ms", done)):
        if values:
            out[label] = {
                "p50": round(percentile(values, 50), 1),
                "p95": round(percentile(values, 95), 1),
                "p99": round(percentile(values, 99), 1),
                "mean": round(statistics.fmean(values), 1),
            }
    return out


def plot(samples: list[Sample], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    ok = [s for s in samples if s.e2e_ms is not None and s.state == "succeeded"]
    if not ok:
        raise SystemExit("no job succeeded: nothing to plot")
    out.mkdir(parents=True, exist_ok=True)
    xs, ys = [s.sent_at for s in ok], [s.e2e_ms for s in ok]

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    ax.scatter(xs, ys, s=6, alpha=0.35, color="tab:blue", label="job (end to end)")
    # rolling P50/P95 per second of the run
    buckets: dict[int, list[float]] = {}
    for x, y in zip(xs, ys, strict=True):
        buckets.setdefault(int(x), []).append(y)
    secs = sorted(buckets)
    for q, color in ((50, "tab:green"), (95, "tab:orange"), (99, "tab:red")):
        ax.plot(secs, [percentile(buckets[s], q) for s in secs], color=color, linewidth=1.4, label=f"P{q} per second")
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"Job latency over time — {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    over_time = out / "latency_over_time.png"
    fig.savefig(over_time)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    ax.hist(ys, bins=40, color="tab:blue", alpha=0.8)
    for q, color in ((50, "tab:green"), (95, "tab:orange"), (99, "tab:red")):
        v = percentile(ys, q)
        ax.axvline(v, color=color, linestyle="--", linewidth=1.2, label=f"P{q} {v:.0f} ms")
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("jobs")
    ax.set_title(f"Job latency distribution — {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    histogram = out / "latency_histogram.png"
    fig.savefig(histogram)
    plt.close(fig)
    return [over_time, histogram]


def write_csv(samples: list[Sample], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sent_at_s", "priority", "http_status", "submit_ms", "e2e_ms", "state"])
        for s in samples:
            e2e = f"{s.e2e_ms:.2f}" if s.e2e_ms is not None else ""
            w.writerow([f"{s.sent_at:.3f}", s.priority, s.status, f"{s.submit_ms:.2f}", e2e, s.state])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--token", default="", help="DRF token of an API user")
    p.add_argument("--rate", type=float, default=10.0, help="submissions per second (open loop)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of submissions")
    p.add_argument("--drain", type=float, default=30.0, help="extra seconds to wait for the last jobs")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("high=0.1,normal=0.7,low=0.2"))
    p.add_argument("--backend", default="", help="pin every job to this backend")
    p.add_argument("--concurrency", type=int, default=64, help="client threads (in-flight jobs being polled)")
    p.add_argument("--poll-ms", type=float, default=0.0, help="poll every N ms instead of long-polling (0: long poll)")
    p.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout per request (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    p.add_argument("--csv", type=Path, default=None, help="also write every sample here")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        p.error("--rate and --duration must be positive")
    samples = LoadGen(args).run()
    result = summary(samples)
    title = args.title or f"{args.rate:g} jobs/s for {args.duration:g} s"
    result["images"] = [str(path) for path in plot(samples, args.out, title)]
    if args.csv:
        write_csv(samples, args.csv)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
