"""``cost_model=profiled``: step times fitted to this machine's measured profile
(``python -m modgen task=profile``; see ``modgen.profiling``)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modgen.engine.costs import CostModel, CostModelConfig, StepFeatures
from modgen.model import ModelSpec
from modgen.profiling import Profile, ProfileFit
from modgen.registry import register

log = logging.getLogger(__name__)


@register("cost_model", "profiled")
class ProfiledCost(CostModel):
    """Predicts each step from a profile of the same model, dtype and attention backend
    measured on this machine. A profile of anything else is refused (naming what differs)
    unless ``allow_mismatch``; steps outside the profile's grid are extrapolated and counted."""

    @dataclass(kw_only=True)
    class Config(CostModelConfig):
        """Which profile, and how strictly it must match the run."""

        profile: str | None = None
        """The profile file; None: this model's default profile on this machine (written by
        ``python -m modgen task=profile`` with the same model settings)."""
        allow_mismatch: bool = False
        """Use a profile of another model, dtype or attention backend (results say so)."""
        jitter: bool = True
        """Scale each step by a measured-over-predicted ratio drawn from the profile's real
        run, so latency percentiles carry a real loop's spread (False: the fit alone)."""
        seed: int = 0
        """Seed of those draws."""

    config: Config

    def __init__(
        self, config: Config, spec: ModelSpec, tensor_parallel: int = 1, attention: str = "auto"
    ) -> None:
        super().__init__(config, spec, tensor_parallel, attention)
        if tensor_parallel != 1:
            raise ValueError(
                "cost_model=profiled predicts the machine it was measured on (one rank); for "
                "engine.tensor_parallel > 1 use cost_model=roofline or a device preset"
            )
        path = Path(config.profile) if config.profile else Profile.default_path(spec, attention)
        if not path.is_file():
            raise FileNotFoundError(
                f"no step-time profile at {path}: measure one with `python -m modgen "
                f"task=profile model=...` (same model settings), or set cost_model.profile"
            )
        self.path = path
        self.profile = Profile.load(path)
        self.mismatch = self.profile.mismatches(spec, attention)
        if self.mismatch and not config.allow_mismatch:
            raise ValueError(
                f"profile {path} was measured for another run: " + "; ".join(self.mismatch)
                + " (cost_model.allow_mismatch=true uses it anyway)"
            )  # fmt: skip
        if self.mismatch:
            log.warning("using profile %s despite: %s", path, "; ".join(self.mismatch))
        self.fit = ProfileFit(self.profile)
        self.rng = random.Random(config.seed)
        self.num_steps = self.num_extrapolated = 0

    def step_time(self, f: StepFeatures) -> float:
        self.num_steps += 1
        self.num_extrapolated += self.fit.outside(f)
        t = self.fit.predict(f)
        if self.config.jitter and self.fit.residuals:
            t *= self.rng.choice(self.fit.residuals)
        return t

    def report(self) -> dict[str, Any]:
        return {
            "profile": str(self.path),
            "profile_machine": self.profile.machine.get("cpu"),
            "profile_mismatch": self.mismatch,
            "steps_extrapolated": self.num_extrapolated,
            "steps_predicted": self.num_steps,
        }

    def describe(self) -> str:
        return f"profiled: {self.path.name} ({len(self.profile.grid)} grid points)"
