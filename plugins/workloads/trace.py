"""``workload=trace``: replay a recorded trace from a JSONL file.

Each line is an object with ``output_len`` (or ``output_tokens``), a prompt as ``prompt``
(token ids) or ``prompt_len`` (random ids of that length), and optionally ``arrival`` (or
``timestamp``): seconds from the start of the trace.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from modgen.registry import register
from modgen.workload import RequestSpec, Workload, WorkloadConfig


@register("workload", "trace")
class TraceWorkload(Workload):
    """Requests (and arrival times) read from a JSONL trace."""

    @dataclass(kw_only=True)
    class Config(WorkloadConfig):
        """Trace replay."""

        path: str = "???"
        """JSONL trace file."""
        num_requests: int = 1_000_000
        """Use at most this many requests from the start of the trace."""
        time_scale: float = 1.0
        """Arrival times are multiplied by this (0.5 replays twice as fast)."""

    def requests(self, vocab_size: int) -> list[RequestSpec]:
        c = self.config
        path = Path(c.path)
        if not path.is_file():
            raise FileNotFoundError(f"workload.path '{c.path}' is not a file")
        rng = random.Random(c.seed)
        specs = []
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        for lineno, line in enumerate(lines[: c.num_requests], start=1):
            try:
                specs.append(self._spec(json.loads(line), rng, vocab_size))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc!r}") from None
        t0 = min((s.arrival for s in specs if s.arrival is not None), default=0.0)
        for s in specs:
            if s.arrival is not None:
                s.arrival = (s.arrival - t0) * c.time_scale
        return specs

    @staticmethod
    def _spec(rec: dict, rng: random.Random, vocab_size: int) -> RequestSpec:
        output_len = int(rec.get("output_len", rec.get("output_tokens")))
        if "prompt" in rec:
            prompt = [int(t) for t in rec["prompt"]]
        else:
            prompt = [rng.randrange(vocab_size) for _ in range(int(rec["prompt_len"]))]
        if not prompt or output_len < 1:
            raise ValueError("needs a non-empty prompt and output_len >= 1")
        arrival = rec.get("arrival", rec.get("timestamp"))
        return RequestSpec(prompt, output_len, None if arrival is None else float(arrival))
