"""What a step costs: its features, and the cost-model interface the simulator predicts with.

A step's time depends on few things: tokens through the linear layers, rows that need logits,
query-key pairs of attention (prompt chunks and decodes apart: the first is compute-bound, the
second reads the KV cache) and how many sequences it carries. ``StepFeatures.of`` reads them off
a ``StepPlan``; a ``CostModel`` (registry kind ``cost_model``) turns them into seconds, and a
``StepTimeFit`` learns them from the steps an engine runs (for a scheduler that sizes steps by
time).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

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


class StepTimeFit:
    """A step's seconds as a linear function of its features, learnt online from the steps an
    engine ran: ``seconds ~ c0 + c1*num_tokens + c2*num_logits + c3*prefill_pairs +
    c4*decode_pairs``: a fixed cost (weights streamed once a step, the loop), linear layers per
    token, the LM head and sampling per produced token, prompt attention per query-key pair
    (compute), decode attention per key read (memory).

    Least squares weighted to the recent steps (an observation's weight halves every
    ``half_life`` steps, so the fit follows a machine whose speed drifts), slopes kept >= 0 (a
    feature that would get a negative slope is left out), and a small ridge so that features
    that never varied do not make it singular. ``predict`` answers None until ``min_steps``
    steps were seen."""

    _SCALE = np.array([1.0, 1e-2, 1e-1, 1e-5, 1e-4])  # features to similar magnitudes

    def __init__(self, half_life: float = 256, min_steps: int = 8, ridge: float = 1e-6) -> None:
        if half_life <= 0 or min_steps < 1:
            raise ValueError("StepTimeFit needs half_life > 0 and min_steps >= 1")
        self.decay = 0.5 ** (1.0 / half_life)
        self.min_steps, self.ridge = min_steps, ridge
        self.steps = 0
        self._xtx = np.zeros((5, 5))
        self._xty = np.zeros(5)
        self._coef: np.ndarray | None = None

    @staticmethod
    def features(f: StepFeatures) -> np.ndarray:
        """The features the fit uses, in the order of ``coefficients``."""
        return np.array([1.0, f.num_tokens, f.num_logits, f.prefill_pairs, f.decode_pairs])

    def add(self, f: StepFeatures, seconds: float) -> None:
        """One step that ran: its features and its seconds."""
        x = self.features(f) * self._SCALE
        self._xtx = self.decay * self._xtx + np.outer(x, x)
        self._xty = self.decay * self._xty + x * seconds
        self.steps += 1
        self._coef = None

    def coefficients(self) -> np.ndarray | None:
        """Seconds per unit of each raw feature (fixed, per token, per logit, per prompt pair,
        per decode key), or None before ``min_steps`` steps."""
        if self.steps < self.min_steps:
            return None
        if self._coef is None:
            keep = list(range(5))
            ridge = self.ridge * max(1.0, float(np.trace(self._xtx))) * np.eye(5)
            while True:
                a = (self._xtx + ridge)[np.ix_(keep, keep)]
                c = np.linalg.solve(a, self._xty[keep])
                negative = [k for k, v in zip(keep, c, strict=True) if k and v < 0]
                if not negative:
                    break
                keep.remove(min(negative, key=lambda k: c[keep.index(k)]))
            coef = np.zeros(5)
            coef[keep] = c
            self._coef = coef * self._SCALE
        return self._coef

    def predict(self, f: StepFeatures) -> float | None:
        """Predicted seconds of a step with features ``f`` (None before ``min_steps``)."""
        coef = self.coefficients()
        if coef is None:
            return None
        return float(np.dot(coef, self.features(f)))
