"""Simulated devices share the machine's cores (``fedpt.federation.core_share``)."""

import os
import subprocess
import sys

import pytest
import torch

from fedpt.federation.core_share import (ENV, CoreShare, ThreadGovernor, device_busy, governed_threads,
                                         remove_stale_folders)

HOLDER = """
import sys
from pathlib import Path
from fedpt.federation.core_share import CoreShare
with CoreShare(Path(sys.argv[1]), 2).busy():
    print("held", flush=True)
    sys.stdin.readline()
"""


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_busy_processes_are_those_holding_their_lock_even_if_killed_without_cleanup(tmp_path):
    share = CoreShare(tmp_path, 2)
    assert share.busy_processes() == 0
    first, second = _holder(tmp_path), _holder(tmp_path)
    try:
        assert share.busy_processes() == 2
        with share.busy():
            assert share.busy_processes() == 3  # this process counts itself while it holds its lock
        assert share.busy_processes() == 2 and len(list(tmp_path.glob("*.busy"))) == 2  # its file is gone
        first.stdin.close()  # leaves the block: removes its file
        first.wait(timeout=60)
        second.kill()  # dies holding the lock: the file stays, the kernel drops the lock
        second.wait(timeout=60)
        assert len(list(tmp_path.glob("*.busy"))) == 1
        assert share.busy_processes() == 0
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait(timeout=60)


class _Share:
    """A share whose offer the test sets (``threads``), counting how often it is asked."""

    def __init__(self, offer: int) -> None:
        self.offer, self.asked = offer, 0

    def threads(self) -> int:
        self.asked += 1
        return self.offer


def test_threads_are_the_cores_over_the_busy_processes(tmp_path, monkeypatch):
    counts = iter([])
    monkeypatch.setattr(CoreShare, "busy_processes", lambda self: next(counts))
    counts = iter([0, 1, 2, 3])
    assert [CoreShare(tmp_path, 2).threads() for _ in range(4)] == [2, 2, 1, 1]
    counts = iter([1, 2, 3, 4, 5])
    assert [CoreShare(tmp_path, 4).threads() for _ in range(5)] == [4, 2, 1, 1, 1]


def test_the_governor_gives_threads_back_at_once_and_takes_more_only_after_settling(one_thread):
    now = [0.0]
    share = _Share(offer=2)
    governor = ThreadGovernor(share, check_seconds=0.25, settle_seconds=1.0, clock=lambda: now[0],
                              idle=lambda: now[0])  # one core idle all along
    governor()
    assert torch.get_num_threads() == 1 and share.asked == 1  # offered more: waits for it to settle
    now[0] = 0.1
    governor()
    assert share.asked == 1  # within check_seconds: not asked again
    now[0] = 0.6
    governor()
    assert torch.get_num_threads() == 1 and share.asked == 2  # 0.6 s of the 1 s
    share.offer = 1  # a sibling started again before it settled: the wait starts over
    now[0] = 0.9
    governor()
    share.offer = 2
    now[0] = 1.2
    governor()
    now[0] = 2.0
    governor()
    assert torch.get_num_threads() == 1  # 0.8 s since the offer came back
    now[0] = 2.3
    governor()
    assert torch.get_num_threads() == 2 and governor.changes == [2]
    share.offer = 1
    now[0] = 2.6
    governor()
    assert torch.get_num_threads() == 1 and governor.changes == [2, 1]  # given back at once


def test_the_governor_takes_no_more_threads_while_the_cores_are_busy_with_other_work(one_thread):
    now, idle = [0.0], [0.0]
    governor = ThreadGovernor(_Share(offer=2), check_seconds=0.0, settle_seconds=1.0, clock=lambda: now[0],
                              idle=lambda: idle[0])
    for t in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5):  # a quarter of a core idle: someone else's work
        now[0], idle[0] = t, t / 4
        governor()
    assert torch.get_num_threads() == 1 and governor.changes == []
    for t in (3.0, 3.5, 4.0):  # that work ended: a core idle since 2.5 s... but measured from 3.0
        now[0], idle[0] = t, 2.5 / 4 + (t - 2.5)
        governor()
    assert torch.get_num_threads() == 2 and governor.changes == [2]


def test_a_checkpointed_backward_rechecks_the_threads_in_its_recompute(fedpt_home, one_thread):
    """The threads in force inside the model's layers follow the share in the forward and in the
    backward's recompute, and the count from before comes back afterwards."""
    from fedpt.models.loading import load_model

    model = load_model("tiny-small", "float32")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seen = []  # the MLP runs after the layer's norm and attention, whose governor hooks set the count
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    share = _Share(offer=2)
    ids = torch.randint(0, 100, (1, 12))
    with governed_threads(model, share, check_seconds=0.0, settle_seconds=0.0, idle=lambda: None) as governor:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        forward, seen[:] = list(seen), []
        share.offer = 1  # a sibling starts while this one is in its backward
        loss.backward()
        backward, seen[:] = list(seen), []
        share.offer = 2  # the sibling is done
        model(input_ids=ids, use_cache=False)
        assert torch.get_num_threads() == 2
    layers = len(model.model.layers)
    assert forward == [2] * layers and backward == [1] * layers  # recomputed layers, each saw the new count
    assert governor.changes == [2, 1, 2] and torch.get_num_threads() == 1  # the count from before, back


def test_device_busy_needs_the_simulations_share_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with device_busy(True) as share:
        assert share is None  # not in fedpt run's simulation: a device keeps its own threads
    for bad in ("2", f"x:{tmp_path}", f"2:{tmp_path / 'missing'}"):
        monkeypatch.setenv(ENV, bad)
        with device_busy(True) as share:
            assert share is None
    monkeypatch.setenv(ENV, CoreShare(tmp_path, 2).encode())
    with device_busy(False) as share:
        assert share is None and not list(tmp_path.iterdir())
    with device_busy(True) as share:
        assert share == CoreShare(tmp_path, 2) and share.busy_processes() == 1
    assert share.busy_processes() == 0 and not list(tmp_path.iterdir())


def test_stale_share_folders_of_dead_servers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"fedpt-cores-{int(dead.stdout)}-abc"
    alive = tmp_path / f"fedpt-cores-{os.getpid()}-def"
    older = tmp_path / "fedpt-cores-x1y2z3"  # a name without a pid: not ours to judge
    for folder in (gone, alive, older):
        folder.mkdir()
    remove_stale_folders(tmp_path)
    assert not gone.exists() and alive.exists() and older.exists()
