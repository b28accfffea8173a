"""Where the CPU went during a benchmark: the machine's busy CPU seconds and the containers' own, per window.

A sampler thread reads, every `interval` seconds, the machine-wide busy time from /proc/stat (user, nice,
system, irq, softirq: every CPU's, in seconds) and each watched container's CPU time from its cgroup
(cgroup v1 `cpuacct.usage` or v2 `cpu.stat` usage_usec, found from `podman inspect`'s CgroupPath). A window
(start, end) in epoch seconds is then charged the difference between the last sample at or before its start
and the first at or after its end, so a window is measured to one interval at each edge.

On the local fleet the containers are the hosts and everything else is the controller's side (ansible, ssh,
podman's conmon): `busy - hosts` is the controller's CPU time, including the machine's other work (run it on a
quiet machine).
"""

from __future__ import annotations

import bisect
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUSY_FIELDS = (0, 1, 2, 5, 6)  # user nice system [idle iowait] irq softirq (guest time is inside user)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def machine_busy_seconds(stat: str | None = None) -> float:
    """Busy CPU seconds of every CPU since boot, from the `cpu` line of /proc/stat."""
    text = stat if stat is not None else Path("/proc/stat").read_text()
    fields = text.splitlines()[0].split()
    if fields[0] != "cpu":
        raise ValueError("/proc/stat does not start with the cpu line")
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[1 + i]) for i in BUSY_FIELDS) / ticks


def cgroup_usage_file(cgroup_path: str, root: Path = CGROUP_ROOT) -> Path | None:
    """The file holding a cgroup's CPU time: v1's cpuacct.usage (ns) or v2's cpu.stat (usage_usec)."""
    relative = cgroup_path.lstrip("/")
    for candidate in (root / "cpuacct" / relative / "cpuacct.usage", root / "cpu,cpuacct" / relative / "cpuacct.usage",
                      root / relative / "cpu.stat"):  # fmt: skip
        if candidate.is_file():
            return candidate
    return None


def read_usage_seconds(path: Path) -> float:
    """CPU seconds of a cgroup from its usage file (see cgroup_usage_file)."""
    text = path.read_text()
    if path.name == "cpuacct.usage":
        return int(text) / 1e9
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    raise ValueError(f"{path}: no usage_usec")


def container_usage_files(names: list[str]) -> dict[str, Path]:
    """The usage file of each running container of `names` (podman inspect's CgroupPath); a container whose
    cgroup cannot be found is left out."""
    if not names:
        return {}
    out = subprocess.run(["podman", "inspect", "--format", "{{.Name}} {{.State.CgroupPath}}", *names],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    files = {}
    for line in out.splitlines():
        name, _, path = line.partition(" ")
        found = cgroup_usage_file(path) if path else None
        if found is not None:
            files[name] = found
    return files


@dataclass
class Sample:
    t: float
    busy: float
    hosts: dict[str, float] = field(default_factory=dict)


class CpuSampler:
    """Samples the machine and the containers every `interval` s in a thread, from start() to stop()."""

    def __init__(self, usage_files: dict[str, Path], interval: float = 0.5) -> None:
        self.usage_files = usage_files
        self.interval = interval
        self.samples: list[Sample] = []
        self.cpus = os.cpu_count() or 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def sample(self) -> Sample:
        hosts = {}
        for name, path in self.usage_files.items():
            try:
                hosts[name] = read_usage_seconds(path)
            except (OSError, ValueError):  # the container went away: its time is no longer counted
                continue
        return Sample(time.time(), machine_busy_seconds(), hosts)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.sample())

    def window(self, start: float, end: float) -> dict[str, Any]:
        """The CPU seconds spent between start and end: see window_figures."""
        return window_figures(self.samples, start, end, self.cpus)


def window_figures(samples: list[Sample], start: float, end: float, cpus: int) -> dict[str, Any]:
    """Busy CPU seconds of the machine and of the hosts between the last sample at or before `start` and the
    first at or after `end`; `busy_share` is busy / (cpus x those samples' interval)."""
    times = [s.t for s in samples]
    i0 = max(0, bisect.bisect_right(times, start) - 1)
    i1 = min(len(samples) - 1, bisect.bisect_left(times, end))
    a, b = samples[i0], samples[i1]
    seconds = b.t - a.t
    busy = b.busy - a.busy
    hosts = sum(b.hosts[n] - a.hosts[n] for n in b.hosts if n in a.hosts)
    return {
        "seconds": round(seconds, 1),
        "cpu_s": round(busy, 1),
        "hosts_cpu_s": round(hosts, 1),
        "controller_cpu_s": round(busy - hosts, 1),
        "busy_share": round(busy / (cpus * seconds), 3) if seconds > 0 else None,
    }
