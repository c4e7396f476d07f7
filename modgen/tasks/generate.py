"""``task=generate`` (the default): a synthetic offline generation workload through the engine,
with progress, a results table and results.json in the run directory."""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from modgen.engine import Engine
from modgen.metrics import summarize_requests
from modgen.registry import register
from modgen.sampling_params import SamplingParams
from modgen.task import Task, TaskConfig

log = logging.getLogger(__name__)


@register("task", "generate")
class GenerateTask(Task):
    """Sends ``num_requests`` prompts of random token ids (lengths uniform in the given ranges)
    at once and generates for all of them."""

    @dataclass(kw_only=True)
    class Config(TaskConfig):
        """Synthetic offline workload."""

        num_requests: int = 32
        """Requests, all arriving at the start."""
        prompt_len: list[int] = field(default_factory=lambda: [32, 512])
        """Prompt lengths are uniform in [min, max]."""
        output_len: list[int] = field(default_factory=lambda: [32, 128])
        """Generated lengths are uniform in [min, max] (EOS is ignored)."""
        temperature: float = 0.0
        """0 is greedy."""
        seed: int = 0
        """Seed of the lengths and token ids."""

        def __post_init__(self) -> None:
            for name in ("prompt_len", "output_len"):
                bounds = getattr(self, name)
                if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1]:
                    raise ValueError(f"task.{name} must be [min, max] with 1 <= min <= max")

    config: Config

    def workload(self, vocab_size: int) -> list[tuple[list[int], SamplingParams]]:
        """The prompts and their parameters."""
        c, rng = self.config, random.Random(self.config.seed)
        reqs = []
        for _ in range(c.num_requests):
            prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(*c.prompt_len))]
            n = rng.randint(*c.output_len)
            params = SamplingParams(
                max_tokens=n, min_tokens=n, temperature=c.temperature, ignore_eos=True
            )
            reqs.append((prompt, params))
        return reqs

    def run(self, root: DictConfig, output_dir: Path) -> dict[str, Any]:
        engine = Engine.from_config(root)
        reqs = self.workload(engine.model.vocab_size)
        start = time.perf_counter()
        seqs = [engine.add_request(p, sp, arrival_time=start) for p, sp in reqs]
        total = sum(sp.max_tokens for _, sp in reqs)
        with tqdm(total=total, desc="tokens", unit="tok", disable=None, file=sys.stdout) as bar:
            while engine.has_unfinished():
                bar.update(len(engine.step()))
        wall = time.perf_counter() - start
        summary = summarize_requests([s.metrics for s in seqs], wall)
        summary.update(
            prompt_tokens=sum(s.num_prompt_tokens for s in seqs),
            steps=len(engine.stats),
            preemptions=sum(s.metrics.num_preemptions for s in seqs),
            scheduler=engine.scheduler.registry_name,
            model=engine.model.registry_name,
        )
        print(format_table(summary))
        results = {
            "config": OmegaConf.to_container(root, resolve=True),
            "summary": summary,
            "requests": [_record(s) for s in seqs],
        }
        path = output_dir / "results.json"
        path.write_text(json.dumps(results, indent=1))
        log.info("wrote %s", path)
        return summary


def _record(seq) -> dict[str, Any]:
    m = seq.metrics
    return {
        "request_id": seq.request_id,
        "prompt_tokens": seq.num_prompt_tokens,
        "output_tokens": seq.num_output_tokens,
        "ttft_s": m.ttft,
        "tpot_s": m.tpot,
        "e2e_s": m.finish_time - m.arrival_time,
        "preemptions": m.num_preemptions,
        "finish_reason": seq.finish_reason.value,
    }


def format_table(s: dict[str, Any]) -> str:
    """The main job's results as an aligned two-column table."""
    rows = [
        ("model / scheduler", f"{s['model']} / {s['scheduler']}"),
        ("requests", f"{s['requests']}"),
        ("prompt tokens", f"{s['prompt_tokens']}"),
        ("generated tokens", f"{s['output_tokens']}"),
        ("wall time", f"{s['wall_time_s']:.2f} s"),
        (
            "throughput",
            f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} gen tok/s",
        ),
        ("TTFT p50 / p95", f"{s['ttft_p50_s'] * 1e3:.0f} / {s['ttft_p95_s'] * 1e3:.0f} ms"),
        ("TPOT p50 / p95", f"{s['tpot_p50_s'] * 1e3:.1f} / {s['tpot_p95_s'] * 1e3:.1f} ms"),
        ("steps / preemptions", f"{s['steps']} / {s['preemptions']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
