"""Baseline: Hugging Face ``generate`` with static batches (left-padded, EOS ignored), writing a
modgen results.json so it lands in the same comparison.

    python experiments/peers/hf_static.py CKPT OUT_DIR [modgen workload overrides...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from modgen import registry
from modgen.bench.metrics import RequestRecord, record_dict, summarize, summary_table
from modgen.bench.roofline import roofline
from modgen.config import compose_config
from modgen.model import describe_model


class StepClock:
    """A logits processor that stamps the time of every generation step of the batch."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run(ckpt: str, out: Path, overrides: list[str], batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    cfg = compose_config([f"model.checkpoint={ckpt}", *overrides])
    specs = registry.build("workload", cfg.workload).requests(describe_model(cfg.model).vocab_size)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    records, start = [], time.perf_counter()
    for i in range(0, len(specs), batch_size):
        batch = specs[i : i + batch_size]
        width = max(len(s.prompt) for s in batch)
        ids = torch.tensor([[0] * (width - len(s.prompt)) + s.prompt for s in batch])
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in batch])
        n = max(s.output_len for s in batch)
        clock = StepClock()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=0,
            )
        done = time.perf_counter()
        for s in batch:
            times = clock.times[: s.output_len]
            records.append(RequestRecord(len(s.prompt), s.output_len, start, times, done))
    wall = time.perf_counter() - start
    summary = summarize(records, wall)
    spec = describe_model(cfg.model)
    done_reqs = [(r.prompt_tokens, r.output_tokens) for r in records]
    steps = sum(
        max(s.output_len for s in specs[i : i + batch_size])
        for i in range(0, len(specs), batch_size)
    )
    summary.update({f"roofline_{k}": v for k, v in roofline(spec, done_reqs, steps, wall).items()})
    summary.update(scheduler=f"hf-static-{batch_size}", target="transformers generate")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": OmegaConf.to_container(cfg, resolve=True),
                "summary": summary,
                "requests": [record_dict(r) for r in records],
            },
            indent=1,
        )
    )
    print(summary_table(summary, f"HF generate, static batches of {batch_size}"))
    return summary


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("ckpt")
    p.add_argument("out", type=Path)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    run(a.ckpt, a.out, a.overrides, a.batch_size)
    sys.exit(0)
