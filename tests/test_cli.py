"""``python -m modgen`` as users type it: the main job, multirun, and clear config errors."""

from __future__ import annotations

import json
import subprocess
import sys

from modgen.machine import machine_line

SMALL = [
    "workload.num_requests=4",
    "workload.prompt_len=[8,40]",
    "workload.output_len=[3,6]",
    "model.num_hidden_layers=2",
]


def modgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modgen", *args], capture_output=True, text=True, timeout=300
    )


def test_main_job_prints_table_and_writes_results(tmp_path):
    res = modgen("+scheduler=splitfuse", "model=mistral", *SMALL, f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    for row in ("requests", "generated tokens", "TTFT p50 / p95 / p99", "TPOT p50 / p95 / p99"):
        assert row in res.stdout
    assert machine_line() in res.stdout  # every figure names its machine
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["machine"]["cpu"] in results["summary"]["machine"]
    assert results["summary"]["requests"] == 4
    assert results["summary"]["scheduler"] == "splitfuse"
    for r in results["requests"]:
        assert 3 <= r["output_tokens"] <= 6 and r["error"] is None
        assert r["ttft_s"] > 0


def test_without_a_scheduler_splitfuse_is_used_and_logged(tmp_path):
    res = modgen(*SMALL, "workload.num_requests=1", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    assert "no scheduler given (+scheduler=NAME); using splitfuse" in res.stdout + res.stderr


def test_multirun_sweeps_a_parameter(tmp_path):
    res = modgen(
        "-m", "+scheduler=splitfuse,continuous", *SMALL, "workload.num_requests=2",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    runs = sorted(tmp_path.glob("*/results.json"))
    assert len(runs) == 2
    names = {json.loads(p.read_text())["summary"]["scheduler"] for p in runs}
    assert names == {"splitfuse", "continuous"}


def test_config_errors_name_the_problem():
    res = modgen("+scheduler=splitfuse", "scheduler.token_budgt=3")
    assert res.returncode != 0 and "token_budgt" in res.stderr
    res = modgen("+scheduler=nope")
    assert res.returncode != 0
    assert "Available options in 'scheduler'" in res.stderr and "splitfuse" in res.stderr
