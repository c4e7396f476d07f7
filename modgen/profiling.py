"""Step-time profiles: what ``task=profile`` measures and ``cost_model=profiled`` predicts from.

A profile holds the real executor's time for steps over a grid (prompt chunks x context, decode
batches x context, mixed steps at the token budget) and, from a short real closed-loop run, each
step's features and the time to the next step's start. ``ProfileFit`` models a step as

    L(tokens) + a_p * prefill_pairs + a_d * decode_pairs + c_s * seqs        (the executor)
    + o                                                                       (the engine loop)

where L is piecewise linear in the step's tokens with a knot at every token count of the grid
(the linear layers' efficiency changes with the batch) and ``o`` is the loop's own time between
steps, seen only in the run's samples. The run's measured-over-predicted ratios are kept too: a
simulation may scale each step by one drawn at random (seeded), so that its latency tails have
the spread a real loop has, not just its mean. All of it is fitted jointly, by least squares on
relative errors (so short decode steps weigh as much as long prompt steps), cost terms kept
non-negative. Inside the grid this interpolates; past its largest token count L continues the
last segment's slope, and attention terms are linear in their pairs, so longer contexts than
the grid's extrapolate linearly (such steps are counted).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from modgen import machine as this_machine
from modgen.engine.costs import StepFeatures
from modgen.model import ModelSpec

FORMAT = 1


def features_of(d: dict[str, Any]) -> StepFeatures:
    """The StepFeatures of a profile sample."""
    return StepFeatures(**{f.name: d[f.name] for f in fields(StepFeatures)})


@dataclass
class Profile:
    """Measured step times of one model, dtype and attention backend on one machine."""

    model: dict[str, Any]
    """The ModelSpec profiled (as a dict)."""
    attention: str
    """The attention setting (``attention=NAME``) the profile ran."""
    attention_chosen: str
    """The backend it resolved to (e.g. ``auto (cpu/avx512)``)."""
    token_budget: int
    machine: dict[str, Any] = field(default_factory=this_machine.cpu_info)
    fingerprint: str = field(default_factory=this_machine.fingerprint)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))
    grid: list[dict[str, Any]] = field(default_factory=list)
    """One entry per grid point: the step's features and ``seconds`` (median executor time)."""
    loop: list[dict[str, Any]] = field(default_factory=list)
    """One entry per step of a real run: features and ``interval`` (start to next start)."""
    format: int = FORMAT

    @staticmethod
    def default_path(spec: ModelSpec, attention: str) -> Path:
        """Where a profile of ``spec`` with ``attention`` on this machine is kept by default."""
        shape = {k: v for k, v in asdict(spec).items() if k != "checkpoint"}
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{spec.family}-{digest}-{spec.dtype}-{attention}-{this_machine.fingerprint()}.json"
        return this_machine.cache_root() / "profiles" / name

    def save(self, path: Path) -> Path:
        """Write the profile as JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> Profile:
        """Read a profile written by ``save``."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: profile format {data.get('format')}, expected {FORMAT}")
        return cls(**data)

    def mismatches(self, spec: ModelSpec, attention: str) -> list[str]:
        """How this profile differs from the run it would predict (empty: it fits)."""
        out = []
        want = {k: v for k, v in asdict(spec).items() if k != "checkpoint"}
        have = {k: v for k, v in self.model.items() if k != "checkpoint"}
        for key in sorted(want):
            if have.get(key) != want[key] and key != "dtype":
                if isinstance(want[key], tuple) and list(want[key]) == have.get(key):
                    continue
                out.append(f"model {key} {have.get(key)!r} (the run's: {want[key]!r})")
        if have.get("dtype") != spec.dtype:
            out.append(f"dtype {have.get('dtype')} (the run's: {spec.dtype})")
        if self.attention != attention:
            out.append(f"attention {self.attention} (the run's: {attention})")
        return out


class ProfileFit:
    """The step-time model fitted to a profile (see the module docstring)."""

    def __init__(self, profile: Profile) -> None:
        grid = [(features_of(g), g["seconds"], 0.0) for g in profile.grid]
        loop = [(features_of(s), s["interval"], 1.0) for s in profile.loop]
        if len(grid) < 4:
            raise ValueError("a profile needs at least 4 grid points to fit")
        self.knots = np.array(sorted({f.num_tokens for f, _, _ in grid}), dtype=float)
        self.max_tokens = int(self.knots[-1])
        self.max_context = max(f.max_context for f, _, _ in grid)
        samples = [s for s in grid + loop if s[1] > 0]
        # relative least squares: a 20 ms decode step counts as much as a 300 ms prefill
        x = np.array([[*self._row(f), in_loop] for f, _, in_loop in samples])
        t = np.array([t for _, t, _ in samples])
        coef = _nonnegative_lstsq(x / t[:, None], np.ones(len(t)), first_free=len(self.knots))
        self.coef, self.loop_overhead = coef[:-1], float(coef[-1])
        self.residuals = [t / self.predict(f) for f, t, _ in loop if t > 0 and self.predict(f) > 0]
        """Measured over predicted, for each step of the real run: the spread a real loop has
        around the fit (other work, the allocator, the OS), to draw from."""

    def _hats(self, tokens: float) -> np.ndarray:
        """Hat functions of the knots at ``tokens``, the outer ones continued linearly."""
        k = self.knots
        if len(k) == 1:
            return np.array([tokens / k[0]])
        i = int(np.clip(np.searchsorted(k, tokens) - 1, 0, len(k) - 2))
        w = (tokens - k[i]) / (k[i + 1] - k[i])
        out = np.zeros(len(k))
        out[i], out[i + 1] = 1 - w, w
        return out

    def _row(self, f: StepFeatures) -> list[float]:
        return [*self._hats(f.num_tokens), f.prefill_pairs, f.decode_pairs, f.num_seqs]

    def executor_time(self, f: StepFeatures) -> float:
        """Seconds the executor takes for a step with features ``f``."""
        return float(np.dot(self._row(f), self.coef))

    def predict(self, f: StepFeatures) -> float:
        """Seconds from a step's start to the next step's start (the executor, then the
        engine loop's own time between steps)."""
        return max(0.0, self.executor_time(f) + self.loop_overhead)

    def outside(self, f: StepFeatures) -> bool:
        """Whether ``f`` lies outside the profiled grid (the prediction extrapolates)."""
        return f.num_tokens > self.max_tokens or f.max_context > self.max_context


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray, first_free: int) -> np.ndarray:
    """Least squares, then refitted without columns from ``first_free`` on that came out
    negative (a cost term cannot save time), until none does."""
    keep = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        coef[keep] = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        bad = [j for j in keep if j >= first_free and coef[j] < 0]
        if not bad:
            return coef
        keep = [j for j in keep if j not in bad]
