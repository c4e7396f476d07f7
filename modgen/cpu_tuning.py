"""Process-level settings that make the CPU path faster."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems


def keep_allocations_on_heap() -> bool:
    """Ask glibc to serve allocations up to 32 MiB from the heap and never trim it.

    Each step allocates many multi-MB temporaries; by default glibc maps each with mmap and
    unmaps it on free, so every step pays page faults and zeroing for memory it just returned.
    Returns False where the C library is not glibc (nothing is changed then).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if ok:
        log.debug("glibc: allocations up to 32 MiB stay on the heap")
    return bool(ok)


_OMP_RUNTIME = re.compile(r"\s(/\S*/lib(?:g|i)?omp[^/\s]*\.so[^/\s]*)$")
_OMP_PAUSE_SOFT = 1


def release_openmp_threads() -> bool:
    """Give back the calling thread's OpenMP worker threads (OpenMP 5's
    ``omp_pause_resource_all``); the next parallel region it runs makes new ones.

    The OpenMP runtime keeps a pool of worker threads for each thread that has run a parallel
    region. Once there are more such threads than CPUs, every pool spins only briefly before it
    sleeps, so each of the hundreds of parallel regions in a step pays a wake-up through the
    kernel: on a 2-core machine, engine steps on a worker thread of a process whose main thread
    built the model ran 30-50% slower. A thread that hands its torch work to another one (the
    AsyncEngine's step thread) calls this first. Returns False where the runtime cannot be
    found or refuses (nothing changes then)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    found = {m.group(1) for line in maps if (m := _OMP_RUNTIME.search(line))}
    if len(found) != 1:
        return False
    try:
        pause = ctypes.CDLL(found.pop()).omp_pause_resource_all
    except (OSError, AttributeError):
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause(_OMP_PAUSE_SOFT) == 0
