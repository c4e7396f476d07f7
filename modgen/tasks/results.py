"""Writing a run's results.json (config, summary, per-request records, per-step series)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modgen import machine
from modgen.bench.metrics import (
    RequestRecord,
    prefix_cache_summary,
    record_dict,
    summarize_steps,
)
from modgen.bench.roofline import roofline
from modgen.model import describe_model

log = logging.getLogger(__name__)


def scheduler_name(root: DictConfig) -> str:
    """The scheduler a run used (splitfuse when none was given)."""
    return root.scheduler.name if root.get("scheduler") is not None else "splitfuse"


def roofline_summary(
    root: DictConfig,
    records: list[RequestRecord],
    steps: int,
    wall_time: float,
    engine: Any | None = None,
) -> dict[str, Any]:
    """The machine the run was measured on, and the run's FLOPs, bytes, machine bound and
    efficiency (see modgen.bench.roofline). A simulated run names what it simulated instead:
    this machine's roofline says nothing about it."""
    if engine is not None and engine.clock.virtual:
        return {"machine": f"simulated: {engine.executor.describe()}"}
    done = [(r.prompt_tokens, r.output_tokens) for r in records if r.ok]
    bound = roofline(describe_model(root.model), done, steps, wall_time)
    return {"machine": machine.machine_line(), **{f"roofline_{k}": v for k, v in bound.items()}}


def engine_summary(engine: Any, kv_before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-step figures, the model, what the executor reports (a simulation's cost model) and
    the prefix cache's hits since ``kv_before`` (an earlier ``kv.report()``), if it has one."""
    out = summarize_steps(engine.stats, engine.kv.num_blocks)
    out.update(model=engine.spec.family, executor=engine.executor.registry_name)
    out.update({f"executor_{k}": v for k, v in engine.executor.report().items()})
    out.update({f"scheduler_{k}": v for k, v in engine.scheduler.report().items()})
    out.update(prefix_cache_summary(engine.kv.report(), kv_before))
    return out


def write_results(
    output_dir: Path,
    root: DictConfig,
    summary: dict[str, Any],
    records: list[RequestRecord],
    steps: list[Any] | None = None,
) -> Path:
    """Write results.json into the run directory and return its path."""
    results = {
        "machine": machine.cpu_info(),
        "config": OmegaConf.to_container(root, resolve=True),
        "summary": summary,
        "requests": [record_dict(r) for r in records],
    }
    if steps:
        results["steps"] = {
            "tokens": [s.num_tokens for s in steps],
            "prefill_tokens": [s.num_prefill_tokens for s in steps],
            "decode_tokens": [s.num_decode_tokens for s in steps],
            "seqs": [s.num_seqs for s in steps],
            "kv_blocks_used": [s.kv_blocks_used for s in steps],
            "preempted": [s.num_preempted for s in steps],
            "duration_s": [round(s.duration, 6) for s in steps],
        }
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=1))
    log.info("wrote %s", path)
    return path
