"""What a step costs: its features, and the cost-model interface the simulator predicts with.

A step's time depends on few things: tokens through the linear layers, rows that need logits,
query-key pairs of attention (prompt chunks and decodes apart: the first is compute-bound, the
second reads the KV cache) and how many sequences it carries. ``StepFeatures.of`` reads them off
a ``StepPlan``; a ``CostModel`` (registry kind ``cost_model``) turns them into seconds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from modgen.model import ModelSpec


def attention_pairs(start: int, n: int, window: int | None) -> int:
    """Query-key pairs of ``n`` queries at positions ``start .. start+n-1`` (causal, windowed)."""

    def upto(x: int) -> int:  # pairs of the queries at positions 0 .. x-1
        if window is None or x <= window:
            return x * (x + 1) // 2
        return window * (window + 1) // 2 + (x - window) * window

    return upto(start + n) - upto(start)


@dataclass(frozen=True, slots=True)
class StepFeatures:
    """The quantities a step's time depends on."""

    num_tokens: int
    """Tokens through the linear layers."""
    num_seqs: int
    """Sequences (chunks) in the step."""
    num_logits: int
    """Rows that produce a token (LM head and sampling)."""
    prefill_tokens: int
    """Tokens of prompt (or recompute) chunks."""
    prefill_pairs: int
    """Query-key pairs of prompt chunks (causal, windowed)."""
    prefill_context: int
    """Keys prompt chunks attend to: their contexts summed (KV read)."""
    decode_seqs: int
    """Single-token decodes."""
    decode_pairs: int
    """Keys the decodes attend to: their contexts summed (KV read)."""
    max_context: int
    """Longest context in the step."""

    @classmethod
    def of(cls, chunks: list[tuple[int, int, bool, bool]], window: int | None) -> StepFeatures:
        """From ``(start, num_tokens, is_decode, completes)`` per chunk."""
        tokens = seqs = logits = p_tok = p_pairs = p_ctx = d_seqs = d_pairs = max_ctx = 0
        for start, n, decode, completes in chunks:
            end = start + n
            ctx = end if window is None else min(end, window)
            tokens, seqs, logits = tokens + n, seqs + 1, logits + completes
            max_ctx = max(max_ctx, end)
            if decode:
                d_seqs, d_pairs = d_seqs + 1, d_pairs + ctx
            else:
                p_tok, p_ctx = p_tok + n, p_ctx + ctx
                p_pairs += attention_pairs(start, n, window)
        return cls(tokens, seqs, logits, p_tok, p_pairs, p_ctx, d_seqs, d_pairs, max_ctx)


@dataclass(kw_only=True)
class CostModelConfig:
    """Settings every cost model has (none yet)."""


class CostModel(ABC):
    """Predicts how long a step takes on some machine, for the simulated executor.

    Built from its own config, the model's description, the tensor-parallel degree and the
    attention setting of the run it stands in for."""

    Config = CostModelConfig

    def __init__(
        self,
        config: CostModelConfig,
        spec: ModelSpec,
        tensor_parallel: int = 1,
        attention: str = "auto",
    ) -> None:
        self.config = config
        self.spec = spec
        self.tensor_parallel = tensor_parallel
        self.attention = attention

    @abstractmethod
    def step_time(self, features: StepFeatures) -> float:
        """Seconds the step takes, from start to its tokens being committed."""

    def report(self) -> dict[str, Any]:
        """Figures for the run's results (e.g. steps predicted outside a profile's grid)."""
        return {}

    def describe(self) -> str:
        """A line for the engine's log."""
        return type(self).__name__
