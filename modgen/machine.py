"""What machine a figure was measured on: CPU model, vector extensions, threads, torch.

Every benchmark result carries this (results.json's ``machine``, the summary table's machine
row, the peers table), so figures from different CPUs are never read as one; the calibration
cache is keyed by its fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

VECTOR_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve", "sve2",
)  # fmt: skip
"""The vector extensions worth naming beside a CPU figure (Linux /proc/cpuinfo spelling)."""


def cache_root() -> Path:
    """modgen's cache directory (``MODGEN_CACHE``, default ``~/.cache/modgen``)."""
    return Path(os.environ.get("MODGEN_CACHE", Path.home() / ".cache" / "modgen"))


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_info() -> dict[str, Any]:
    """This CPU and the software around it: model name, family/model, vector extensions, cores,
    torch threads, torch version and torch's CPU capability."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    family, model = info.get("cpu family"), info.get("model")
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id") or info.get("CPU implementer", ""),
        "family_model": f"{family}/{model}" if family and model else "",
        "arch": platform.machine(),
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line naming the machine, e.g. ``AMD EPYC (family/model 25/17; avx2 fma avx512f ...);
    2 threads; torch 2.13.0+cpu (AVX512)``."""
    i = info or cpu_info()
    fm = f"family/model {i['family_model']}; " if i.get("family_model") else ""
    return (
        f"{i['cpu']} ({fm}{' '.join(i['vector_extensions']) or 'no vector extensions named'}); "
        f"{i['threads']} threads; torch {i['torch']} ({i['torch_cpu_capability']})"
    )


def fingerprint() -> str:
    """A short hash of what makes timings on this machine comparable: CPU, extensions, threads,
    torch and its CPU capability."""
    return hashlib.sha256(json.dumps(cpu_info(), sort_keys=True).encode()).hexdigest()[:16]


def cpu_busy_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot, summed over CPUs, time
    taken from this VM by its host (steal) included; None where /proc/stat is missing."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy
    ticks = [int(x) for x in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How much of the machine other processes used while the ``with`` block ran: ``fraction``
    is their CPU seconds over wall seconds times CPUs (0 idle, 1 every CPU busy), None where the
    machine does not say (no /proc/stat); ``busy`` says it passed ``LIMIT``."""

    LIMIT = 0.1
    """Above this share of the CPUs kept busy by others (10%), timings taken in the block are
    not to be kept: beside a busy neighbour (a pip install on one of two cores) they ran
    1.5-2x slow, unevenly enough to pick a layout that then ran slower on the quiet machine."""

    @property
    def busy(self) -> bool:
        return self.fraction is not None and self.fraction > self.LIMIT

    def __enter__(self) -> OtherLoad:
        self.fraction: float | None = None
        self._start = (time.perf_counter(), cpu_busy_seconds(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0 = self._start
        busy1 = cpu_busy_seconds()
        wall = time.perf_counter() - wall0
        if busy0 is None or busy1 is None or wall <= 0:
            return
        cpus = os.cpu_count() or 1
        # /proc/stat counts whole clock ticks per CPU: up to a tick each end is rounding, so a
        # block of a few milliseconds does not read one stray tick as a busy machine
        rounding = 2 * cpus / os.sysconf("SC_CLK_TCK")
        others = (busy1 - busy0) - (time.process_time() - own0) - rounding
        self.fraction = max(0.0, others) / (wall * cpus)
