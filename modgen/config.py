"""The root config schema and composing it from override strings (the CLI and the Python API
compose the very same config)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf

from modgen import registry

CONFIG_MODULE = "modgen.conf"
CONFIG_NAME = "config"
T = TypeVar("T")


@dataclass(kw_only=True)
class EngineConfig:
    """Engine-wide settings that belong to no plugin."""

    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:N, or auto (cuda when available)."""
    max_model_len: int | None = None
    """Longest prompt plus output; None means the model's max_position_embeddings."""
    seed: int = 0
    """Seed of sampling for requests that give no seed of their own."""
    num_threads: int | None = None
    """Torch CPU threads; None leaves torch's default."""
    heap_allocations: bool = True
    """On CPU, keep allocations up to 32 MiB on glibc's heap instead of mmap (fewer page faults
    per step; process-wide)."""
    tensor_parallel: int = 1
    """Ranks the model is split over (one process each: started by the engine on this host, or
    by torchrun across hosts); executor=sim's cost model reads it too."""
    tp_timeout_s: float = 120.0
    """With tensor_parallel > 1: how long a step may wait for a rank before it fails (a rank
    that died fails the step at once)."""
    cap_max_tokens: bool = False
    """A request whose prompt plus max_tokens exceeds the context: false refuses it (HTTP 400,
    as OpenAI and vLLM do); true caps max_tokens to the room left."""
    max_failed_steps: int = 3
    """Steps in a row that fail every request they run (a forward pass that raises, or every
    row failing) after which the engine is unhealthy: a server then exits non-zero."""

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"engine.max_model_len must be >= 2, got {self.max_model_len}")
        if self.tensor_parallel < 1:
            raise ValueError(f"engine.tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.max_failed_steps < 1:
            raise ValueError(f"engine.max_failed_steps must be >= 1, got {self.max_failed_steps}")


@dataclass(kw_only=True)
class RootConfig:
    """Everything a run is made of: one node per registry kind plus engine settings."""

    model: Any = MISSING
    """The model (config group ``model``)."""
    kv_allocator: Any = MISSING
    """The KV allocator (config group ``kv_allocator``)."""
    attention: Any = MISSING
    """The attention backend (config group ``attention``)."""
    executor: Any = MISSING
    """What runs each step: the real model, or the simulator (config group ``executor``)."""
    cost_model: Any = MISSING
    """How the simulator predicts a step's time (config group ``cost_model``)."""
    scheduler: Any = None
    """The scheduler; chosen with ``+scheduler=NAME``; None means splitfuse."""
    task: Any = MISSING
    """What ``python -m modgen`` does (config group ``task``)."""
    workload: Any = MISSING
    """The requests a task sends (config group ``workload``)."""
    serve: Any = None
    """Server settings, present with ``task=serve`` (``serve.port``, ``serve.replicas``...)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine-wide settings."""


ConfigStore.instance().store(name="modgen_schema", node=RootConfig, provider="modgen")


def typed(cls: type[T], node: Any) -> T:
    """``node`` (a DictConfig or dict) as an instance of dataclass ``cls``; unknown keys raise."""
    if isinstance(node, cls):
        return node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra override strings, as the CLI would."""
    registry.load_plugins()
    gh = GlobalHydra.instance()
    if gh.is_initialized():  # e.g. called from inside a Hydra app: compose in its own context
        gh.clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))
