"""``model=auto model.checkpoint=DIR``: the family that loads the checkpoint, found through the
registry by config.json's ``model_type`` (else its ``architectures``)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from modgen import registry
from modgen.model import CausalLM, ModelConfig, ModelSpec, read_hf_config
from modgen.registry import register

log = logging.getLogger(__name__)


def supported() -> dict[str, str]:
    """Each model_type a registered family loads -> the family's name."""
    out = {}
    for name in registry.names("model"):
        for model_type in getattr(registry.get("model", name), "hf_model_types", ()):
            out.setdefault(model_type, name)
    return out


def family_of(hf: dict[str, Any], checkpoint: str) -> str:
    """The registered family for a config.json; an error listing the supported model types
    when none loads it."""
    by_type = supported()
    if hf.get("model_type") in by_type:
        return by_type[hf["model_type"]]
    for arch in hf.get("architectures") or []:
        for name in registry.names("model"):
            if arch in getattr(registry.get("model", name), "hf_architectures", ()):
                return name
    raise ValueError(
        f"model=auto: {checkpoint} is model_type {hf.get('model_type')!r} (architectures "
        f"{hf.get('architectures')}), which no registered model family loads; supported "
        f"model types: {', '.join(f'{t} (model={n})' for t, n in sorted(by_type.items()))}"
    )


@register("model", "auto")
class AutoCausalLM(CausalLM):
    """Builds the registered family that loads ``model.checkpoint`` (and says which)."""

    @dataclass(kw_only=True)
    class Config(ModelConfig):
        """The engine's model settings; the architecture comes from the checkpoint."""

    @classmethod
    def resolve(cls, config: ModelConfig) -> tuple[type[CausalLM], ModelConfig]:
        """The family class and its config (this one's settings, the family's defaults)."""
        if not config.checkpoint:
            raise ValueError("model=auto picks the family from a checkpoint: set model.checkpoint")
        name = family_of(read_hf_config(config.checkpoint), config.checkpoint)
        settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)}
        log.info("model=auto: %s loads as model=%s", config.checkpoint, name)
        return registry.get("model", name), registry.to_config("model", {"name": name, **settings})

    @classmethod
    def describe(cls, config: ModelConfig) -> ModelSpec:
        family, family_config = cls.resolve(config)
        return family.describe(family_config)

    def __new__(cls, config: ModelConfig, device: torch.device) -> CausalLM:  # type: ignore[misc]
        family, family_config = cls.resolve(config)
        return family(family_config, device)

    def forward(self, batch, kv_caches, attn, attn_meta):  # never built: __new__ returns a family
        raise NotImplementedError
