"""Reading a Hugging Face config.json into a family's typed config, and the fields every family
reads the same way (RoPE parameters, end-of-sequence ids, per-layer attention windows)."""

from __future__ import annotations

import dataclasses
from typing import Any

from modgen.model import ModelConfig

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} | {"name"}
LAYER_TYPES = ("full_attention", "sliding_attention")
"""Values of ``layer_types`` modgen implements."""


def merge_hf(config: Any, hf: dict[str, Any]) -> Any:
    """``config`` with its architecture fields taken from the checkpoint's config.json ``hf``.

    A field config.json does not set takes the field's default (Hugging Face's default for the
    family), never the preset's value: the preset describes another model. RoPE settings are
    read from ``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling`` /
    ``partial_rotary_factor`` (earlier configs).
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in _ENGINE_FIELDS or not f.init:
            continue
        if name in hf:
            values[name] = hf[name]
        elif f.default is not dataclasses.MISSING:
            values[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[name] = f.default_factory()
    params = dict(hf.get("rope_parameters") or {})
    rope = dict(hf.get("rope_scaling") or params)  # rope_scaling wins, as in transformers
    theta = rope.pop("rope_theta", params.get("rope_theta", hf.get("rope_theta")))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    partial = rope.pop("partial_rotary_factor", partial)
    if "rope_theta" in fields and theta is not None:
        values["rope_theta"] = theta
    if "partial_rotary_factor" in fields and partial is not None:
        values["partial_rotary_factor"] = partial
    if "rope_scaling" in fields:
        kind = rope.get("rope_type", rope.get("type", "default"))
        values["rope_scaling"] = None if kind == "default" and len(rope) <= 1 else rope
    if "eos_token_id" in fields:
        values["eos_token_id"] = eos_ids(hf)
    return dataclasses.replace(config, **values)


def eos_ids(hf: dict[str, Any]) -> list[int]:
    """The end-of-sequence ids a config.json names (an id, a list of ids, or none)."""
    eos = hf.get("eos_token_id")
    return list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])


def as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """An ``eos_token_id`` field (an id, a list or None) as a tuple of ids."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def layer_windows(
    num_layers: int,
    window: int | None,
    layer_types: list[str] | None,
    default_sliding: list[bool] | None = None,
) -> tuple[int | None, ...]:
    """Each layer's sliding window: ``window`` for the layers ``layer_types`` marks
    ``sliding_attention`` (or, without ``layer_types``, those ``default_sliding`` marks; every
    layer when neither is given), None for full attention. A layer type modgen does not
    implement is refused by name."""
    if not window:
        return (None,) * num_layers
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(
                f"layer_types {unknown} are not implemented; implemented: {list(LAYER_TYPES)}"
            )
        sliding = [t == "sliding_attention" for t in layer_types]
    else:
        sliding = default_sliding if default_sliding is not None else [True] * num_layers
    return tuple(window if s else None for s in sliding)
