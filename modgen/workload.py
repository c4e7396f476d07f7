"""Workload interface: the requests a run sends (prompts, output lengths, optional arrivals)."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass


def check_range(name: str, bounds: list[int]) -> None:
    """Raise ValueError unless ``workload.<name>`` is ``[min, max]`` with 1 <= min <= max."""
    if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"workload.{name} must be [min, max] with 1 <= min <= max, got {bounds}")


@dataclass
class RequestSpec:
    """One request of a workload."""

    prompt: list[int]
    """Prompt token ids."""
    output_len: int
    """Tokens to generate (EOS ignored)."""
    arrival: float | None = None
    """Seconds after the start at which it arrives (trace replay); None lets the load
    generator decide."""
    priority: int = 0
    """Scheduling priority, lower first (used by schedulers that serve by priority)."""


@dataclass(kw_only=True)
class WorkloadConfig:
    """Settings every workload has."""

    num_requests: int = 32
    """Requests in the workload."""
    seed: int = 0
    """Seed of lengths and token ids."""

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"workload.num_requests must be >= 1, got {self.num_requests}")


class Workload(ABC):
    """Makes the list of requests for a run, reproducibly from its seed."""

    Config = WorkloadConfig

    def __init__(self, config: WorkloadConfig) -> None:
        self.config = config

    @abstractmethod
    def requests(self, vocab_size: int) -> list[RequestSpec]:
        """The workload's requests; random token ids are drawn from ``[0, vocab_size)``."""


class LengthWorkload(Workload):
    """A workload defined by a prompt-length and an output-length distribution."""

    @abstractmethod
    def lengths(self, rng: random.Random) -> tuple[int, int]:
        """Draw one (prompt length, output length)."""

    def requests(self, vocab_size: int) -> list[RequestSpec]:
        rng = random.Random(self.config.seed)
        specs = []
        for _ in range(self.config.num_requests):
            prompt_len, output_len = self.lengths(rng)
            prompt = [rng.randrange(vocab_size) for _ in range(prompt_len)]
            specs.append(RequestSpec(prompt=prompt, output_len=output_len))
        return specs
