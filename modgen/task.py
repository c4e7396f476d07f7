"""Task interface: what ``python -m modgen task=NAME`` runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


@dataclass(kw_only=True)
class TaskConfig:
    """Settings every task has (none yet)."""


class Task(ABC):
    """A job run from the command line. It is the one component that sees the root config,
    because it assembles the others."""

    Config = TaskConfig

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    @abstractmethod
    def run(self, root: DictConfig, output_dir: Path) -> dict[str, Any]:
        """Run and return a summary; write results under ``output_dir``."""
