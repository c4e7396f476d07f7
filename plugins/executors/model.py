"""``executor=model`` (the default): runs a torch model over the paged KV cache, on the wall
clock; with ``engine.tensor_parallel=N`` over N ranks (see ``modgen.engine.parallel``)."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from modgen import registry
from modgen.engine.batch import batch_of, step_inputs
from modgen.engine.clock import WallClock
from modgen.engine.executor import Executor, ExecutorConfig, ExecutorContext
from modgen.engine.parallel import Heartbeat, Parallel
from modgen.engine.sampler import Sampler
from modgen.engine.scheduling import StepPlan
from modgen.engine.sequence import Sequence
from modgen.plugins.executors import ranks

log = logging.getLogger(__name__)


@registry.register("executor", "model")
class ModelExecutor(Executor):
    """Builds the model and the attention backend, owns the KV-cache tensors, and each step
    builds the ragged batch, runs the forward pass and samples the rows that need a token.

    With ``engine.tensor_parallel`` N > 1 this process is rank 0: it starts ranks 1..N-1 on this
    host (or joins torchrun's), holds its own shard of the model and of the KV cache (its KV
    heads), and sends each step's inputs to the others before running its shard."""

    @dataclass(kw_only=True)
    class Config(ExecutorConfig):
        """The real model's settings live under ``model`` and ``attention``."""

    def __init__(self, config: ExecutorConfig, ctx: ExecutorContext) -> None:
        super().__init__(config, ctx)
        self.clock = WallClock()
        self.workers: list[Any] = []
        self._broken: str | None = None
        self._threads = torch.get_num_threads()
        self.heartbeat: Heartbeat | None = None
        self.parallel, device = (ctx.parallel, ctx.device) if ctx.parallel else self._join(ctx)
        try:
            self._build(ctx, device)
        except BaseException:  # the ranks never got in step: end them, leave the group
            if self.parallel.world > 1 and self.parallel.is_first:
                ranks.stop(self.parallel, self.workers, broken=True)
                torch.set_num_threads(self._threads)
            raise
        if self.parallel.world > 1 and self.parallel.is_first:
            interval = max(0.5, min(15.0, ctx.tp_timeout_s / 4))
            self.heartbeat = Heartbeat(self.parallel, interval, self.device)
            atexit.register(self.heartbeat.stop)  # before the ranks are told to stop
        if self.parallel.world > 1 and ctx.parallel is None and not self.parallel.is_first:
            self.serve_steps()  # a torchrun rank other than 0: serve rank 0's steps, then end
            raise SystemExit(0)

    def _build(self, ctx: ExecutorContext, device: torch.device) -> None:
        """This rank's model (its shard), attention backend, KV cache and sampler."""
        extra = {"parallel": self.parallel} if self.parallel.world > 1 else {}
        self.model = registry.build("model", ctx.model, device=device, **extra)
        self.attn = self._attention(ctx.attention)
        self.device = self.model.device
        num_kv_heads = self.model.attention_spec().num_kv_heads  # this rank's
        shape = (ctx.kv.num_blocks * ctx.kv.block_size, num_kv_heads, self.spec.head_dim)
        with torch.inference_mode():
            self.kv_caches = [
                tuple(torch.zeros(shape, dtype=self.model.dtype, device=self.device) for _ in "kv")
                for _ in range(self.spec.num_layers)
            ]
        self.sampler = Sampler(ctx.seed, argmax=self.model.argmax)

    def _join(self, ctx: ExecutorContext) -> tuple[Parallel, torch.device]:
        """This process's place among ``ctx.tensor_parallel`` ranks (starting the others on
        this host unless torchrun did) and its device."""
        n = ctx.tensor_parallel
        if n == 1:
            return Parallel(), ctx.device
        ranks.check(n, ctx)
        if ctx.device.type == "cpu":  # the ranks here share the cores instead of each taking all
            torch.set_num_threads(ranks.threads_per_rank(ranks.ranks_here(n)))
        parallel, self.workers, device = ranks.join(n, ctx)
        log.info("tensor parallel: rank %d of %d on %s", parallel.rank, n, device)
        return parallel, device

    def _attention(self, node: Any) -> Any:
        """The attention backend; over several ranks, the one rank 0 chose (``auto`` measures
        on rank 0 alone, so every rank runs the same)."""
        spec = self.model.attention_spec()
        if self.parallel.world > 1:
            if self.parallel.is_first:
                attn = registry.build("attention", node)
                attn.check(spec)
                chosen = getattr(attn, "chosen", None) or attn
                self.parallel.broadcast(dataclasses.asdict(chosen.config))
                return attn
            node = self.parallel.broadcast()
        attn = registry.build("attention", node)
        attn.check(spec)
        return attn

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Logits ``[R, vocab]``, one row per chunk that completes its sequence, in plan order."""
        inputs = step_inputs(plan, self.kv)
        if self.parallel.world == 1:
            return self._run(inputs)
        if self.broken is not None:
            raise RuntimeError(self.broken)
        try:
            if self.heartbeat.failed is not None:
                raise self.heartbeat.failed
            with self.heartbeat:
                self.parallel.broadcast(("step", inputs))
                return self._run(inputs)
        except Exception as exc:  # the ranks are out of step: a rank died, hung or failed
            gone = self._rank_gone(wait_s=1.0)
            why = gone or f"tensor-parallel step failed ({exc})"
            self._broken = f"{why}; the ranks are out of step, the engine cannot go on"
            raise RuntimeError(self._broken) from exc

    def _rank_gone(self, wait_s: float) -> str | None:
        """Which started rank exited, waiting up to ``wait_s`` for one that is going."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                ranks.check_alive(self.workers)
            except RuntimeError as exc:
                return str(exc)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _run(self, inputs: dict[str, Any]) -> torch.Tensor:
        batch = batch_of(inputs, self.device)
        return self.model(batch, self.kv_caches, self.attn, self.attn.prepare(batch))

    @torch.inference_mode()
    def serve_steps(self) -> None:
        """A rank other than 0: run each step rank 0 sends, until it says stop."""
        while True:
            what, inputs = self.parallel.broadcast()
            if what == "stop":
                return
            if what == "step":  # else a heartbeat of an idle rank 0
                self._run(inputs)

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
        tp = f", tensor parallel {self.parallel.world}" if self.parallel.world > 1 else ""
        return f"model {self.model.registry_name} on {self.device}, attention={attn}{tp}"

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tensor_parallel": self.parallel.world}
        for what, seconds in sorted(self.parallel.seconds.items()):  # rank 0's, since start
            out[f"{what}_s"] = round(seconds, 4)
            out[f"{what}_calls"] = self.parallel.calls[what]
        return out

    def close(self) -> None:
        if self.parallel.world > 1 and self.parallel.is_first:
            if self.heartbeat is not None:
                self.heartbeat.stop()
                atexit.unregister(self.heartbeat.stop)
            ranks.stop(self.parallel, self.workers, broken=self._broken is not None)
            torch.set_num_threads(self._threads)

    @property
    def broken(self) -> str | None:
        if self._broken is None and self.workers:
            try:
                ranks.check_alive(self.workers)
            except RuntimeError as exc:
                self._broken = str(exc)
        return self._broken
