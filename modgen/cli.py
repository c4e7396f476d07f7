"""``python -m modgen [overrides]``: compose the config with Hydra and run its task."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from modgen import registry


@hydra.main(config_path="pkg://modgen.conf", config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> float | None:
    task = registry.build("task", cfg.task)
    summary = task.run(cfg, Path(HydraConfig.get().runtime.output_dir))
    value = summary.get("output_throughput") if isinstance(summary, dict) else None
    return value  # what a Hydra sweeper would optimise


def main() -> None:
    """Entry point: load plugins (so their configs are in the ConfigStore), then run Hydra."""
    registry.load_plugins()
    _run()
