"""``PeakMemory``: the peak of all processes' PSS, who held it and in which server phase."""

from types import SimpleNamespace

import psutil

from fedpt import profile
from fedpt.bench_phases import memory_markdown
from fedpt.metrics import PeakMemory, process_role


class Proc:
    """What ``PeakMemory.sample`` reads of a psutil.Process."""

    def __init__(self, pid: int, cmdline: list[str], pss: int) -> None:
        self.pid, self._cmdline, self.pss = pid, cmdline, pss

    def cmdline(self) -> list[str]:
        return self._cmdline

    def memory_full_info(self):
        if self.pss is None:
            raise psutil.NoSuchProcess(self.pid)  # exited between listing and reading
        return SimpleNamespace(pss=self.pss)


def test_process_roles():
    assert process_role(["ray::ClientAppActor.run"]) == "device actor"
    assert process_role(["ray::IDLE"]) == "ray::IDLE"
    assert process_role(["/venv/lib/ray/core/src/ray/gcs/gcs_server", "--port=1"]) == "ray gcs_server"
    assert process_role(["/usr/bin/python", "-u", "/venv/lib/ray/_private/log_monitor.py"]) == "ray log_monitor"
    assert process_role(["/usr/bin/something"]) == "something"


def test_the_peak_keeps_its_makers_and_each_process_its_own_peak():
    memory, gib = PeakMemory(), 2**30
    server = Proc(1, ["fedpt", "run"], 3 * gib)
    idle = Proc(2, ["ray::IDLE"], gib // 10)
    profile.reset()
    with profile.phase("evaluation: proxy"):
        memory.sample(server, [server, idle])  # 3.1 GiB: the peak so far
    idle._cmdline, idle.pss = ["ray::ClientAppActor.run"], 2 * gib  # the worker becomes a device
    server.pss = gib
    profile.waiting("device rounds (wait)")
    memory.sample(server, [server, idle, Proc(3, ["ray::IDLE"], None)])  # 3.0 GiB: not a peak
    idle._cmdline = ["ray::IDLE"]  # idle again after its round: still the device it was
    server.pss = 4 * gib
    memory.sample(server, [server, idle])  # 6 GiB: the peak, while the devices train
    profile.waiting(None)
    server.pss = gib
    with profile.phase("checkpoint writing"):
        memory.sample(server, [server, idle])  # 3 GiB after the peak: it changes nothing
    report = memory.report()
    assert report["peak_bytes"] == 6 * gib
    assert report["at_peak"] == {"phase": "device rounds (wait)",
                                 "processes": {"server": 4 * gib, "device actor (pid 2)": 2 * gib}}
    assert report["per_process_peak_bytes"] == {"server": 4 * gib, "device actor (pid 2)": 2 * gib}
    table = "\n".join(memory_markdown(report))
    assert "6.00 GiB PSS, server in phase `device rounds (wait)`" in table
    assert "| server | 4.00 | 4.00 |" in table and "| device actor (pid 2) | 2.00 | 2.00 |" in table
    assert memory_markdown(None) == [] and memory_markdown({"peak_bytes": 1}) == []
