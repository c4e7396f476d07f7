"""One registry for every pluggable component.

A component registers with ``@register(kind, name)``. Registering also stores the component's
``Config`` dataclass in Hydra's ConfigStore as ``schema/<kind>/<name>``, so
``kind=name`` on the command line selects both the class and its typed schema, and a misspelt
key is an error naming it. A preset ``conf/<kind>/<name>.yaml`` takes the option's place and
extends ``/schema/<kind>/<name>``; a component without a preset gets the option ``name`` itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "modgen.plugins"

# kind -> "module:Class", the base class every component of that kind derives from
_BASES: dict[str, str] = {
    "model": "modgen.model:CausalLM",
    "scheduler": "modgen.engine.scheduling:Scheduler",
    "kv_allocator": "modgen.engine.kv:KVAllocator",
    "attention": "modgen.attention:AttentionBackend",
    "task": "modgen.task:Task",
    "workload": "modgen.workload:Workload",
    "executor": "modgen.engine.executor:Executor",
    "cost_model": "modgen.engine.costs:CostModel",
}
# kind -> name -> class
_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in _BASES}
_PLUGINS_LOADED = False

T = TypeVar("T", bound=type)


class RegistryError(LookupError):
    """A registry lookup or registration failed; the message names what exists."""


def declare_kind(kind: str, base: str) -> None:
    """Declare a new registry kind; ``base`` ("module:Class") is the class its components derive
    from. Each kind is a config group of the same name."""
    _BASES[kind] = base
    _REGISTRY.setdefault(kind, {})


def base_class(kind: str) -> type:
    """The class every component of ``kind`` derives from."""
    module, _, name = _BASES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def kinds() -> list[str]:
    """The declared registry kinds."""
    return sorted(_BASES)


def _node_class(cls: type, kind: str, name: str) -> type:
    """A dataclass deriving from ``cls.Config`` with a ``name`` field naming the component."""
    config_cls = getattr(cls, "Config", None)
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        raise RegistryError(f"{kind} '{name}': {cls.__qualname__} needs a nested dataclass Config")
    if any(f.name == "name" for f in dataclasses.fields(config_cls)):
        raise RegistryError(f"{kind} '{name}': Config may not define a field called 'name'")
    node = dataclasses.make_dataclass(
        f"{cls.__name__}Config",
        [("name", str, dataclasses.field(default=name, kw_only=True))],
        bases=(config_cls,),
        kw_only=True,
    )
    node.__module__, node.__doc__ = config_cls.__module__, config_cls.__doc__
    return node


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator: register ``cls`` as component ``name`` of ``kind``.

    Raises RegistryError for an undeclared kind, a duplicate name or a wrong base class.
    """

    def decorate(cls: T) -> T:
        if kind not in _BASES:
            raise RegistryError(f"unknown registry kind '{kind}'; kinds: {', '.join(kinds())}")
        base = base_class(kind)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise RegistryError(f"{kind} '{name}' must subclass {base.__name__}, got {cls!r}")
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not cls:
            raise RegistryError(
                f"{kind} '{name}' is already registered by {existing.__module__}."
                f"{existing.__qualname__}"
            )
        node = _node_class(cls, kind, name)
        cls.ConfigNode = node  # type: ignore[attr-defined]
        cls.registry_name = name  # type: ignore[attr-defined]
        _REGISTRY[kind][name] = cls
        ConfigStore.instance().store(
            group=f"schema/{kind}", name=name, node=node, provider="modgen"
        )
        if not _has_preset(kind, name):
            # no YAML preset of that name: the schema itself is the option `kind=name`
            ConfigStore.instance().store(group=kind, name=name, node=node, provider="modgen")
        return cls

    return decorate


def _has_preset(kind: str, name: str) -> bool:
    """Whether modgen's own conf/ has a YAML preset ``kind/name.yaml``."""
    from importlib.resources import files

    return files("modgen.conf").joinpath(kind, f"{name}.yaml").is_file()


def names(kind: str) -> list[str]:
    """The names registered for ``kind``."""
    load_plugins()
    if kind not in _REGISTRY:
        raise RegistryError(f"unknown registry kind '{kind}'; kinds: {', '.join(kinds())}")
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> type:
    """The class registered as ``name`` of ``kind``; a failed lookup lists what exists."""
    load_plugins()
    if kind not in _REGISTRY:
        raise RegistryError(f"unknown registry kind '{kind}'; kinds: {', '.join(kinds())}")
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise RegistryError(
            f"no {kind} named '{name}'; registered: {', '.join(sorted(_REGISTRY[kind]))}"
        ) from None


def to_config(kind: str, node: Any) -> Any:
    """Turn a composed config node (or a dict) into the component's typed Config instance.

    Unknown keys and wrong types raise an error naming the key.
    """
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return node
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict) or "name" not in node:
        raise RegistryError(f"config for {kind} needs a 'name' key naming the component")
    cls = get(kind, node["name"])
    typed = OmegaConf.merge(OmegaConf.structured(cls.ConfigNode), node)
    return OmegaConf.to_object(typed)


def build(kind: str, node: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the component that ``node`` names, passing it its own typed config."""
    config = to_config(kind, node)
    cls = get(kind, config.name)
    return cls(config, *args, **kwargs)


def _import_all(modules: Iterable[str]) -> None:
    for module in modules:
        importlib.import_module(module)


def load_plugins() -> None:
    """Import the in-tree plugins, then every package in the ``modgen.plugins`` entry-point group.

    An entry point may name a module (importing it registers its components) or a callable
    (called with no arguments). Safe to call many times.
    """
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from modgen import plugins  # the core's kinds are declared on import of modgen

    _import_all(plugins.BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as exc:  # a broken third-party plugin must not hide the others
            log.error("could not load modgen plugin '%s' (%s): %s", ep.name, ep.value, exc)
            continue
        if callable(loaded) and not isinstance(loaded, type):
            loaded()
        log.debug("loaded modgen plugin %s", ep.name)
