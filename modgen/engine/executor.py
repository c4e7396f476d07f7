"""Executors run a StepPlan and give each finishing chunk its next token. They are plugins
(registry kind ``executor``): ``executor=model`` runs a torch model over the paged KV cache,
``executor=sim`` predicts the step's time with a cost model on a virtual clock. Each owns the
clock every timestamp of a run is read from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from modgen.engine.clock import Clock
from modgen.engine.costs import StepFeatures
from modgen.engine.kv import KVAllocator
from modgen.engine.parallel import Parallel
from modgen.engine.scheduling import StepPlan
from modgen.engine.sequence import Sequence
from modgen.model import ModelSpec


@dataclass(kw_only=True)
class ExecutorConfig:
    """Settings every executor has (none yet)."""


@dataclass
class ExecutorContext:
    """What an executor is built from besides its own config: the run's other components and
    engine settings (never the root config)."""

    spec: ModelSpec
    """The model's description."""
    kv: KVAllocator
    """The KV allocator whose block tables the steps use."""
    model: Any
    """The composed ``model`` config node (an executor that runs a model builds it)."""
    attention: Any
    """The ``attention`` config node."""
    cost_model: Any
    """The ``cost_model`` config node (an executor that predicts step times builds it)."""
    device: torch.device
    seed: int = 0
    """Sampling seed of requests without a seed of their own."""
    tensor_parallel: int = 1
    """Ranks the model is split over."""
    parallel: Parallel | None = None
    """This process's rank when it has already joined its peers (a tensor-parallel worker);
    None: the executor joins (or starts) them itself."""
    tp_timeout_s: float = 120.0
    """How long a collective may wait for a rank before the step fails."""


class Executor(ABC):
    """Runs steps and owns the run's clock."""

    Config = ExecutorConfig
    clock: Clock
    """Where every timestamp of the run comes from."""

    def __init__(self, config: ExecutorConfig, ctx: ExecutorContext) -> None:
        self.config = config
        self.spec = ctx.spec
        self.kv = ctx.kv

    @abstractmethod
    def execute(self, plan: StepPlan, banned: list[list[int]]) -> list[int | Exception]:
        """Run one step. Returns the next token of each chunk that completes its sequence, in
        plan order, or the exception that failed that row alone; ``banned[i]`` are token ids
        the i-th of them may not produce (``min_tokens``). Raises if the step failed as a
        whole. Reads each sequence's ``num_computed`` as its chunk's start: call it before
        advancing them."""

    def release(self, seq: Sequence) -> None:  # noqa: B027 (optional hook)
        """Forget a finished request's state (a sampling generator, say)."""

    def describe(self) -> str:
        """A line for the engine's log."""
        return self.registry_name  # type: ignore[attr-defined]

    def report(self) -> dict[str, Any]:
        """Figures for the run's results."""
        return {}

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what the executor holds beyond memory (other processes, a process group)."""

    @property
    def broken(self) -> str | None:
        """Why this executor can run no step any more (a tensor-parallel rank gone), else
        None; the engine is then unhealthy at once."""
        return None


def step_features(plan: StepPlan, window: int | None) -> StepFeatures:
    """The features of ``plan`` (read before the chunks' sequences advance)."""
    return StepFeatures.of(
        [(c.seq.num_computed, c.num_tokens, c.seq.is_decode, c.completes) for c in plan.chunks],
        window,
    )
