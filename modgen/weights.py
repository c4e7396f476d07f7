"""Loading Hugging Face safetensors checkpoints through an explicit weight-name map."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


class WeightLoadError(RuntimeError):
    """A checkpoint's tensors do not match the model: the message names each missing,
    unexpected or mis-shaped weight."""


@dataclass(frozen=True)
class WeightRule:
    """Checkpoint name template -> modgen parameter (template) and which shard of it.

    ``{i}`` in both templates stands for a layer index; ``shard`` names a slice of a packed
    parameter (for example "q" of a fused QKV projection), None for the whole parameter.
    """

    hf: str
    param: str
    shard: str | None = None

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def checkpoint_files(checkpoint: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every one there."""
    path = Path(checkpoint)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightLoadError(f"shards named in {index.name} are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {path}")
    return files


def iter_tensors(checkpoint: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of a checkpoint, shard by shard."""
    for file in checkpoint_files(checkpoint):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def load_weights(
    module: nn.Module,
    checkpoint: str | Path,
    rules: list[WeightRule],
    shard_slice: dict[str, slice],
    num_layers: int,
    ignore: tuple[str, ...] = (),
) -> None:
    """Copy a checkpoint into ``module``'s parameters by ``rules``.

    ``shard_slice`` maps a shard name to its rows of the packed parameter. Names matching a regex
    in ``ignore`` are skipped. Every parameter shard the rules expect must be loaded exactly once.
    """
    params = dict(module.named_parameters())
    compiled = [(rule, rule.pattern()) for rule in rules]
    expected = set()
    for rule in rules:
        layers = range(num_layers) if "{i}" in rule.param else [None]
        expected |= {(rule.param.format(i=i), rule.shard) for i in layers}
    loaded: set[tuple[str, str | None]] = set()
    unexpected, errors = [], []
    for name, tensor in iter_tensors(checkpoint):
        target = _match(name, compiled)
        if target is None:
            if not any(re.search(p, name) for p in ignore):
                unexpected.append(name)
            continue
        param_name, shard = target
        if param_name not in params or (param_name, shard) not in expected:
            unexpected.append(name)
            continue
        dest = params[param_name].data
        if shard is not None:
            dest = dest[shard_slice[shard]]
        if tuple(dest.shape) != tuple(tensor.shape):
            errors.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(dest.shape)}")
            continue
        with torch.no_grad():
            dest.copy_(tensor.to(dest.dtype))
        loaded.add(target)
    missing = sorted(_hf_name(p, s, rules) for p, s in expected - loaded)
    problems = []
    if missing:
        problems.append(f"missing weights: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {', '.join(sorted(unexpected))}")
    problems += errors
    if problems:
        raise WeightLoadError(f"checkpoint {checkpoint}: " + "; ".join(problems))


def _match(name: str, compiled: list[tuple[WeightRule, re.Pattern[str]]]) -> tuple | None:
    for rule, pattern in compiled:
        m = pattern.match(name)
        if m:
            return rule.param.format(i=m.groupdict().get("i")), rule.shard
    return None


def _hf_name(param: str, shard: str | None, rules: list[WeightRule]) -> str:
    """The checkpoint name that would have filled (param, shard), for error messages."""
    for rule in rules:
        m = re.compile("^" + re.escape(rule.param).replace(r"\{i\}", r"(?P<i>\d+)") + "$").match(
            param
        )
        if m and rule.shard == shard:
            return rule.hf.format(i=m.groupdict().get("i"))
    return param
