"""End-to-end tests of the local fleet (scripts/fleet.py) on real podman containers.

A session fixture brings up its own fleet `djmtest` (lb1, app1 on Debian 11, app2 on Debian 12, db1)
with its own network and an inventory under a tmp dir, so a user's `djm` fleet is never touched, and
removes it at the end. Every check goes through SSH with the generated inventory, as Ansible would.
Needs root, podman and the images (`make images`; the fixture runs it, which is ~1 s when cached).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FLEET_PY = REPO / "scripts" / "fleet.py"
FLEET = "djmtest"
LABEL = f"djm.fleet={FLEET}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HTTP_PORT = free_port()
UP_ARGS = ["up", "--name", FLEET, "--apps", "2", "--image-map", "app2=debian12", "--http-port", str(HTTP_PORT)]
DEBIAN12_HOSTS = {"app2"}
ENV = {
    **os.environ,
    "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / ".config" / "containers" / "containers.conf")),
    "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    "ANSIBLE_FORCE_COLOR": "0",
}


def sh(argv: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def fleet_py(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh([sys.executable, str(FLEET_PY), *args], check=check)


def container_ids() -> dict[str, str]:
    out = sh(["podman", "ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}} {{.ID}}"]).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


@dataclass
class Fleet:
    inventory: Path
    up_seconds: float
    up_output: str
    hostvars: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)

    def ssh(self, host: str, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run a shell command on a host over SSH, exactly as the inventory tells Ansible to connect."""
        hv = self.hostvars[host]
        argv = [
            "ssh",
            "-i",
            hv["ansible_ssh_private_key_file"],
            *shlex.split(hv["ansible_ssh_common_args"]),
            "-o",
            "BatchMode=yes",
            f"{hv['ansible_user']}@{hv['ansible_host']}",
            command,
        ]
        return sh(argv, timeout=timeout, check=False)

    def ssh_ok(self, host: str, command: str, timeout: float = 600) -> str:
        proc = self.ssh(host, command, timeout)
        assert proc.returncode == 0, f"{host}: {command!r} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout.strip()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if os.geteuid() != 0 or shutil.which("podman") is None:
        pytest.fail("the fleet tests need root and podman: run make setup, then make test-fleet as root")
    inventory = tmp_path_factory.mktemp("fleet") / "hosts.yml"
    fleet_py("images")
    fleet_py("down", "--name", FLEET)  # leftovers of an interrupted run
    start = time.monotonic()
    proc = fleet_py(*UP_ARGS, "--inventory", str(inventory))
    up_seconds = time.monotonic() - start
    print(f"\nfleet up (cold) took {up_seconds:.1f}s:\n{proc.stdout}")
    data = yaml.safe_load(inventory.read_text())
    result = Fleet(inventory=inventory, up_seconds=up_seconds, up_output=proc.stdout)
    for group, body in data["all"]["children"].items():
        result.groups[group] = list(body["hosts"])
        result.hostvars.update(body["hosts"])
    try:
        yield result
    finally:
        fleet_py("down", "--name", FLEET, check=False)


def test_inventory_has_the_three_groups(fleet: Fleet) -> None:
    assert fleet.groups == {"lb": ["lb1"], "app": ["app1", "app2"], "db": ["db1"]}
    for host, hv in fleet.hostvars.items():
        assert hv["ansible_user"] == "ansible", host
        assert Path(hv["ansible_ssh_private_key_file"]).is_file(), host
        assert "StrictHostKeyChecking=yes" in hv["ansible_ssh_common_args"], host
    assert "up (cold)" in fleet.up_output


def test_ansible_ping_over_ssh(fleet: Fleet) -> None:
    proc = sh(["ansible", "all", "-i", str(fleet.inventory), "-m", "ansible.builtin.ping"], timeout=300)
    for host in fleet.hostvars:
        assert f"{host} | SUCCESS" in proc.stdout, proc.stdout


def test_become_an_unprivileged_user(fleet: Fleet) -> None:
    """become_user to an unprivileged user needs acl on the host (Ansible's temp files)."""
    argv = ["ansible", "app", "-i", str(fleet.inventory), "-m", "ansible.builtin.command", "-a", "whoami"]
    proc = sh([*argv, "--become", "--become-user", "nobody"], timeout=300)
    assert proc.stdout.count("CHANGED | rc=0 >>\nnobody") == 2, proc.stdout


@pytest.mark.parametrize("host", ["lb1", "app1", "app2", "db1"])
def test_systemd_is_running(fleet: Fleet, host: str) -> None:
    state = fleet.ssh(host, "systemctl is-system-running --wait").stdout.strip()
    failed = fleet.ssh(host, "systemctl --failed --no-legend --plain").stdout
    assert state == "running", f"{host}: systemd is {state}; failed units:\n{failed}"


@pytest.mark.parametrize("host", ["lb1", "app1", "app2", "db1"])
def test_python_version_matches_the_debian_release(fleet: Fleet, host: str) -> None:
    version = fleet.ssh_ok(host, "python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
    release = fleet.ssh_ok(host, ". /etc/os-release && echo $VERSION_ID")
    if host in DEBIAN12_HOSTS:
        assert (release, version) == ("12", "3.11")
    else:
        assert (release, version) == ("11", "3.9")


def test_hosts_resolve_each_other_by_name(fleet: Fleet) -> None:
    for source, target in (("app1", "db1"), ("app2", "lb1"), ("lb1", "app2")):
        line = fleet.ssh_ok(source, f"getent hosts {target}")
        assert line.split()[0] == fleet.hostvars[target]["ansible_host"], f"{source} -> {target}: {line}"


def test_each_host_has_its_own_identity(fleet: Fleet) -> None:
    ids = {host: fleet.ssh_ok(host, "cat /etc/machine-id") for host in fleet.hostvars}
    keys = {host: fleet.ssh_ok(host, "cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1] for host in fleet.hostvars}
    hostnames = {host: fleet.ssh_ok(host, "hostname") for host in fleet.hostvars}
    assert len(set(ids.values())) == len(ids), ids
    assert all(len(value) == 32 for value in ids.values()), ids
    assert len(set(keys.values())) == len(keys), keys
    assert hostnames == {host: host for host in fleet.hostvars}


def test_images_leave_the_roles_work_to_the_roles(fleet: Fleet) -> None:
    for host in ("lb1", "db1"):
        out = fleet.ssh_ok(
            host, "dpkg-query -W -f '${db:Status-Abbrev} ${Package}\\n' 2>/dev/null | awk '$1 == \"ii\" {print $2}'"
        )
        installed = set(out.split())
        assert {"openssh-server", "python3-apt", "sudo", "acl", "systemd-sysv"} <= installed, host
        assert not installed & {"python3-venv", "python3-pip", "haproxy", "gunicorn"}, host
        assert not any(pkg.startswith("postgresql") for pkg in installed), host


def test_https_to_pypi_trusts_the_controller_ca(fleet: Fleet) -> None:
    code = fleet.ssh_ok("db1", "curl -sS -o /dev/null -w '%{http_code}' https://pypi.org/simple/six/")
    assert code == "200"
    assert fleet.ssh_ok("db1", "cat /etc/pip.conf") == "[global]\ncert = /etc/ssl/certs/ca-certificates.crt"


@pytest.mark.parametrize("host", ["app1", "app2"])
def test_pip_works_in_a_venv(fleet: Fleet, host: str) -> None:
    fleet.ssh_ok(
        host,
        "sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null",
    )
    fleet.ssh_ok(host, "rm -rf /tmp/venv /tmp/dl && python3 -m venv /tmp/venv")
    fleet.ssh_ok(host, "/tmp/venv/bin/pip download -q --no-deps six -d /tmp/dl")
    wheels = fleet.ssh_ok(host, "ls /tmp/dl")
    assert wheels.startswith("six-") and wheels.endswith(".whl"), wheels


def test_status_lists_every_host(fleet: Fleet) -> None:
    out = fleet_py("status", "--name", FLEET).stdout
    for host, hv in fleet.hostvars.items():
        line = next((line for line in out.splitlines() if line.split()[:1] == [host]), "")
        assert hv["ansible_host"] in line and "running" in line, out
    assert "localhost/djm-debian12" in next(line for line in out.splitlines() if line.startswith("app2 "))


def test_rerunning_up_changes_nothing(fleet: Fleet) -> None:
    before = container_ids()
    inventory_before = fleet.inventory.read_text()
    start = time.monotonic()
    proc = fleet_py(*UP_ARGS, "--inventory", str(fleet.inventory))
    elapsed = time.monotonic() - start
    print(f"\nfleet up (warm) took {elapsed:.1f}s")
    assert "changed: nothing" in proc.stdout, proc.stdout
    assert "up (warm)" in proc.stdout
    assert container_ids() == before
    assert fleet.inventory.read_text() == inventory_before
    assert elapsed < 30


def test_up_repairs_a_host_whose_ssh_access_was_broken(fleet: Fleet) -> None:
    before = container_ids()
    sh(["podman", "exec", f"{FLEET}-app1", "rm", "/home/ansible/.ssh/authorized_keys"])
    assert fleet.ssh("app1", "true").returncode != 0
    proc = fleet_py(*UP_ARGS, "--inventory", str(fleet.inventory))
    assert "changed: ansible user on app1" in proc.stdout, proc.stdout
    assert fleet.ssh_ok("app1", "sudo -n whoami") == "root"
    assert container_ids() == before


def test_up_replaces_a_host_that_a_failed_up_left_half_made(fleet: Fleet) -> None:
    """`podman run` failing in netavark leaves a container "created", without its port: `up` again just works."""
    sh(["podman", "rm", "--force", "--time", "0", f"{FLEET}-lb1"])
    labels = [f"--label={LABEL}", "--label=djm.host=lb1", "--label=djm.role=lb", "--label=djm.image=debian11"]
    sh(["podman", "create", "--name", f"{FLEET}-lb1", *labels, "localhost/djm-debian11:latest", "/sbin/init"])
    proc = fleet_py(*UP_ARGS, "--inventory", str(fleet.inventory))
    assert "replaced half-made lb1" in proc.stdout, proc.stdout
    assert f"lb1:80 is published on http://127.0.0.1:{HTTP_PORT}/" in proc.stdout
    assert fleet.ssh_ok("lb1", "systemctl is-system-running --wait || true") in {"running", "degraded"}
    assert fleet_py(*UP_ARGS, "--inventory", str(fleet.inventory)).stdout.count("changed: nothing") == 1


def test_lb1_port_80_is_published_on_the_controller(fleet: Fleet) -> None:
    assert f"lb1:80 is published on http://127.0.0.1:{HTTP_PORT}/" in fleet.up_output
    server = "sudo systemd-run --unit djmtest-http --working-directory /usr/share/doc python3 -m http.server 80"
    fleet.ssh_ok("lb1", server)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/", timeout=5) as response:
                    assert response.status == 200
                    assert b"python3" in response.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        fleet.ssh("lb1", "sudo systemctl stop djmtest-http")


def test_up_fails_in_one_line_when_the_port_is_taken(fleet: Fleet, tmp_path: Path) -> None:
    proc = fleet_py(
        "up", "--name", "djmother", "--http-port", str(HTTP_PORT), "--inventory", str(tmp_path / "h.yml"), check=False
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.strip() == f"fleet: port {HTTP_PORT} on 127.0.0.1 is taken: pick another --http-port"
    assert sh(["podman", "network", "exists", "djmother-net"], check=False).returncode == 1
    assert not (REPO / ".fleet" / "djmother").exists()


def test_up_refuses_an_inventory_of_another_fleet(fleet: Fleet) -> None:
    proc = fleet_py("up", "--name", "djmother", "--inventory", str(fleet.inventory), check=False)
    assert proc.returncode == 2
    assert "not generated for fleet djmother" in proc.stderr
    assert sh(["podman", "network", "exists", "djmother-net"], check=False).returncode == 1


def test_down_removes_exactly_what_up_made(fleet: Fleet) -> None:
    """Runs last (file order): an unrelated container survives, the labelled objects go."""
    bystander = f"djmtest-bystander-{os.getpid()}"
    sh(["podman", "run", "-d", "--name", bystander, "localhost/djm-debian11:latest", "sleep", "600"])
    try:
        assert len(container_ids()) == 4
        start = time.monotonic()
        out = fleet_py("down", "--name", FLEET).stdout
        print(f"\nfleet down took {time.monotonic() - start:.1f}s: {out}")
        assert container_ids() == {}
        nets = json.loads(sh(["podman", "network", "ls", "--format", "json"]).stdout)
        assert not [net["name"] for net in nets if (net.get("labels") or {}).get("djm.fleet") == FLEET]
        assert not fleet.inventory.exists()
        assert not (REPO / ".fleet" / FLEET).exists()
        assert sh(["podman", "container", "exists", bystander], check=False).returncode == 0
    finally:
        sh(["podman", "rm", "-f", "-t", "0", bystander], check=False)
