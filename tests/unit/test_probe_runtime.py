"""scripts/probe_runtime.py: set-up's run-time probe names the missing piece in one line.

A binary is hidden by running the probe with a PATH made of links to everything on the real PATH
except that binary. The container probe needs podman (installed by `make setup`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "scripts" / "probe_runtime.py"


def path_without(tmp_path: Path, *hidden: str) -> str:
    """A directory of links to every executable on PATH except the hidden ones."""
    shadow = tmp_path / "bin"
    shadow.mkdir()
    for directory in [*os.environ["PATH"].split(os.pathsep), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]:
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = shadow / entry.name
            if entry.name in hidden or link.exists() or link.is_symlink():
                continue
            link.symlink_to(entry.path)
    return str(shadow)


def run_probe(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, env=env, timeout=180, check=False)


@pytest.mark.parametrize(("hidden", "package"), [("iptables", "iptables"), ("debootstrap", "debootstrap"), ("runc", "runc")])
def test_hidden_binary_is_named_in_one_line(tmp_path: Path, hidden: str, package: str) -> None:
    result = run_probe(path_without(tmp_path, hidden), "--skip-container")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"setup: {hidden} not found")
    assert f"apt-get install {package}" in lines[0]


needs_podman = pytest.mark.skipif(shutil.which("podman") is None or os.geteuid() != 0, reason="needs podman as root (make setup)")


@needs_podman
def test_container_probe_passes_with_everything_installed(tmp_path: Path) -> None:
    result = run_probe(os.environ["PATH"] + ":/usr/sbin:/sbin")
    assert result.returncode == 0, result.stderr
    assert "podman runs a container" in result.stdout


@needs_podman
def test_container_probe_fails_in_one_line_when_netavark_lacks_iptables(tmp_path: Path) -> None:
    # The binary check skipped: the live probe itself must catch what the packages' metadata does not.
    result = run_probe(path_without(tmp_path, "iptables", "ip6tables"), "--skip-binaries")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "podman cannot run a container on a network" in lines[0]
    assert "apt-get install iptables" in lines[0]
    leftover = subprocess.run(["podman", "network", "ls", "--format", "{{.Name}}"], capture_output=True, text=True, check=False)
    assert "djm-probe-" not in leftover.stdout
