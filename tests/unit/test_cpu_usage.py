"""scripts/cpu_usage.py: busy CPU seconds from /proc/stat and cgroups, charged to windows between samples."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import cpu_usage  # noqa: E402


def test_busy_seconds_count_user_nice_system_irq_softirq_and_not_idle_or_iowait() -> None:
    tick = os.sysconf("SC_CLK_TCK")
    stat = f"cpu  {tick} {tick} {tick} {1000 * tick} {500 * tick} {tick} {tick} 77 0 0\ncpu0 1 1 1 1 1 1 1 0 0 0\n"
    assert cpu_usage.machine_busy_seconds(stat) == 5.0
    assert cpu_usage.machine_busy_seconds() > 0  # this machine's own
    with pytest.raises(ValueError):
        cpu_usage.machine_busy_seconds("intr 1 2 3\n")


def test_a_cgroup_v1_or_v2_usage_file_is_found_and_read_in_seconds(tmp_path: Path) -> None:
    v1 = tmp_path / "cpuacct" / "libpod_parent" / "libpod-abc"
    v1.mkdir(parents=True)
    (v1 / "cpuacct.usage").write_text("2500000000\n")
    found = cpu_usage.cgroup_usage_file("/libpod_parent/libpod-abc", tmp_path)
    assert found == v1 / "cpuacct.usage" and cpu_usage.read_usage_seconds(found) == 2.5
    v2 = tmp_path / "machine.slice" / "libpod-def.scope"
    v2.mkdir(parents=True)
    (v2 / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    found = cpu_usage.cgroup_usage_file("/machine.slice/libpod-def.scope", tmp_path)
    assert found == v2 / "cpu.stat" and cpu_usage.read_usage_seconds(found) == 1.5
    assert cpu_usage.cgroup_usage_file("/nowhere", tmp_path) is None


def sample(t: float, busy: float, **hosts: float) -> cpu_usage.Sample:
    return cpu_usage.Sample(t, busy, dict(hosts))


def test_a_window_is_charged_from_the_sample_before_its_start_to_the_one_after_its_end() -> None:
    samples = [sample(0, 0, app1=0, db1=0), sample(1, 1.5, app1=0.5, db1=0.2), sample(2, 3.0, app1=1.0, db1=0.4),
               sample(3, 3.2, app1=1.0, db1=0.4)]  # fmt: skip
    # 0.5..1.9: from the sample at 0 to the one at 2
    assert cpu_usage.window_figures(samples, 0.5, 1.9, cpus=2) == {
        "seconds": 2.0, "cpu_s": 3.0, "hosts_cpu_s": 1.4, "controller_cpu_s": 1.6, "busy_share": 0.75,
    }  # fmt: skip
    # exactly on samples: 1..2
    assert cpu_usage.window_figures(samples, 1, 2, cpus=2)["cpu_s"] == 1.5
    # a container that vanished (or appeared) inside the window is not counted
    gone = [sample(0, 0, app1=0, app2=5.0), sample(1, 1.0, app1=0.4)]
    assert cpu_usage.window_figures(gone, 0, 1, cpus=1)["hosts_cpu_s"] == 0.4
    # a window past the last sample ends at the last sample
    assert cpu_usage.window_figures(samples, 2.5, 9, cpus=2)["seconds"] == 1.0


def test_the_sampler_samples_until_stopped(tmp_path: Path) -> None:
    usage = tmp_path / "cpuacct.usage"
    usage.write_text("1000000000\n")
    sampler = cpu_usage.CpuSampler({"app1": usage, "gone": tmp_path / "missing"}, interval=0.01).start()
    usage.write_text("3000000000\n")
    sampler.stop()
    assert len(sampler.samples) >= 2 and "gone" not in sampler.samples[-1].hosts
    first, last = sampler.samples[0], sampler.samples[-1]
    assert sampler.window(first.t, last.t)["hosts_cpu_s"] in (0.0, 2.0)  # the first sample may see either value
    assert last.hosts["app1"] == 3.0
