"""``task=fidelity`` (``+experiment=sim_fidelity``): how well ``executor=sim`` predicts this
machine. Profiles the model (unless its profile is cached), runs the same bench workloads for
real and in simulation over schedulers and client counts, and writes the predicted-against-
measured table (fidelity.csv, fidelity.md) and plot (fidelity.png) into the run directory."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modgen.model import describe_model
from modgen.profiling import Profile
from modgen.registry import register
from modgen.task import Task, TaskConfig
from modgen.tasks.bench import BenchTask
from modgen.tasks.profile import ProfileTask

log = logging.getLogger(__name__)

METRICS = {  # summary key -> (label, tolerance)
    "request_throughput": ("req/s", 0.05),
    "ttft_mean_s": ("TTFT mean", 0.10),
    "ttft_p50_s": ("TTFT p50", 0.10),
    "ttft_p95_s": ("TTFT p95", 0.10),
    "itl_mean_s": ("ITL mean", 0.10),
    "itl_p50_s": ("ITL p50", 0.10),
    "itl_p95_s": ("ITL p95", 0.10),
}


@register("task", "fidelity")
class FidelityTask(Task):
    """Runs every (scheduler, clients) pair for real and simulated on the configured workload,
    and compares request throughput and TTFT / inter-token latency (mean, p50, p95)."""

    @dataclass(kw_only=True)
    class Config(TaskConfig):
        """What to compare over."""

        schedulers: list[str] = field(default_factory=lambda: ["splitfuse", "continuous"])
        """Schedulers to run."""
        clients: list[int] = field(default_factory=lambda: [1, 4, 16])
        """Closed-loop client counts."""
        reprofile: bool = False
        """Measure a new profile even if this model's is cached."""

    config: Config

    def run(self, root: DictConfig, output_dir: Path) -> dict[str, Any]:
        c = self.config
        real_root = _with(root, executor={"name": "model"})
        attention = root.attention.get("name", "auto")
        path = Profile.default_path(describe_model(root.model), attention)
        if c.reprofile or not path.is_file():
            (output_dir / "profile").mkdir(parents=True, exist_ok=True)
            ProfileTask(ProfileTask.Config()).run(real_root, output_dir / "profile")
        sim = {
            "executor": {"name": "sim"},
            "cost_model": {"name": "profiled", "profile": str(path)},
        }
        rows = []
        for sched in c.schedulers:
            for n in c.clients:
                runs = {}
                for kind, extra in (("real", {}), ("sim", sim)):
                    run_dir = output_dir / f"{kind}-{sched}-{n}"
                    run_dir.mkdir(parents=True, exist_ok=True)
                    cfg = _with(real_root, scheduler={"name": sched}, **extra)
                    runs[kind] = BenchTask(BenchTask.Config(clients=n)).run(cfg, run_dir)
                rows.append(_compare(sched, n, runs["real"], runs["sim"]))
        table = write_tables(rows, output_dir)
        plot(rows, output_dir / "fidelity.png")
        print(table)
        missed = sum(not r[f"{k}_ok"] for r in rows for k in METRICS)
        return {"runs": len(rows), "cells_missed": missed, "cells": len(rows) * len(METRICS)}


def _with(root: DictConfig, **nodes: Any) -> DictConfig:
    """A copy of ``root`` with whole nodes replaced (not merged: another component's keys
    would not fit the new one's schema)."""
    data = OmegaConf.to_container(root, resolve=True)
    data.update(nodes)
    return OmegaConf.create(data)


def _compare(sched: str, clients: int, real: dict, sim: dict) -> dict[str, Any]:
    row: dict[str, Any] = {"scheduler": sched, "clients": clients}
    for key, (_, tol) in METRICS.items():
        m, p = real[key], sim[key]
        err = (p - m) / m if m else float("nan")
        row.update({f"{key}_real": m, f"{key}_sim": p, f"{key}_err": err})
        row[f"{key}_ok"] = abs(err) <= tol
    return row


def write_tables(rows: list[dict[str, Any]], out: Path) -> str:
    """fidelity.csv (every figure) and fidelity.md (measured / predicted / error per cell);
    returns the markdown."""
    with (out / "fidelity.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = ["scheduler", "clients", *(f"{label} (±{tol:.0%})" for label, tol in METRICS.values())]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = []
        for key in METRICS:
            mark = "" if r[f"{key}_ok"] else " **miss**"
            cells.append(f"{_fmt(key, r[f'{key}_real'])} / {_fmt(key, r[f'{key}_sim'])} / "
                         f"{r[f'{key}_err']:+.1%}{mark}")  # fmt: skip
        lines.append(f"| {r['scheduler']} | {r['clients']} | " + " | ".join(cells) + " |")
    table = "measured / simulated / error\n\n" + "\n".join(lines)
    (out / "fidelity.md").write_text(table + "\n")
    return table


def _fmt(key: str, value: float) -> str:
    return f"{value:.3f}" if key == "request_throughput" else f"{value * 1e3:.1f} ms"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Predicted against measured, one panel per metric, with the tolerance band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    for ax, (key, (label, tol)) in zip(axes.flat, METRICS.items(), strict=False):
        for r in rows:
            marker = "o" if r["scheduler"] == "splitfuse" else "s"
            ax.scatter(r[f"{key}_real"], r[f"{key}_sim"], marker=marker,
                       label=f"{r['scheduler']} x{r['clients']}")  # fmt: skip
            ax.annotate(str(r["clients"]), (r[f"{key}_real"], r[f"{key}_sim"]), fontsize=7)
        lo = min(min(r[f"{key}_real"], r[f"{key}_sim"]) for r in rows) * 0.8
        hi = max(max(r[f"{key}_real"], r[f"{key}_sim"]) for r in rows) * 1.2
        xs = [lo, hi]
        ax.plot(xs, xs, "k-", lw=0.8)
        ax.fill_between(xs, [x * (1 - tol) for x in xs], [x * (1 + tol) for x in xs], alpha=0.15)
        ax.set(xscale="log", yscale="log", title=f"{label} (±{tol:.0%})", xlabel="measured",
               ylabel="simulated")  # fmt: skip
        for axis in (ax.xaxis, ax.yaxis):  # minor-tick labels on a log axis overlap
            axis.set_minor_formatter(NullFormatter())
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
