"""Summaries of request timings."""

from __future__ import annotations

import math
from collections.abc import Iterable

from modgen.sequence import RequestMetrics


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_requests(metrics: list[RequestMetrics], wall_time: float) -> dict[str, float]:
    """Throughput and TTFT / TPOT percentiles of finished requests."""
    ttft = [m.ttft for m in metrics if m.ttft is not None]
    tpot = [m.tpot for m in metrics if m.tpot is not None]
    gen = sum(len(m.token_times) for m in metrics)
    out = {
        "requests": len(metrics),
        "wall_time_s": wall_time,
        "request_throughput": len(metrics) / wall_time,
        "output_tokens": gen,
        "output_throughput": gen / wall_time,
    }
    for name, xs in (("ttft", ttft), ("tpot", tpot)):
        for q in (50, 95):
            out[f"{name}_p{q}_s"] = percentile(xs, q)
    return out
