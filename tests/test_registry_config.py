"""The registry and the config groups built on it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from sim_engine import COST, SPEC

from modgen import registry
from modgen.config import compose_config
from modgen.engine.executor import ExecutorContext
from modgen.engine.scheduling import Scheduler, SchedulerConfig
from modgen.model import describe_model

SMALL_ENOUGH_TO_BUILD = {"model": {"mistral", "llama", "qwen2", "qwen3", "phi3", "gemma", "mixtral",
                                   "qwen2_moe", "phi", "falcon", "opt"}}  # fmt: skip
"""Each family's small CPU preset; the other model presets are real sizes, described only."""
REQUIRED = {("workload", "trace"): ["workload.path=/dev/null"]}  # options with a mandatory field


def group_options(kind: str) -> list[str]:
    """Every option of config group ``kind`` (YAML presets and schema-only components)."""
    registry.load_plugins()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="modgen.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        options = loader.get_group_options(kind)
    return sorted(options)


def test_every_kind_has_its_config_group_and_defaults():
    for kind in registry.kinds():
        assert group_options(kind), f"config group {kind} has no options"
        assert set(registry.names(kind)) <= set(group_options(kind))


@pytest.mark.parametrize(
    ("kind", "option"),
    [(k, o) for k in registry.kinds() for o in group_options(k)],
)
def test_compose_every_option_of_every_group(kind, option):
    prefix = "+" if kind == "scheduler" else ""
    cfg = compose_config([f"{prefix}{kind}={option}", *REQUIRED.get((kind, option), [])])
    config = registry.to_config(kind, cfg[kind])
    cls = registry.get(kind, config.name)
    assert isinstance(config, cls.ConfigNode)
    if kind == "model" and option == "auto":  # the family comes from a checkpoint
        with pytest.raises(ValueError, match=r"set model\.checkpoint"):
            describe_model(cfg.model)
        return
    if kind == "model" and option not in SMALL_ENOUGH_TO_BUILD["model"]:
        spec = describe_model(cfg.model)  # GPU-sized presets: described, not built
        assert spec.weight_bytes() > 2**30 and spec.family == config.name
        return
    if kind == "model":
        component = registry.build(kind, config, device="cpu")
        assert component.num_layers == config.num_hidden_layers
    elif kind == "scheduler":
        kv_cfg = registry.to_config("kv_allocator", {"name": "blocked"})
        assert isinstance(
            registry.build(kind, config, registry.build("kv_allocator", kv_cfg, 8)), cls
        )
    elif kind == "kv_allocator":
        assert isinstance(registry.build(kind, config, 8), cls)
    elif kind == "cost_model" and option == "profiled":  # composes; building needs a profile
        with pytest.raises(FileNotFoundError, match="task=profile"):
            registry.build(kind, config, SPEC)
    elif kind == "cost_model":
        assert isinstance(registry.build(kind, config, SPEC), cls)
    elif kind == "executor":
        kv = registry.build("kv_allocator", {"name": "blocked"}, 64)
        # the small preset's shape, one layer (the schema's defaults are Mistral-7B's)
        node = {**compose_config(["model=mistral"]).model, "num_hidden_layers": 1}
        ctx = ExecutorContext(spec=describe_model(node), kv=kv, model=node,
                              attention={"name": "torch"}, cost_model=COST,
                              device=torch.device("cpu"))  # fmt: skip
        assert isinstance(registry.build(kind, config, ctx), cls)
    else:
        assert isinstance(registry.build(kind, config), cls)


def test_scheduler_group_has_no_default():
    cfg = compose_config([])
    assert cfg.scheduler is None
    with pytest.raises(Exception, match=r"\+scheduler=splitfuse"):
        compose_config(["scheduler=splitfuse"])


def test_register_rejects_duplicates_and_wrong_base_classes():
    @registry.register("scheduler", "test_dup")
    class Dup(Scheduler):
        @dataclass(kw_only=True)
        class Config(SchedulerConfig):
            """test"""

        def schedule(self):
            raise NotImplementedError

    with pytest.raises(registry.RegistryError, match="already registered"):

        @registry.register("scheduler", "test_dup")
        class Dup2(Dup):
            pass

    with pytest.raises(registry.RegistryError, match="must subclass Scheduler"):

        @registry.register("scheduler", "not_a_scheduler")
        class NotOne:
            Config = SchedulerConfig

    with pytest.raises(registry.RegistryError, match="unknown registry kind 'schedulr'"):
        registry.register("schedulr", "x")(Dup)


def test_failed_lookup_lists_what_exists():
    with pytest.raises(
        registry.RegistryError, match="continuous, splitfuse, splitfuse_priority, splitfuse_spf"
    ):
        registry.get("scheduler", "splitfuze")
    with pytest.raises(
        registry.RegistryError, match="kinds: attention, cost_model, executor, kv_allocator, model"
    ):
        registry.names("schedulers")


def test_unknown_keys_and_types_are_named_outside_hydra_too():
    with pytest.raises(Exception, match="token_budgt"):
        registry.to_config("scheduler", {"name": "splitfuse", "token_budgt": 3})
    with pytest.raises(Exception, match="token_budget"):
        registry.to_config("scheduler", {"name": "splitfuse", "token_budget": "many"})


def test_python_api_and_cli_compose_the_same_config():
    cfg = compose_config(["model=llama", "+scheduler=splitfuse", "scheduler.token_budget=64"])
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="modgen.conf", version_base="1.3"):
        raw = compose(
            "config", ["model=llama", "+scheduler=splitfuse", "scheduler.token_budget=64"]
        )
    assert cfg == raw
    assert cfg.scheduler.token_budget == 64
    assert cfg.model.name == "llama"


@pytest.mark.parametrize(
    "name, swept",
    [("splitfuse_vs_continuous", 2), ("splitfuse_token_budget", 3), ("kv_block_size", 2)],
)
def test_experiment_presets_compose_with_their_sweeps(name, swept):
    GlobalHydra.instance().clear()
    registry.load_plugins()
    with initialize_config_module(config_module="modgen.conf", version_base="1.3"):
        cfg = compose("config", [f"+experiment={name}"], return_hydra_config=True)
    assert registry.to_config("task", cfg.task).name == "bench"
    assert registry.to_config("workload", cfg.workload).name == "synthetic"
    params = cfg.hydra.sweeper.params
    assert "+scheduler" in params and len(params) == swept
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
