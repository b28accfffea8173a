"""Checks of the loadbalancer scenario: two HAProxy instances in front of two tiny backends."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

testinfra_hosts = ["lb"]

APPS = ("lbrole-app-debian11", "lbrole-app-debian12")
DRAINED = "lbrole-app-debian12"
SOCKET = "/run/haproxy/admin.sock"
REQUESTS = 20


def runtime_api(host, command: str) -> str:
    return host.check_output(f"echo '{command}' | socat -t 5 STDIO UNIX-CONNECT:{SOCKET}")


def server_status(host) -> dict[str, str]:
    rows = [line.split(",") for line in runtime_api(host, "show stat").splitlines()]
    return {row[1]: row[17] for row in rows if row[0] == "django_app" and row[1] in APPS}


def answers(host, count: int = REQUESTS) -> Counter[str]:
    """Send `count` requests through this load balancer; count which backend answered each."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        seen[host.check_output("curl -sf --max-time 5 http://127.0.0.1/whoami").strip()] += 1
    return seen


def run_playbook(name: str) -> None:
    scenario = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
    result = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(scenario / name)],
        capture_output=True, text=True, check=False, env=os.environ.copy(),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_haproxy_running_with_valid_config(host):
    assert host.service("haproxy").is_running
    assert host.service("haproxy").is_enabled
    assert host.run("haproxy -c -f /etc/haproxy/haproxy.cfg").rc == 0
    config = host.file("/etc/haproxy/haproxy.cfg")
    assert config.contains("http-check send meth GET uri /healthz")
    assert config.contains(f"stats socket {SOCKET} mode 660 level admin")


def test_admin_socket(host):
    sock = host.file(SOCKET)
    assert sock.is_socket
    assert sock.mode == 0o660


def test_both_backends_up_and_serving(host):
    assert server_status(host) == dict.fromkeys(APPS, "UP")
    assert set(answers(host)) == set(APPS)


def test_drained_backend_gets_no_new_requests_and_comes_back(host):
    run_playbook("drain.yml")
    assert server_status(host)[DRAINED] == "DRAIN"
    seen = answers(host)
    assert seen[DRAINED] == 0
    assert seen["lbrole-app-debian11"] == REQUESTS
    run_playbook("ready.yml")
    assert server_status(host)[DRAINED] == "UP"
    assert answers(host)[DRAINED] > 0
