"""Writing a run's results.json (config, summary, per-request records, per-step series)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modgen.bench.metrics import RequestRecord, record_dict

log = logging.getLogger(__name__)


def scheduler_name(root: DictConfig) -> str:
    """The scheduler a run used (splitfuse when none was given)."""
    return root.scheduler.name if root.get("scheduler") is not None else "splitfuse"


def write_results(
    output_dir: Path,
    root: DictConfig,
    summary: dict[str, Any],
    records: list[RequestRecord],
    steps: list[Any] | None = None,
) -> Path:
    """Write results.json into the run directory and return its path."""
    results = {
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
