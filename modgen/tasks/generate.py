"""``task=generate`` (the default): the workload's requests all arrive at once and run through
the engine offline, with progress, a results table and results.json in the run directory."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from modgen import registry
from modgen.bench.metrics import RequestRecord, summarize, summary_table
from modgen.engine import Engine
from modgen.registry import register
from modgen.sampling_params import SamplingParams
from modgen.task import Task, TaskConfig
from modgen.tasks.results import engine_summary, roofline_summary, scheduler_name, write_results

log = logging.getLogger(__name__)


@register("task", "generate")
class GenerateTask(Task):
    """Offline generation of the configured workload (EOS ignored, every request generates its
    full output length)."""

    @dataclass(kw_only=True)
    class Config(TaskConfig):
        """Offline generation settings."""

        temperature: float = 0.0
        """0 is greedy."""

    config: Config

    def run(self, root: DictConfig, output_dir: Path) -> dict[str, Any]:
        engine = Engine.from_config(root)
        specs = registry.build("workload", root.workload).requests(engine.spec.vocab_size)
        start = engine.clock.now()
        seqs = []
        for spec in specs:
            n = spec.output_len
            params = SamplingParams(
                max_tokens=n, min_tokens=n, temperature=self.config.temperature, ignore_eos=True
            )
            seqs.append(
                engine.add_request(spec.prompt, params, arrival_time=start, priority=spec.priority)
            )
        total = sum(s.output_len for s in specs)
        with tqdm(total=total, desc="tokens", unit="tok", disable=None, file=sys.stdout) as bar:
            while engine.has_unfinished():
                bar.update(len(engine.step()))
        wall = engine.clock.now() - start
        records = [
            RequestRecord(
                s.num_prompt_tokens,
                s.params.max_tokens,
                send_time=start,
                token_times=s.metrics.token_times,
                finish_time=s.metrics.finish_time,
                error=s.error,
            )
            for s in seqs
        ]
        summary = summarize(records, wall)
        summary.update(roofline_summary(root, records, len(engine.stats), wall, engine))
        summary.update(engine_summary(engine), scheduler=scheduler_name(root))
        print(summary_table(summary, f"generate: {summary['model']} / {summary['scheduler']}"))
        write_results(output_dir, root, summary, records, engine.stats)
        return summary
