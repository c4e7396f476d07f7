"""Comparison of runs: a CSV of every run's summary and plots (latency vs throughput per
scheduler, effective throughput vs load, TTFT and inter-token latency CDFs).

Written after every Hydra multirun by ``ComparisonCallback``; ``python -m modgen.report DIR``
redraws them from the ``results.json`` files under DIR.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)
LOAD_KEYS = ("task.clients", "task.rate")


def _overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    return dict(o.lstrip("+~").split("=", 1) for o in items if "=" in o)


def load_runs(root: Path) -> list[dict[str, Any]]:
    """Every run under ``root``: its directory, overrides, summary and per-request records."""
    runs = []
    for path in sorted(root.rglob("results.json")):
        data = json.loads(path.read_text())
        runs.append(
            {
                "dir": path.parent,
                "overrides": _overrides(path.parent),
                "summary": data["summary"],
                "requests": data.get("requests", []),
            }
        )
    varying = sorted(
        {k for r in runs for k in r["overrides"]}
        - {k for k in _common(runs)}
    )  # fmt: skip
    for r in runs:
        if not r["dir"].name.isdigit():  # a named run (not a sweep's numbered job): its name
            r["label"] = r["group"] = r["dir"].name
            continue
        r["label"] = " ".join(f"{k}={r['overrides'].get(k)}" for k in varying) or r["dir"].name
        r["group"] = " ".join(
            f"{k}={r['overrides'].get(k)}" for k in varying if k not in LOAD_KEYS
        ) or r["summary"].get("scheduler", "run")
    return runs


def _common(runs: list[dict[str, Any]]) -> set[str]:
    """Override keys that have the same value in every run."""
    if not runs:
        return set()
    first = runs[0]["overrides"]
    return {k for k, v in first.items() if all(r["overrides"].get(k) == v for r in runs)}


def write_csv(runs: list[dict[str, Any]], path: Path) -> None:
    """One row per run: its label, overrides and summary."""
    keys = sorted({k for r in runs for k, v in r["summary"].items() if not isinstance(v, dict)})
    over = sorted({k for r in runs for k in r["overrides"]})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "label", *over, *keys])
        for r in runs:
            w.writerow(
                [r["dir"].name, r["label"]]
                + [r["overrides"].get(k, "") for k in over]
                + [r["summary"].get(k, "") for k in keys]
            )


def _load(r: dict[str, Any]) -> float:
    s = r["summary"]
    return s.get("clients") or s.get("rate") or 0


def plot_all(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Draw the comparison plots into ``out_dir``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list] = defaultdict(list)
    for r in runs:
        groups[r["group"]].append(r)
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [
        ("output_throughput", "itl_p95_s", "output tokens/s", "p95 inter-token latency (s)"),
        ("request_throughput", "e2e_p95_s", "requests/s", "p95 end-to-end latency (s)"),
    ]
    for ax, (x, y, xl, yl) in zip(axes, panels, strict=True):
        for name, rs in groups.items():
            rs = sorted(rs, key=_load)
            ax.plot([r["summary"][x] for r in rs], [r["summary"][y] for r in rs], "o-", label=name)
        ax.set(xlabel=xl, ylabel=yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Latency vs throughput (points: increasing load)")
    written.append(_save(fig, out_dir / "latency_vs_throughput.png"))

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, rs in groups.items():
        rs = sorted(rs, key=_load)
        ax.plot([_load(r) for r in rs], [r["summary"]["effective_throughput"] for r in rs], "o-",
                label=name)  # fmt: skip
    ax.set(xlabel="clients (closed loop) or rate (open loop)",
           ylabel="effective throughput (req/s)", title="FastGen effective throughput")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "effective_throughput.png"))

    for metric, key, title in (("ttft", "ttft_s", "TTFT"), ("itl", "itl_s", "inter-token latency")):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for r in runs:
            xs = sorted(_values(r["requests"], key))
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=r["label"])
        ax.set(xlabel=f"{title} (s, log scale)", ylabel="fraction of " + ("requests"
               if metric == "ttft" else "tokens"), title=f"{title} CDF", xscale="log")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / f"{metric}_cdf.png"))
    return written


def _values(requests: list[dict[str, Any]], key: str) -> list[float]:
    out: list[float] = []
    for rec in requests:
        v = rec.get(key)
        if isinstance(v, list):
            out.extend(v)
        elif v is not None:
            out.append(v)
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def report(root: Path) -> list[Path]:
    """Write comparison.csv and the plots beside the runs under ``root``."""
    runs = load_runs(root)
    if not runs:
        log.warning("no results.json under %s", root)
        return []
    csv_path = root / "comparison.csv"
    write_csv(runs, csv_path)
    paths = [csv_path, *plot_all(runs, root)]
    log.info("comparison of %d runs written to %s", len(runs), root)
    return paths


class ComparisonCallback(Callback):
    """Hydra callback: after a multirun, write the comparison beside its runs."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        paths = report(Path(config.hydra.sweep.dir))
        for p in paths:
            print(f"comparison: {p}")


def main(argv: list[str] | None = None) -> None:
    """``python -m modgen.report DIR``: redraw the comparison of the runs under DIR."""
    parser = argparse.ArgumentParser(prog="python -m modgen.report", description=main.__doc__)
    parser.add_argument("dir", type=Path, help="a multirun directory (or any folder of runs)")
    args = parser.parse_args(argv)
    paths = report(args.dir)
    if not paths:
        raise SystemExit(f"no results.json under {args.dir}")
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
