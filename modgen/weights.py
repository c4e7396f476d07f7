"""Loading Hugging Face safetensors checkpoints through an explicit weight-name map."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    TP_SPLITS; ``Split`` says how the loader cuts it).
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
    for name, part in iter_slices(checkpoint):
        yield name, part[:]


def iter_slices(checkpoint: str | Path) -> Iterator[tuple[str, Any]]:
    """Every (name, lazy slice) of a checkpoint, shard by shard: ``get_shape()`` reads no data,
    indexing (``part[a:b]``, ``part[:, a:b]``) reads only the rows and columns asked for."""
    for file in checkpoint_files(checkpoint):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_slice(name)


Target = tuple[str, int | None, str | None]
"""(parameter name, expert index or None, shard or None): what one checkpoint tensor fills."""


@dataclass(frozen=True)
class Split:
    """How this rank's parameters are cut from full checkpoint tensors (tensor parallelism).

    Parameters are built at this rank's sizes; a ``column`` (``row``) rule's tensor is cut into
    ``world`` equal parts along its rows (columns) and this rank takes part ``rank`` (k and v,
    when there are fewer KV heads than ranks, into one part per KV head, and this rank takes
    part ``rank * parts // world``: replicated); ``vocab`` takes rows ``[rank * n, (rank + 1) *
    n)`` of the ``n`` the parameter has, zero past the vocabulary; ``expert`` loads only the
    experts ``[rank * n, (rank + 1) * n)`` of the ``n`` the parameter stacks. A packed
    parameter (``parts`` names its parts, for example q, k and v) loaded from one fused tensor
    is cut part by part: ``global_slice`` gives a part's rows in the full tensor, the loader's
    ``shard_slice`` its rows in this rank's parameter."""

    rank: int
    world: int
    global_slice: Callable[[str, int], slice]
    parts: Callable[[str], tuple[str, ...]]
    vocab_size: int
    replicable: tuple[str, ...] = ("k", "v")
    """Parts that may have fewer pieces than there are ranks (KV heads)."""


def load_weights(
    module: nn.Module,
    checkpoint: str | Path,
    rules: list[WeightRule],
    shard_slice: Callable[[str, int], slice],
    num_layers: int,
    ignore: tuple[str, ...] = (),
    split: Split | None = None,
) -> None:
    """Copy a checkpoint into ``module``'s parameters by ``rules``.

    ``shard_slice(shard, rows)`` gives a shard's rows of a packed parameter of ``rows`` rows.
    A rule applies to the layers whose module has its parameter (so layers may differ: dense
    and MoE). Names matching a regex in ``ignore`` are skipped. Every parameter shard the rules
    expect must be loaded exactly once; a missing, unexpected or mis-shaped tensor is named in
    the error, with the expected and found shapes. With ``split`` (tensor parallelism) each
    parameter takes only this rank's part, read from the file without the rest.
    """
    params = dict(module.named_parameters())
    compiled = [(rule, rule.pattern()) for rule in rules]
    expected = _expected(params, rules, num_layers, shard_slice, split)
    loaded: set[Target] = set()
    unexpected, errors = [], []
    for name, part in iter_slices(checkpoint):
        found = _match(name, compiled)
        target = found[0] if found else None
        if target not in expected and _elsewhere(found, params, split):
            continue  # another rank's expert
        if target is None or target not in expected:
            if target is not None or not any(re.search(p, name) for p in ignore):
                unexpected.append(f"{name} {tuple(part.get_shape())}")
            continue
        param_name, expert, shard = target
        dest = params[param_name].data
        if expert is not None:
            dest = dest[expert - _first_expert(found[1], dest.shape[0], split)]
        if shard is not None:
            dest = dest[shard_slice(shard, dest.shape[0])]
        loaded.add(target)  # a mis-shaped tensor is named as such, not as missing too
        try:
            pieces = _pieces(part, dest, found[1], param_name, split, shard_slice)
        except ValueError as e:
            errors.append(f"{name}: {e}")
            continue
        with torch.no_grad():
            for d, tensor in pieces:
                d.copy_(tensor.to(d.dtype))
    missing = sorted(expected[t] for t in set(expected) - loaded)
    problems = []
    if missing:
        problems.append(f"missing weights: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {', '.join(sorted(unexpected))}")
    problems += errors
    if problems:
        raise WeightLoadError(f"checkpoint {checkpoint}: " + "; ".join(problems))


def _first_expert(rule: WeightRule, local: int, split: Split | None) -> int:
    """The first expert of the ``local`` a parameter stacks on this rank."""
    return split.rank * local if split is not None and rule.tp == "expert" else 0


def _elsewhere(found: Any, params: dict[str, nn.Parameter], split: Split | None) -> bool:
    """Whether a matched tensor is an expert another rank holds (not a stranger)."""
    if split is None or found is None:
        return False
    (param, expert, _), rule = found
    if expert is None or rule.tp != "expert" or param not in params:
        return False
    return 0 <= expert < split.world * params[param].shape[0]


def _pieces(
    part: Any,
    dest: torch.Tensor,
    rule: WeightRule,
    param: str,
    split: Split | None,
    shard_slice: Callable[[str, int], slice],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination view, source tensor) pairs that load ``part`` into ``dest``; a ValueError
    names the shapes when it does not fit."""
    found = tuple(part.get_shape())
    if split is None or split.world == 1 or rule.tp in ("replicated", "expert"):
        if found != tuple(dest.shape):
            raise ValueError(f"expected {tuple(dest.shape)}, found {found}")
        return [(dest, part[:])]
    if rule.tp == "vocab":
        n = dest.shape[0]
        start = split.rank * n
        rows = max(0, min(found[0], start + n) - start)
        if found[1:] != tuple(dest.shape[1:]) or found[0] != split.vocab_size:
            raise ValueError(
                f"expected {(split.vocab_size, *dest.shape[1:])} (cut into {split.world} parts of "
                f"{n} rows), found {found}"
            )
        dest.zero_()
        return [(dest[:rows], part[start : start + rows])] if rows else []
    dim = 0 if rule.tp == "column" else 1
    names = split.parts(param) if rule.shard is None and dim == 0 else ()
    spans = (
        [(p, dest[shard_slice(p, dest.shape[0])], split.global_slice(p, found[0])) for p in names]
        if names
        else [(rule.shard, dest, slice(0, found[dim]))]
    )
    if names and spans[-1][2].stop != found[0]:
        raise ValueError(f"expected {spans[-1][2].stop} rows ({', '.join(names)}), found {found}")
    pieces = []
    for name, d, span in spans:
        full, mine = span.stop - span.start, d.shape[dim]
        other = found[1 - dim] if len(found) > 1 else None
        parts = full // mine if mine else 0
        fewer = 0 < parts < split.world and not split.world % parts  # KV heads fewer than ranks
        replicated = name in split.replicable and fewer
        heads = split.global_slice(name, 0) if name in ("q", "k", "v") else None
        if (
            mine == 0 or full % mine or (parts != split.world and not replicated)
            or (other is not None and other != d.shape[1 - dim])
            or (heads is not None and full != heads.stop - heads.start)
        ):  # fmt: skip
            raise ValueError(
                f"cannot be cut into {split.world} {rule.tp} parts: this rank's part is "
                f"{tuple(d.shape)}, the tensor {found}"
            )
        start = span.start + (split.rank * (full // mine) // split.world) * mine
        src = part[start : start + mine] if dim == 0 else part[:, start : start + mine]
        pieces.append((d, src))
    return pieces


def _expected(
    params: dict[str, nn.Parameter],
    rules: list[WeightRule],
    num_layers: int,
    shard_slice: Callable[[str, int], slice],
    split: Split | None = None,
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
            first = _first_expert(rule, shape[0], split)
            experts = range(first, first + shape[0]) if "{e}" in rule.hf else [None]
            if "{e}" in rule.hf:
                shape = shape[1:]
            if rule.shard is not None:
                rows = range(shape[0])[shard_slice(rule.shard, shape[0])]
                shape = (len(rows), *shape[1:])
            for e in experts:
                hf = rule.hf.replace("{i}", str(i)).replace("{e}", str(e))
                expected[(param, e, rule.shard)] = f"{hf} {shape}"
    return expected


def _match(
    name: str, compiled: list[tuple[WeightRule, re.Pattern[str]]]
) -> tuple[Target, WeightRule] | None:
    for rule, pattern in compiled:
        m = pattern.match(name)
        if m:
            groups = m.groupdict()
            expert = int(groups["e"]) if "e" in groups else None
            return (rule.param.format(i=groups.get("i")), expert, rule.shard), rule
    return None
