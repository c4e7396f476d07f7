"""Automatic choices decided by measurement on the machine at hand.

A plugin that has several ways to do one thing (attention backends, kernel builds per
instruction set, linear-layer weight layouts, fused element-wise kernels) hands ``choose`` the
candidates as callables that run one representative call each, the name of the plain-torch
baseline, and the shape that makes the timing specific. ``choose`` times them interleaved, keeps
the fastest unless it beats the baseline by less than ``margin`` (so a choice that loses to plain
torch on this machine is never taken), logs the figures that decided it, and caches the decision
per machine fingerprint (CPU, vector extensions, threads, torch), shape, candidates and code
version; a measurement taken while other processes kept the CPUs busy decides its run but is
not cached (``machine.OtherLoad``). ``choose_size`` picks a size the same way: the smallest whose
time per unit is within the margin of the best (SplitFuse's token budget).
``python -m modgen.calibration`` lists the cached decisions; ``--clear`` forgets them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modgen import machine

log = logging.getLogger(__name__)

MARGIN = 0.03
"""How much faster than the baseline a candidate must be to be chosen (3%)."""


@dataclass(frozen=True)
class Choice:
    """A decision: the chosen candidate and the median seconds per call of each."""

    name: str
    timings: dict[str, float]
    cached: bool = False

    def describe(self) -> str:
        """``torch 11.5 ms, cpu/avx512 4.7 ms -> cpu/avx512``."""
        figures = ", ".join(f"{n} {t * 1e3:.3g} ms" for n, t in self.timings.items())
        return f"{figures} -> {self.name}" + (" (cached)" if self.cached else "")


def cache_path() -> Path:
    """The calibration cache file."""
    return machine.cache_root() / "calibration.json"


def measure(candidates: Mapping[str, Callable[[], Any]], repeats: int = 5) -> dict[str, float]:
    """Median seconds per call of each candidate: one warm-up call each, then ``repeats`` rounds
    that call every candidate once, interleaved so that drift on the machine hits all alike. A
    candidate that raises is left out."""
    alive: dict[str, Callable[[], Any]] = {}
    for name, fn in candidates.items():
        try:
            fn()
        except Exception as err:  # a candidate that cannot run here is no candidate
            log.info("calibration: %s cannot run here: %s", name, err)
            continue
        alive[name] = fn
    samples: dict[str, list[float]] = {name: [] for name in alive}
    for _ in range(repeats):
        for name, fn in alive.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(s) for name, s in samples.items()}


def decide(timings: Mapping[str, float], baseline: str, margin: float = MARGIN) -> str:
    """The fastest candidate, or ``baseline`` unless the fastest beats it by ``margin``."""
    if not timings:
        raise ValueError("no candidate could run")
    best = min(timings, key=timings.__getitem__)
    if baseline in timings and timings[best] > timings[baseline] * (1 - margin):
        return baseline
    return best


def choose(
    topic: str,
    shape: Mapping[str, Any],
    candidates: Mapping[str, Callable[[], Any]],
    baseline: str,
    version: str = "",
    repeats: int = 5,
) -> Choice:
    """Decide among ``candidates`` for ``topic`` at ``shape`` (measured, or from the cache).

    ``version`` names the code being timed (e.g. a kernel source hash): a new version measures
    afresh."""

    def decide_now() -> tuple[str, dict[str, float]]:
        timings = measure(candidates, repeats)
        return decide(timings, baseline), timings

    return _cached(topic, shape, sorted(candidates), version, decide_now)


def choose_size(
    topic: str,
    shape: Mapping[str, Any],
    seconds: Callable[[int], float],
    sizes: Sequence[int],
    version: str = "",
    repeats: int = 3,
    margin: float = MARGIN,
) -> Choice:
    """The smallest of ``sizes`` whose time per unit is within ``margin`` of the best size's
    (measured, or from the cache): the size past which more work per call no longer pays.

    ``seconds(n)`` runs one call of size ``n`` and returns how long it took by the caller's
    clock (a simulated executor's is virtual); sizes that raise are left out. The timings are
    the median seconds per call, interleaved over ``repeats`` rounds after a warm-up each."""

    def decide_now() -> tuple[str, dict[str, float]]:
        samples: dict[int, list[float]] = {}
        for n in sizes:
            try:
                seconds(n)
            except Exception as err:  # a size that cannot run here is no candidate
                log.info("calibration: %s %d cannot run here: %s", topic, n, err)
                continue
            samples[n] = []
        for _ in range(repeats):
            for n in samples:
                samples[n].append(seconds(n))
        if not samples:
            raise ValueError(f"calibration: no {topic} of {list(sizes)} could run")
        per_unit = {n: statistics.median(s) / n for n, s in samples.items()}
        best = min(per_unit.values())
        size = min(n for n, t in per_unit.items() if t <= best * (1 + margin))
        return str(size), {str(n): statistics.median(s) for n, s in samples.items()}

    return _cached(topic, shape, [str(n) for n in sizes], version, decide_now)


def _cached(
    topic: str,
    shape: Mapping[str, Any],
    names: list[str],
    version: str,
    decide_now: Callable[[], tuple[str, dict[str, float]]],
) -> Choice:
    """The cached decision for this topic, shape, candidates, code version and machine, or
    ``decide_now()``'s, cached; logged either way."""
    entry = {
        "topic": topic,
        "shape": dict(shape),
        "candidates": names,
        "version": version,
        "machine": machine.fingerprint(),
    }
    key = hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()
    cache = _read_cache()
    if key in cache and cache[key]["choice"] in names:
        choice = Choice(cache[key]["choice"], cache[key]["timings"], cached=True)
    else:
        with machine.OtherLoad() as load:
            choice = Choice(*decide_now())
        if load.busy:  # decides this run only; the next start measures again
            log.warning(
                "calibration: %s %s was measured while other processes kept %.0f%% of the CPUs "
                "busy: used for this run, not cached (the next start measures again)",
                topic, _short(shape), 100 * load.fraction,
            )  # fmt: skip
        else:
            cache[key] = {**entry, "choice": choice.name, "timings": choice.timings,
                          "machine_line": machine.machine_line(),
                          "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
            _write_cache(cache)
    log.info("calibration: %s %s: %s", topic, _short(shape), choice.describe())
    return choice


def _short(shape: Mapping[str, Any]) -> str:
    return "[" + " ".join(f"{k}={v}" for k, v in shape.items()) + "]"


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict[str, Any]) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one


def main() -> None:
    """``python -m modgen.calibration [--clear]``: list (or forget) the cached decisions."""
    parser = argparse.ArgumentParser(prog="python -m modgen.calibration")
    parser.add_argument("--clear", action="store_true", help="forget every cached decision")
    args = parser.parse_args()
    if args.clear:
        cache_path().unlink(missing_ok=True)
        print(f"cleared {cache_path()}")
        return
    print(f"{cache_path()} (this machine: {machine.machine_line()})")
    for entry in _read_cache().values():
        choice = Choice(entry["choice"], entry["timings"])
        print(f"  {entry['topic']} {_short(entry['shape'])}: {choice.describe()}")


if __name__ == "__main__":
    main()
