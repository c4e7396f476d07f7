"""Loading Hugging Face safetensors checkpoints through an explicit weight-name map."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


class WeightLoadError(RuntimeError):
    """A checkpoint's tensors do not match the model: the message names each missing,
    unexpected or mis-shaped weight."""


TP_SPLITS = ("column", "row", "vocab", "replicated", "expert")
"""How a parameter splits over tensor-parallel ranks: ``column`` (its output rows), ``row`` (its
input columns), ``vocab`` (rows of the vocabulary), ``replicated`` (whole on every rank) or
``expert`` (whole experts per rank)."""


@dataclass(frozen=True)
class WeightRule:
    """Checkpoint name template -> modgen parameter (template), which shard of it, and how it
    splits for tensor parallelism.

    ``{i}`` in both templates stands for a layer index; ``{e}`` in the checkpoint name for an
    expert, whose slice ``[e]`` of the (stacked) parameter it fills. ``shard`` names a slice of
    a packed parameter (for example "q" of a fused QKV projection), None for the whole
    parameter. ``tp`` declares how the parameter shards over tensor-parallel ranks (one of
    TP_SPLITS; declared for a tensor-parallel executor, not used yet).
    """

    hf: str
    param: str
    shard: str | None = None
    tp: str = "replicated"

    def __post_init__(self) -> None:
        if self.tp not in TP_SPLITS:
            raise ValueError(
                f"weight rule {self.hf}: tp must be one of {TP_SPLITS}, not {self.tp!r}"
            )

    def pattern(self) -> re.Pattern[str]:
        """The regex of checkpoint names this rule takes."""
        escaped = re.escape(self.hf)
        escaped = escaped.replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        return re.compile("^" + escaped + "$")


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


Target = tuple[str, int | None, str | None]
"""(parameter name, expert index or None, shard or None): what one checkpoint tensor fills."""


def load_weights(
    module: nn.Module,
    checkpoint: str | Path,
    rules: list[WeightRule],
    shard_slice: Callable[[str, int], slice],
    num_layers: int,
    ignore: tuple[str, ...] = (),
) -> None:
    """Copy a checkpoint into ``module``'s parameters by ``rules``.

    ``shard_slice(shard, rows)`` gives a shard's rows of a packed parameter of ``rows`` rows.
    A rule applies to the layers whose module has its parameter (so layers may differ: dense
    and MoE). Names matching a regex in ``ignore`` are skipped. Every parameter shard the rules
    expect must be loaded exactly once; a missing, unexpected or mis-shaped tensor is named in
    the error, with the expected and found shapes.
    """
    params = dict(module.named_parameters())
    compiled = [(rule, rule.pattern()) for rule in rules]
    expected = _expected(params, rules, num_layers, shard_slice)
    loaded: set[Target] = set()
    unexpected, errors = [], []
    for name, tensor in iter_tensors(checkpoint):
        target = _match(name, compiled)
        if target is None or target not in expected:
            if target is not None or not any(re.search(p, name) for p in ignore):
                unexpected.append(f"{name} {tuple(tensor.shape)}")
            continue
        param_name, expert, shard = target
        dest = params[param_name].data
        if expert is not None:
            dest = dest[expert]
        if shard is not None:
            dest = dest[shard_slice(shard, dest.shape[0])]
        if tuple(dest.shape) != tuple(tensor.shape):
            errors.append(f"{name}: expected {tuple(dest.shape)}, found {tuple(tensor.shape)}")
            loaded.add(target)  # named as mis-shaped, not as missing too
            continue
        with torch.no_grad():
            dest.copy_(tensor.to(dest.dtype))
        loaded.add(target)
    missing = sorted(expected[t] for t in set(expected) - loaded)
    problems = []
    if missing:
        problems.append(f"missing weights: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {', '.join(sorted(unexpected))}")
    problems += errors
    if problems:
        raise WeightLoadError(f"checkpoint {checkpoint}: " + "; ".join(problems))


def _expected(
    params: dict[str, nn.Parameter],
    rules: list[WeightRule],
    num_layers: int,
    shard_slice: Callable[[str, int], slice],
) -> dict[Target, str]:
    """Each target the rules fill in this module -> the checkpoint name that would fill it and
    the shape it must have, for error messages."""
    expected: dict[Target, str] = {}
    for rule in rules:
        for i in range(num_layers) if "{i}" in rule.param else [None]:
            param = rule.param.format(i=i)
            if param not in params:
                continue
            shape = tuple(params[param].shape)
            experts = range(shape[0]) if "{e}" in rule.hf else [None]
            if "{e}" in rule.hf:
                shape = shape[1:]
            if rule.shard is not None:
                rows = range(shape[0])[shard_slice(rule.shard, shape[0])]
                shape = (len(rows), *shape[1:])
            for e in experts:
                hf = rule.hf.replace("{i}", str(i)).replace("{e}", str(e))
                expected[(param, e, rule.shard)] = f"{hf} {shape}"
    return expected


def _match(name: str, compiled: list[tuple[WeightRule, re.Pattern[str]]]) -> Target | None:
    for rule, pattern in compiled:
        m = pattern.match(name)
        if m:
            groups = m.groupdict()
            expert = int(groups["e"]) if "e" in groups else None
            return rule.param.format(i=groups.get("i")), expert, rule.shard
    return None
