"""Process-level settings that make the CPU path faster."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

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
