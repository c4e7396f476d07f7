"""One registry per block interface (norm, position, attention, mlp, moe, layer), as
DeepSpeed-Inference v2 keeps one per module interface.

A block registers with ``@register_block(kind, name)`` and derives from its kind's interface. A
model family names the blocks it is made of as data, ``block(kind, name, **params)``: the spec is
checked when it is made (a misspelt parameter, or a value the block does not implement, is an
error naming it), and built later with ``build_block``. Built-in blocks live in
``modgen.plugins.models.blocks``; a third-party package registers its own the same way.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from modgen import registry

_INTERFACES = {
    "norm": "Norm",
    "position": "PositionEncoding",
    "attention": "AttentionBlock",
    "mlp": "FeedForward",
    "moe": "FeedForward",
    "layer": "LayerLayout",
}
"""Block kind -> the interface (in modgen.blocks.interfaces) its blocks derive from."""
_BLOCKS: dict[str, dict[str, type]] = {kind: {} for kind in _INTERFACES}

T = TypeVar("T", bound=type)


class BlockError(LookupError):
    """A block lookup or registration failed; the message names what exists."""


def interface(kind: str) -> type:
    """The class every block of ``kind`` derives from."""
    if kind not in _INTERFACES:
        raise BlockError(f"unknown block kind '{kind}'; kinds: {', '.join(_INTERFACES)}")
    module = importlib.import_module("modgen.blocks.interfaces")
    return getattr(module, _INTERFACES[kind])


def register_block(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator: register ``cls`` as block ``name`` of ``kind``. Duplicate names and
    classes that do not derive from the kind's interface raise BlockError."""

    def decorate(cls: T) -> T:
        base = interface(kind)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise BlockError(f"{kind} block '{name}' must subclass {base.__name__}, got {cls!r}")
        existing = _BLOCKS[kind].get(name)
        if existing is not None and existing is not cls:
            raise BlockError(
                f"{kind} block '{name}' is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        cls.block_name = name  # type: ignore[attr-defined]
        _BLOCKS[kind][name] = cls
        return cls

    return decorate


def block_names(kind: str) -> list[str]:
    """The blocks registered for ``kind``."""
    interface(kind)
    registry.load_plugins()
    return sorted(_BLOCKS[kind])


def get_block(kind: str, name: str) -> type:
    """The block class ``name`` of ``kind``; a failed lookup lists those that exist."""
    names = block_names(kind)
    if name not in _BLOCKS[kind]:
        raise BlockError(f"no {kind} block named '{name}'; registered: {', '.join(names)}")
    return _BLOCKS[kind][name]


@dataclass(frozen=True)
class BlockSpec:
    """A block as a family names it: kind, registered name and its settings."""

    kind: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)


def block(kind: str, name: str, **params: Any) -> BlockSpec:
    """The spec of block ``name`` of ``kind`` with ``params``, checked now: an unknown block or
    parameter, or a value the block does not implement (its ``check``), raises naming it."""
    cls = get_block(kind, name)
    known = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind == p.KEYWORD_ONLY
    ]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{kind} block '{name}' has no setting {unknown}; settings: {known}")
    cls.check(**params)
    return BlockSpec(kind, name, dict(params))


def build_block(spec: BlockSpec, *args: Any) -> Any:
    """The block ``spec`` names, made with the runtime ``args`` its kind takes (a norm's
    width; the architecture, and a layer's index, for the others) and the spec's settings."""
    return get_block(spec.kind, spec.name)(*args, **spec.params)
