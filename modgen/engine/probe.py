"""Synthetic steps run on an engine's own executor: how long a step of a given size takes on it
(measured on a real executor, predicted by a simulated one). Schedulers calibrate against it
(``Scheduler.calibrate``); ``task=profile`` times its grid with the same sequences."""

from __future__ import annotations

import itertools

from modgen.engine.clock import Clock
from modgen.engine.executor import Executor
from modgen.engine.kv import KVAllocator
from modgen.engine.scheduling import StepPlan
from modgen.engine.sequence import Sequence
from modgen.sampling_params import SamplingParams


def synthetic_sequence(
    seq_id: int, prompt_len: int, outputs: int, computed: int | None = None
) -> Sequence:
    """A sequence of ``prompt_len`` dummy prompt tokens, ``computed`` of them (all by default)
    already in its KV, that may generate ``outputs`` tokens and one more."""
    seq = Sequence(
        seq_id=seq_id,
        request_id=f"probe-{seq_id}",
        prompt_token_ids=[1] * prompt_len,
        params=SamplingParams(max_tokens=max(outputs, 1) + 1, temperature=0.0, ignore_eos=True),
        max_total_tokens=prompt_len + 2,
    )
    seq.num_computed = prompt_len if computed is None else computed
    return seq


class StepProbe:
    """``probe(n)``: the seconds one step of ``n`` tokens takes on ``executor`` (by its clock):
    up to ``decodes`` decodes at ``context`` tokens each, and a prompt chunk after ``context``
    cached tokens that fills the rest, as a SplitFuse step in a busy server looks. The context
    shrinks to fit the model's length and the KV cache; a step that cannot fit at all raises
    ValueError. KV is taken and given back around each step, so run it only while the engine
    holds no request."""

    def __init__(
        self,
        executor: Executor,
        kv: KVAllocator,
        clock: Clock,
        max_model_len: int,
        decodes: int = 16,
        context: int = 512,
    ) -> None:
        self.executor, self.kv, self.clock = executor, kv, clock
        self.max_model_len, self.decodes, self.context = max_model_len, decodes, context
        self._ids = itertools.count(-1, -1)  # below every real request's id

    def shape(self) -> dict[str, int]:
        """What the probed steps hold beyond their size (for a calibration's cache key)."""
        return {"decodes": self.decodes, "context": self.context}

    def __call__(self, num_tokens: int) -> float:
        decodes = min(self.decodes, num_tokens // 4)
        chunk = num_tokens - decodes
        ctx = min(self.context, self.max_model_len - chunk - 1)
        capacity = self.kv.capacity_tokens - self.kv.block_size * (decodes + 1)  # partial blocks
        ctx = min(ctx, (capacity - chunk) // (decodes + 1) - 1)
        if ctx < 1:
            raise ValueError(
                f"a step of {num_tokens} tokens does not fit (max_model_len "
                f"{self.max_model_len}, KV cache {self.kv.capacity_tokens} tokens)"
            )
        seqs = [(synthetic_sequence(next(self._ids), ctx, 1), 1) for _ in range(decodes)]
        for seq, _ in seqs:
            seq.token_ids.append(0)  # one output token: this step decodes it
        seqs.append((synthetic_sequence(next(self._ids), ctx + chunk, 0, computed=ctx), chunk))
        plan = StepPlan()
        try:
            for seq, n in seqs:
                self.kv.allocate(seq.seq_id, seq.num_computed + n)
                plan.add(seq, n)
            start = self.clock.now()
            self.executor.execute(plan, [[] for c in plan.chunks if c.completes])
            return self.clock.now() - start
        finally:
            for seq, _ in seqs:
                self.kv.free(seq.seq_id)
                self.executor.release(seq)
