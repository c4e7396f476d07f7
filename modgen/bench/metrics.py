"""Per-request timelines and their summaries, with the definitions FastGen and vLLM use.

All times are seconds. TTFT: first token minus send. TPOT: mean gap between output tokens
after the first. ITL: every gap between consecutive tokens. E2E: finish minus send.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    prompt_tokens: int
    output_len: int
    """Tokens asked for."""
    send_time: float
    token_times: list[float] = field(default_factory=list)
    """When each output token arrived."""
    finish_time: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Finished without error."""
        return self.error is None and self.finish_time is not None

    @property
    def output_tokens(self) -> int:
        """Tokens received."""
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return self.token_times[0] - self.send_time if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        """Inter-token latencies."""
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def e2e(self) -> float | None:
        """End-to-end latency."""
        return None if self.finish_time is None else self.finish_time - self.send_time


@dataclass(kw_only=True)
class SLAConfig:
    """FastGen's service-level agreement for effective throughput."""

    prompt_rate: float = 512.0
    """A request's TTFT must be at most prompt_tokens / prompt_rate seconds."""
    gen_rate: float = 4.0
    """The EMA of its inter-token gaps must never exceed 1 / gen_rate seconds."""
    ema_span: int = 16
    """Span of that exponential moving average (alpha = 2 / (span + 1))."""


@dataclass(kw_only=True)
class GoodputConfig:
    """vLLM-style goodput limits; a request counts when it meets every limit that is set."""

    ttft_s: float | None = None
    """Most TTFT."""
    tpot_s: float | None = None
    """Most TPOT."""
    e2e_s: float | None = None
    """Most end-to-end latency."""


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation; NaN for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ema_max(intervals: list[float], span: int) -> float:
    """Largest value the exponential moving average of ``intervals`` takes (0 for none)."""
    if not intervals:
        return 0.0
    alpha = 2.0 / (span + 1)
    ema = peak = intervals[0]
    for x in intervals[1:]:
        ema = alpha * x + (1 - alpha) * ema
        peak = max(peak, ema)
    return peak


def meets_sla(rec: RequestRecord, sla: SLAConfig) -> bool:
    """FastGen's SLA: prompt processed at ``prompt_rate`` and tokens streamed at ``gen_rate``."""
    if not rec.ok or rec.ttft is None:
        return False
    if rec.ttft > rec.prompt_tokens / sla.prompt_rate:
        return False
    return ema_max(rec.itls, sla.ema_span) <= 1.0 / sla.gen_rate


def meets_goodput(rec: RequestRecord, g: GoodputConfig) -> bool:
    """Whether ``rec`` meets every goodput limit that is set."""
    if not rec.ok:
        return False
    checks = ((g.ttft_s, rec.ttft), (g.tpot_s, rec.tpot), (g.e2e_s, rec.e2e))
    return all(limit is None or (v is not None and v <= limit) for limit, v in checks)


def distribution(name: str, values: list[float]) -> dict[str, float]:
    """``{name}_mean_s`` and ``{name}_p{q}_s`` for q in PERCENTILES."""
    out = {f"{name}_mean_s": sum(values) / len(values) if values else math.nan}
    out.update({f"{name}_p{q}_s": percentile(values, q) for q in PERCENTILES})
    return out


def summarize(
    records: list[RequestRecord],
    wall_time: float,
    sla: SLAConfig | None = None,
    goodput: GoodputConfig | None = None,
    short_prompt: int | None = None,
) -> dict[str, Any]:
    """Throughputs, latency distributions, effective throughput and goodput of a run; with
    ``short_prompt``, also the TTFT of requests with at most that many prompt tokens alone
    (``ttft_short_*``)."""
    sla = sla or SLAConfig()
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "wall_time_s": wall_time,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / wall_time,
        "output_throughput": out_tokens / wall_time,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / wall_time,
    }
    summary.update(distribution("ttft", [r.ttft for r in ok if r.ttft is not None]))
    summary.update(distribution("tpot", [r.tpot for r in ok if r.tpot is not None]))
    summary.update(distribution("itl", [x for r in ok for x in r.itls]))
    summary.update(distribution("e2e", [r.e2e for r in ok]))
    if short_prompt is not None:
        short = [r.ttft for r in ok if r.ttft is not None and r.prompt_tokens <= short_prompt]
        summary["short_requests"] = len(short)
        summary.update(distribution("ttft_short", short))
    meeting = sum(meets_sla(r, sla) for r in records)
    summary["sla_fraction"] = meeting / len(records) if records else math.nan
    summary["effective_throughput"] = meeting / wall_time
    if goodput is not None and any(v is not None for v in vars(goodput).values()):
        summary["goodput"] = sum(meets_goodput(r, goodput) for r in records) / wall_time
    return summary


def summarize_steps(stats: list[Any], kv_blocks: int) -> dict[str, float]:
    """Per-step figures of an in-process run (the engine's StepStats)."""
    n = len(stats)
    if not n:
        return {"steps": 0}
    return {
        "steps": n,
        "step_tokens_mean": sum(s.num_tokens for s in stats) / n,
        "step_prefill_tokens": sum(s.num_prefill_tokens for s in stats),
        "step_decode_tokens": sum(s.num_decode_tokens for s in stats),
        "step_seqs_mean": sum(s.num_seqs for s in stats) / n,
        "step_time_mean_s": sum(s.duration for s in stats) / n,
        "kv_blocks_used_max": max(s.kv_blocks_used for s in stats),
        "kv_blocks_total": kv_blocks,
        "preemptions": sum(s.num_preempted for s in stats),
    }


def prefix_cache_summary(
    now: dict[str, Any], before: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Hit rate and tokens saved from a prefix cache's counters (``prefix_cache_queries`` and
    ``prefix_cache_hits``, in tokens) now, less those at ``before``; empty without a cache."""
    if "prefix_cache_queries" not in now:
        return {}
    before = before or {}
    queried = now["prefix_cache_queries"] - before.get("prefix_cache_queries", 0)
    hits = now["prefix_cache_hits"] - before.get("prefix_cache_hits", 0)
    return {
        "prefix_cache_queried_tokens": queried,
        "prefix_cache_hit_tokens": hits,
        "prefix_cache_hit_rate": hits / queried if queried else 0.0,
    }


def summary_table(s: dict[str, Any], title: str) -> str:
    """A run's summary as an aligned two-column table (latencies in ms)."""

    def ms(key: str) -> str:
        return f"{s[key] * 1e3:.1f}" if key in s and not math.isnan(s[key]) else "-"

    rows = [
        ("run", title),
        ("requests (failed)", f"{s['requests']} ({s['failed']})"),
        ("prompt / generated tokens", f"{s['prompt_tokens']} / {s['output_tokens']}"),
        ("wall time", f"{s['wall_time_s']:.2f} s"),
        (
            "throughput",
            f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} gen tok/s, "
            f"{s['total_token_throughput']:.1f} tok/s",
        ),
    ]
    for name in ("ttft", "ttft_short", "tpot", "itl", "e2e"):
        if f"{name}_p50_s" not in s or (name == "ttft_short" and not s.get("short_requests")):
            continue
        rows.append(
            (
                f"{name.upper().replace('_SHORT', ' short')} p50 / p95 / p99",
                f"{ms(f'{name}_p50_s')} / {ms(f'{name}_p95_s')} / {ms(f'{name}_p99_s')} ms",
            )
        )
    rows.append(
        (
            "effective throughput",
            f"{s['effective_throughput']:.2f} req/s ({s['sla_fraction']:.0%} meet the SLA)",
        )
    )
    if "roofline_bound_s" in s:
        rows.append(
            (
                "roofline bound / efficiency",
                f"{s['roofline_bound_s']:.2f} s ({s['roofline_flops'] / 1e12:.2f} TFLOP at "
                f"{s['roofline_machine_gflops']:.0f} GFLOP/s) / {s['roofline_efficiency']:.2f}x",
            )
        )
    if "goodput" in s:
        rows.append(("goodput", f"{s['goodput']:.2f} req/s"))
    if "prefix_cache_hit_rate" in s:
        rows.append(
            (
                "prefix cache hit rate / tokens saved",
                f"{s['prefix_cache_hit_rate']:.1%} / {s['prefix_cache_hit_tokens']} of "
                f"{s['prefix_cache_queried_tokens']} tokens",
            )
        )
    if "steps" in s:
        rows.append(
            (
                "steps / tokens per step / preemptions",
                f"{s['steps']} / {s.get('step_tokens_mean', 0):.1f} / {s.get('preemptions', 0)}",
            )
        )
    if "machine" in s:
        rows.append(("machine", s["machine"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def record_dict(rec: RequestRecord) -> dict[str, Any]:
    """A record as stored in results.json."""
    return {
        "prompt_tokens": rec.prompt_tokens,
        "output_tokens": rec.output_tokens,
        "ttft_s": rec.ttft,
        "tpot_s": rec.tpot,
        "e2e_s": rec.e2e,
        "itl_s": [round(x, 6) for x in rec.itls],
        "error": rec.error,
    }
