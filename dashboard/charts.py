"""Server-side SVG charts: no CDN, no JavaScript, readable with scripts off and in dark mode.

Colours are CSS classes (``dashboard.css`` maps them onto the admin's CSS variables), so the charts
follow the admin's light/dark theme. Every chart carries a ``<title>`` per mark for hover text; the
numbers themselves are also in the tables beside the charts.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

SERIES_CLASSES = 6  # dash-s0 .. dash-s5 in dashboard.css


def fmt_seconds(value: float | None) -> str:
    """A duration an operator reads at a glance: ``850 ms``, ``1.2 s``, ``3.4 min``."""
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms" if value >= 0.01 else f"{value * 1000:.1f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _num(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def _svg(width: int, height: int, label: str, body: list[str]) -> SafeString:
    return mark_safe(  # every interpolated text went through escape()
        f'<svg class="dash-chart" viewBox="0 0 {width} {height}" width="100%" '
        f'preserveAspectRatio="xMidYMid meet" role="img" aria-label="{escape(label)}">'
        f"<title>{escape(label)}</title>{''.join(body)}</svg>"
    )


def throughput_chart(minutes: Sequence[int], succeeded: Sequence[int], failed: Sequence[int]) -> SafeString:
    """Stacked bars per minute: succeeded below, failed on top."""
    width, height, left, bottom, top = 600, 130, 34, 18, 8
    plot_h = height - bottom - top
    peak = max((s + f for s, f in zip(succeeded, failed, strict=True)), default=0) or 1
    step = (width - left) / max(len(minutes), 1)
    body = [
        f'<line class="dash-axis" x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}"/>',
        f'<text class="dash-label" x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>',
        f'<text class="dash-label" x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>',
    ]
    for i, (minute, ok, bad) in enumerate(zip(minutes, succeeded, failed, strict=True)):
        x = left + i * step + 1
        w = max(step - 2, 1)
        at = datetime.fromtimestamp(minute * 60, UTC).strftime("%H:%M UTC")
        ok_h = plot_h * ok / peak
        bad_h = plot_h * bad / peak
        tip = escape(f"{at}: {ok} succeeded, {bad} failed")
        base = height - bottom
        for css, y, h in (("dash-ok", base - ok_h, ok_h), ("dash-bad", base - ok_h - bad_h, bad_h)):
            if h > 0:
                body.append(
                    f'<rect class="{css}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}">'
                    f"<title>{tip}</title></rect>"
                )
    n = len(minutes)
    body.append(f'<text class="dash-label" x="{left}" y="{height - 4}">−{n} min</text>')
    body.append(f'<text class="dash-label" x="{width}" y="{height - 4}" text-anchor="end">now</text>')
    return _svg(width, height, f"Jobs finished per minute over the last {n} minutes", body)


def percentile_chart(title: str, rows: Sequence[tuple[str, float | None, float | None, float | None]]) -> SafeString:
    """One row per backend: nested bars p99 (light) ⊃ p95 ⊃ p50 (dark), on a linear scale."""
    label_w, width, row_h, pad = 110, 600, 22, 6
    height = pad * 2 + row_h * max(len(rows), 1)
    peak = max((v for r in rows for v in r[1:] if v is not None), default=0.0) or 1.0
    plot_w = width - label_w - 80
    body = []
    for i, (name, p50, p95, p99) in enumerate(rows):
        y = pad + i * row_h
        body.append(f'<text class="dash-label" x="{label_w - 6}" y="{y + 15}" text-anchor="end">{escape(name)}</text>')
        bars = (("dash-p99", p99, 2, "p99"), ("dash-p95", p95, 5, "p95"), ("dash-p50", p50, 8, "p50"))
        for css, value, inset, q in bars:
            if value is None:
                continue
            w = max(plot_w * value / peak, 1.0)
            tip = escape(f"{name} {q}: {fmt_seconds(value)}")
            body.append(
                f'<rect class="{css}" x="{label_w}" y="{y + inset}" width="{w:.1f}" height="{row_h - 2 * inset}">'
                f"<title>{tip}</title></rect>"
            )
        if p99 is not None:
            x = label_w + max(plot_w * p99 / peak, 1.0) + 4
            body.append(f'<text class="dash-label" x="{x:.1f}" y="{y + 15}">{escape(fmt_seconds(p99))}</text>')
        elif p50 is None:
            body.append(f'<text class="dash-label" x="{label_w}" y="{y + 15}">no samples</text>')
    return _svg(width, height, title, body)


def line_chart(title: str, series: dict[str, Sequence[float | None]], slot_min: int) -> SafeString:
    """One line per series over equal time slots, oldest first; a gap where a slot has no samples."""
    width, height, left, bottom, top = 600, 150, 54, 18, 22  # the legend sits above the plot
    plot_h, plot_w = height - bottom - top, width - left - 6
    values = [v for vs in series.values() for v in vs if v is not None]
    peak = max(values, default=0.0) or 1.0
    n = max((len(vs) for vs in series.values()), default=0)
    step = plot_w / max(n - 1, 1)
    body = [
        f'<line class="dash-axis" x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}"/>',
        f'<text class="dash-label" x="{left - 4}" y="{top + 8}" text-anchor="end">{escape(fmt_seconds(peak))}</text>',
        f'<text class="dash-label" x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>',
        f'<text class="dash-label" x="{left}" y="{height - 4}">−{n * slot_min} min</text>',
        f'<text class="dash-label" x="{width}" y="{height - 4}" text-anchor="end">now</text>',
    ]
    for k, (name, vs) in enumerate(series.items()):
        css = f"dash-s{k % SERIES_CLASSES}"
        lx = left + k * 100
        body.append(
            f'<rect class="{css}" x="{lx}" y="3" width="10" height="10"/>'
            f'<text class="dash-label" x="{lx + 14}" y="12">{escape(name[:14])}</text>'
        )
        segments: list[list[str]] = [[]]
        for i, v in enumerate(vs):
            if v is None:
                segments.append([])
                continue
            x, y = left + i * step, height - bottom - plot_h * v / peak
            segments[-1].append(f"{x:.1f},{y:.1f}")
            body.append(
                f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="2.5">'
                f"<title>{escape(f'{name}: {fmt_seconds(v)}')}</title></circle>"
            )
        for points in segments:
            if len(points) > 1:
                body.append(f'<polyline class="{css} dash-line" points="{" ".join(points)}"/>')
    return _svg(width, height, title, body)
