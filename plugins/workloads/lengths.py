"""Length-distribution workloads: ``synthetic`` (FastGen's), ``uniform``, ``mixed``, ``fixed``."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from modgen.registry import register
from modgen.workload import LengthWorkload, RequestSpec, WorkloadConfig, check_range


@register("workload", "synthetic")
class SyntheticWorkload(LengthWorkload):
    """FastGen's synthetic workload: prompt and output lengths drawn from Normal(mean,
    cv x mean), rounded and clipped to [min_len, max_*]."""

    @dataclass(kw_only=True)
    class Config(WorkloadConfig):
        """Normal lengths around a mean."""

        prompt_mean: int = 1024
        """Mean prompt length."""
        output_mean: int = 64
        """Mean output length."""
        cv: float = 0.3
        """Standard deviation as a fraction of the mean (FastGen: 0.3)."""
        min_len: int = 1
        """Shortest prompt or output."""
        max_prompt: int = 3072
        """Longest prompt."""
        max_output: int = 1024
        """Longest output."""

    def lengths(self, rng: random.Random) -> tuple[int, int]:
        c = self.config

        def draw(mean: int, hi: int) -> int:
            return int(min(hi, max(c.min_len, round(rng.gauss(mean, c.cv * mean)))))

        return draw(c.prompt_mean, c.max_prompt), draw(c.output_mean, c.max_output)


@register("workload", "uniform")
class UniformWorkload(LengthWorkload):
    """Prompt and output lengths uniform in [min, max]."""

    @dataclass(kw_only=True)
    class Config(WorkloadConfig):
        """Uniform lengths."""

        prompt_len: list[int] = field(default_factory=lambda: [32, 512])
        """Prompt lengths are uniform in [min, max]."""
        output_len: list[int] = field(default_factory=lambda: [32, 128])
        """Output lengths are uniform in [min, max]."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_range("prompt_len", self.prompt_len)
            check_range("output_len", self.output_len)

    def lengths(self, rng: random.Random) -> tuple[int, int]:
        return rng.randint(*self.config.prompt_len), rng.randint(*self.config.output_len)


@register("workload", "mixed")
class MixedWorkload(LengthWorkload):
    """Mostly short prompts with a share of long ones (the case Dynamic SplitFuse is for: a long
    prompt must not stall everyone's generation). Each prompt is long with probability
    ``long_fraction``; lengths uniform in their range."""

    @dataclass(kw_only=True)
    class Config(WorkloadConfig):
        """Short and long prompts mixed."""

        long_fraction: float = 0.15
        """Probability that a prompt is long."""
        long_prompt_len: list[int] = field(default_factory=lambda: [2000, 3000])
        """Long prompts are uniform in [min, max]."""
        prompt_len: list[int] = field(default_factory=lambda: [64, 256])
        """Short prompts are uniform in [min, max]."""
        output_len: list[int] = field(default_factory=lambda: [32, 128])
        """Output lengths are uniform in [min, max]."""
        long_priority: int = 0
        """Priority of the long requests (short ones have 0; lower is served first by
        schedulers that serve by priority): 1 puts short requests first."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0 <= self.long_fraction <= 1:
                raise ValueError(
                    f"workload.long_fraction must be in [0, 1], got {self.long_fraction}"
                )
            for name in ("long_prompt_len", "prompt_len", "output_len"):
                check_range(name, getattr(self, name))

    def lengths(self, rng: random.Random) -> tuple[int, int]:
        c = self.config
        long = rng.random() < c.long_fraction
        self._long.append(long)
        return rng.randint(*(c.long_prompt_len if long else c.prompt_len)), rng.randint(
            *c.output_len
        )

    def requests(self, vocab_size: int) -> list[RequestSpec]:
        self._long: list[bool] = []
        specs = super().requests(vocab_size)
        for spec, long in zip(specs, self._long, strict=True):
            spec.priority = self.config.long_priority if long else 0
        return specs


@register("workload", "fixed")
class FixedWorkload(LengthWorkload):
    """Every request has the same prompt and output length."""

    @dataclass(kw_only=True)
    class Config(WorkloadConfig):
        """Fixed lengths."""

        prompt_len: int = 512
        """Prompt length."""
        output_len: int = 64
        """Output length."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.prompt_len < 1 or self.output_len < 1:
                raise ValueError("workload.prompt_len and workload.output_len must be >= 1")

    def lengths(self, rng: random.Random) -> tuple[int, int]:
        return self.config.prompt_len, self.config.output_len
