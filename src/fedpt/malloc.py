"""Give freed tensor memory back to the system, and back large tensors with huge pages.

glibc serves an allocation above its mmap threshold with its own ``mmap`` and unmaps it on
free; below it, from the heap, which keeps freed chunks for reuse. The threshold starts at
128 KiB but rises to the size of every mmapped chunk freed, up to 32 MiB, so after a few
tensors come and go, every activation and upcast weight under 32 MiB lands in the heap, and a
training step's mix of sizes fragments it: the process keeps what it freed. Fixing the
threshold at 1 MiB stops that; what it costs is a fresh mapping, page-faulted in 4 KiB pages,
per allocation. torch's own switch ``THP_MEM_ALLOC_ENABLE=1`` aligns its allocations of 2 MiB
or more to 2 MiB and asks for transparent huge pages (``madvise``), which takes most of the
page faults away. Measured on a device's LoRA step of the real small LM (1,280 tokens, one
thread, AVX2 EPYC, ``bench/device_memory.py``): peak RSS 3.6 GiB and 91-94 s with glibc's
defaults; 2.2 GiB and 101 s with the threshold alone; 2.2 GiB and 80 s with both.

``FEDPT_MALLOC_MMAP_THRESHOLD``: bytes (default 1 MiB), or ``off`` for glibc's own behaviour;
glibc's ``MALLOC_MMAP_THRESHOLD_``, when set, wins. ``THP_MEM_ALLOC_ENABLE`` is set to 1 unless
the user set it; torch reads it once, at its first allocation: import fedpt before torch. Where
the kernel's transparent huge pages are ``never``, or the libc is not glibc, those parts do nothing.
"""

from __future__ import annotations

import ctypes
import os

ENV = "FEDPT_MALLOC_MMAP_THRESHOLD"
DEFAULT_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def threshold_setting() -> int | None:
    """The threshold ``FEDPT_MALLOC_MMAP_THRESHOLD`` asks for, None for ``off`` (or a bad value:
    importing fedpt must not fail over a tuning knob)."""
    value = os.environ.get(ENV, str(DEFAULT_BYTES)).strip().lower()
    if value == "off" or not value.isdigit():
        return None
    return int(value)


def configure() -> int | None:
    """Fix glibc's mmap threshold for this process and turn on torch's huge-page allocations;
    returns the threshold set, or None when left alone."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    threshold = threshold_setting()
    if threshold is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None
    return threshold if mallopt(_M_MMAP_THRESHOLD, threshold) == 1 else None
