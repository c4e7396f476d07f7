"""``executor=model`` (the default): runs a torch model over the paged KV cache, on the wall
clock."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from modgen import registry
from modgen.engine.batch import build_ragged_batch
from modgen.engine.clock import WallClock
from modgen.engine.executor import Executor, ExecutorConfig, ExecutorContext
from modgen.engine.sampler import Sampler
from modgen.engine.scheduling import StepPlan
from modgen.engine.sequence import Sequence

log = logging.getLogger(__name__)


@registry.register("executor", "model")
class ModelExecutor(Executor):
    """Builds the model and the attention backend, owns the KV-cache tensors, and each step
    builds the ragged batch, runs the forward pass and samples the rows that need a token."""

    @dataclass(kw_only=True)
    class Config(ExecutorConfig):
        """The real model's settings live under ``model`` and ``attention``."""

    def __init__(self, config: ExecutorConfig, ctx: ExecutorContext) -> None:
        super().__init__(config, ctx)
        if ctx.tensor_parallel != 1:
            raise ValueError(
                f"engine.tensor_parallel={ctx.tensor_parallel}: executor=model runs on one "
                "device; executor=sim simulates tensor parallelism"
            )
        self.clock = WallClock()
        self.model = registry.build("model", ctx.model, device=ctx.device)
        self.attn = registry.build("attention", ctx.attention)
        self.attn.check(self.model.attention_spec())
        self.device = self.model.device
        shape = (ctx.kv.num_blocks * ctx.kv.block_size, self.spec.num_kv_heads, self.spec.head_dim)
        with torch.inference_mode():
            self.kv_caches = [
                tuple(torch.zeros(shape, dtype=self.model.dtype, device=self.device) for _ in "kv")
                for _ in range(self.spec.num_layers)
            ]
        self.sampler = Sampler(ctx.seed, argmax=self.model.argmax)

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Logits ``[R, vocab]``, one row per chunk that completes its sequence, in plan order."""
        batch = build_ragged_batch(plan, self.kv, self.device)
        return self.model(batch, self.kv_caches, self.attn, self.attn.prepare(batch))

    def execute(self, plan: StepPlan, banned: list[list[int]]) -> list[int | Exception]:
        logits = self.forward(plan)
        return self._sample(logits, [c.seq for c in plan.chunks if c.completes], banned)

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], banned: list[list[int]]
    ) -> list[int | Exception]:
        """A token per row; should the batch fail, each row is sampled alone, so only the rows
        at fault get their exception instead of a token."""
        try:
            return list(self.sampler.sample(logits, seqs, banned))
        except Exception:
            log.exception("sampling %d rows failed; sampling each alone", len(seqs))
        out: list[int | Exception] = []
        for r, seq in enumerate(seqs):
            try:
                out += self.sampler.sample(logits[r : r + 1], [seq], [banned[r]])
            except Exception as exc:
                log.exception("request %s failed in the sampler", seq.request_id)
                out.append(exc)
        return out

    def release(self, seq: Sequence) -> None:
        self.sampler.forget(seq)

    def describe(self) -> str:
        chosen = getattr(self.attn, "chosen_label", None)
        attn = self.attn.registry_name + (f" ({chosen})" if chosen else "")
        return f"model {self.model.registry_name} on {self.device}, attention={attn}"
