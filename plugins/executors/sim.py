"""``executor=sim``: the same schedulers and KV allocators, with a cost model in place of the
model: each step advances a virtual clock by its predicted time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modgen import registry
from modgen.engine.clock import VirtualClock
from modgen.engine.executor import Executor, ExecutorConfig, ExecutorContext, step_features
from modgen.engine.scheduling import StepPlan


@registry.register("executor", "sim")
class SimExecutor(Executor):
    """Predicts each step's time from its features (tokens, attention pairs, sequences) with
    the ``cost_model`` and advances its virtual clock by it; every finishing chunk gets the
    same token, never an end-of-sequence one, so requests run to ``max_tokens`` (or a stop id
    they name). Needs no weights, no tensors and no device: a 70B model at FastGen's scale
    simulates on a laptop."""

    @dataclass(kw_only=True)
    class Config(ExecutorConfig):
        """The simulator's settings live under ``cost_model``."""

    def __init__(self, config: ExecutorConfig, ctx: ExecutorContext) -> None:
        super().__init__(config, ctx)
        self.clock = VirtualClock()
        attention = ctx.attention.get("name", "auto") if ctx.attention is not None else "auto"
        self.cost = registry.build(
            "cost_model", ctx.cost_model, ctx.spec, ctx.tensor_parallel, attention
        )
        eos = set(ctx.spec.eos_token_ids)
        self.token = next(t for t in range(ctx.spec.vocab_size) if t not in eos)

    def execute(self, plan: StepPlan, banned: list[list[int]]) -> list[int | Exception]:
        features = step_features(plan, self.spec.sliding_window)
        self.clock.advance(self.cost.step_time(features))
        return [self._token(b) for b in banned]

    def _token(self, banned: list[int]) -> int:
        if self.token not in banned:
            return self.token
        return next(t for t in range(self.spec.vocab_size) if t not in banned)

    def describe(self) -> str:
        return self.cost.describe()

    def report(self) -> dict[str, Any]:
        return {"cost_model": self.cost.registry_name, **self.cost.report()}
