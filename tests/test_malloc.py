"""fedpt fixes glibc's mmap threshold at import, so freed tensors go back to the system."""

import os
import subprocess
import sys

import pytest

from fedpt.malloc import DEFAULT_BYTES, ENV, threshold_setting

# Fragments the heap as a training step does: a large tensor freed first (glibc's dynamic
# threshold rises to its size), then 4 MiB tensors with small live malloc blocks between them.
# Prints the MiB that came back to the system when the 4 MiB tensors were freed.
PROBE = """
import fedpt, psutil, torch
process = psutil.Process()
torch.ones(1 << 22)
keep, tensors = [], []
for _ in range(60):
    tensors.append(torch.ones(1 << 20))
    keep.append(bytearray(4096))
before = process.memory_info().rss
del tensors
print((before - process.memory_info().rss) / 2**20)
"""


def released_mib(setting: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "MALLOC_MMAP_THRESHOLD_", "THP_MEM_ALLOC_ENABLE")}
    if setting is not None:
        env[ENV] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_return_to_the_system():
    glibc_default = released_mib("off")
    if glibc_default > 120:
        pytest.skip(f"this libc returned {glibc_default:.0f} MiB by itself: nothing to show here")
    assert released_mib(None) > 200  # of 240 MiB freed


def test_threshold_setting_reads_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert threshold_setting() == DEFAULT_BYTES
    monkeypatch.setenv(ENV, "off")
    assert threshold_setting() is None
    monkeypatch.setenv(ENV, "4194304")
    assert threshold_setting() == 4 << 20
    monkeypatch.setenv(ENV, "a lot")  # importing fedpt must not fail over a tuning knob
    assert threshold_setting() is None


def test_torch_allocates_large_tensors_on_huge_pages_unless_told_not_to():
    """torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation: importing fedpt (before
    torch) must have set it by then; a user's own setting stays."""
    probe = "import fedpt, os, torch; torch.ones(1 << 22); print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    for setting, want in ((None, "1"), ("0", "0")):
        if setting is not None:
            env["THP_MEM_ALLOC_ENABLE"] = setting
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want
