"""``PeakMemory``: the peak of all processes' PSS, who held it and in which server phase."""

from types import SimpleNamespace

import psutil

from fedpt import profile
from fedpt.bench_phases import memory_markdown
from fedpt.metrics import PeakMemory, process_role


class Proc:
    """What ``PeakMemory.sample`` reads of a psutil.Process."""

    def __init__(self, pid: int, cmdline: list[str], pss: int, rss: int | None = None) -> None:
        self.pid, self._cmdline, self.pss = pid, cmdline, pss
        self.rss = pss if rss is None else rss
        self.pss_reads = 0

    def cmdline(self) -> list[str]:
        return self._cmdline

    def memory_full_info(self):
        if self.pss is None:
            raise psutil.NoSuchProcess(self.pid)  # exited between listing and reading
        self.pss_reads += 1
        return SimpleNamespace(pss=self.pss)

    def memory_info(self):
        return SimpleNamespace(rss=self.rss)


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


def test_pss_is_read_at_new_highs_of_the_rss_sum_within_a_cpu_budget():
    """A PSS read that cost 0.3 CPU s: repeated after 0.3 / 0.25 = 1.2 s when the RSS sum passes
    its highest at a read, after 0.3 / 0.02 = 15 s otherwise."""
    from fedpt.metrics import PSS_DUTY_AT_NEW_HIGHS, PSS_DUTY_OTHERWISE

    assert (PSS_DUTY_AT_NEW_HIGHS, PSS_DUTY_OTHERWISE) == (0.25, 0.02)
    gib = 2**30
    assert PeakMemory().due(0, 0.0)  # the first tick reads
    memory = PeakMemory()
    memory._last_read, memory._read_cost, memory._rss_read_high = 100.0, 0.3, 5 * gib
    assert not memory.due(5 * gib, 101.0) and not memory.due(5 * gib, 114.9)
    assert memory.due(5 * gib, 115.0)
    assert not memory.due(6 * gib, 101.1) and memory.due(6 * gib, 101.2)


def test_each_tick_reads_rss_and_pss_only_when_due():
    gib = 2**30
    memory, server = PeakMemory(), Proc(1, ["fedpt", "run"], 2 * gib, rss=3 * gib)
    assert memory.tick(server, [server], 0.0) and server.pss_reads == 1  # the first tick
    memory._read_cost = 0.3  # as if that read had cost 0.3 CPU s
    assert not memory.tick(server, [server], 1.0)  # RSS as before, 1 s later: not due
    server.rss, server.pss = 4 * gib, 3 * gib  # a new high of the RSS sum, 2 s after the read
    assert memory.tick(server, [server], 2.0) and server.pss_reads == 2 and memory.pss_reads == 2
    assert memory.peak_bytes == 3 * gib
    server.rss, memory._read_cost = 3 * gib, 0.3
    assert not memory.tick(server, [server], 3.5)  # back under the high: the slow cadence
    assert memory.tick(server, [server], 17.0)  # 15 s after the last read
