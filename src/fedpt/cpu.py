"""Which CPU this is: every measurement names it, and llama.cpp's buffer choice depends on it.

The project runs on machines of one kind whose CPUs differ (AMD EPYC with AVX-512-BF16, AMD
EPYC with AVX2 only, Intel Xeon with AMX); bf16, MKL and llama.cpp kernels behave very
differently across them, so a number without its CPU means little.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# The instruction-set flags that decide which kernels run (torch bf16, oneDNN, llama.cpp).
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "unknown CPU", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, nothing assumed
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def has_amx(flags: frozenset[str] | None = None) -> bool:
    """Intel AMX tiles (Sapphire Rapids and later)."""
    return "amx_tile" in (cpu_flags() if flags is None else flags)


def cpu_summary() -> str:
    """``AMD EPYC (avx2 avx512f avx512_bf16 avx512_vnni)``: the model name and the flags that matter."""
    flags = cpu_flags()
    notable = [f for f in NOTABLE_FLAGS if f in flags]
    return f"{cpu_model()} ({' '.join(notable) or 'none of ' + '/'.join(NOTABLE_FLAGS)})"
