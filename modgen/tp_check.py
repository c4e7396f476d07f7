"""Tensor-parallel check for a machine with 2+ GPUs (NCCL), or the CPU (gloo): a random Llama
checkpoint written by transformers runs at ``engine.tensor_parallel=1`` and ``=N``; the greedy
tokens and the first-token logits of both are compared and each run's wall time and time in
collectives printed. Nothing is downloaded.

    python -m modgen.tp_check                       # cuda when there are 2+ GPUs, else cpu
    python -m modgen.tp_check --device cpu --size tiny --tp 2

Exit status 1 when the logits differ by more than ``--atol`` or a run fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SIZES = {  # transformers LlamaConfig fields
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=96),
    "small": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
}  # fmt: skip


def write_checkpoint(path: Path, size: str) -> None:
    """A random Llama checkpoint (fixed seed) with transformers' own writer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, initializer_range=0.05)
    LlamaForCausalLM(config).save_pretrained(path)


def run(path: Path, tp: int, device: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """One engine at tensor parallelism ``tp``: tokens, first-token logits, times."""
    from modgen import LLM, SamplingParams

    overrides = [f"engine.tensor_parallel={tp}", f"engine.device={device}", "model.dtype=float32"]
    with LLM("llama", checkpoint=str(path), overrides=overrides) as llm:
        first: dict[str, torch.Tensor] = {}
        sample = llm.engine.executor.sampler.sample

        def spy(logits: torch.Tensor, seqs: list[Any], banned: list[list[int]]) -> list[int]:
            for row, seq in zip(logits, seqs, strict=True):
                if seq.num_output_tokens == 0:
                    first.setdefault(seq.request_id, row.float().cpu())
            return sample(logits, seqs, banned)

        llm.engine.executor.sampler.sample = spy
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompts[:1], params)  # warm-up (kernel builds, autotuning)
        first.clear()
        parallel = llm.engine.executor.parallel
        parallel.seconds.clear()  # the measured run's collectives only
        parallel.calls.clear()
        stats_before = len(llm.engine.stats)
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - start
        report = llm.engine.executor.report()
        steps = len(llm.engine.stats) - stats_before
    return {
        "tokens": [o.token_ids for o in outs],
        "logits": torch.stack([first[o.request_id] for o in outs]),
        "wall_s": wall,
        "steps": steps,
        "report": report,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modgen.tp_check", description=__doc__)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--size", choices=list(SIZES), default=None)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--atol", type=float, default=1e-3)
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.device_count() >= a.tp else "cpu")
    size = a.size or ("small" if device == "cuda" else "tiny")
    vocab = SIZES[size]["vocab_size"]
    rng = random.Random(0)
    prompts = [
        [rng.randrange(3, vocab) for _ in range(rng.randint(a.prompt_len // 2, a.prompt_len))]
        for _ in range(a.requests)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), size)
        one = run(Path(tmp), 1, device, prompts, a.max_tokens)
        many = run(Path(tmp), a.tp, device, prompts, a.max_tokens)
    diff = float((one["logits"] - many["logits"]).abs().max())
    same = sum(x == y for x, y in zip(one["tokens"], many["tokens"], strict=True))
    result = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "size": size, "tp": a.tp, "requests": a.requests,
        "max_abs_logit_diff": diff, "identical_outputs": f"{same}/{a.requests}",
        "wall_s_tp1": round(one["wall_s"], 3), f"wall_s_tp{a.tp}": round(many["wall_s"], 3),
        "steps": many["steps"],
        "collectives_ms_per_step": {
            k.removesuffix("_s"): round(1e3 * v / max(1, many["steps"]), 3)
            for k, v in many["report"].items() if k.endswith("_s")
        },
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0 if diff <= a.atol else 1


if __name__ == "__main__":
    sys.exit(main())
