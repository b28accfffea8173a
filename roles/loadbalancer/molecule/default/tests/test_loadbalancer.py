"""Checks of the loadbalancer scenario: two HAProxy instances in front of two tiny backends.

The drain/ready and maintenance tests run the scenario's playbooks (drain.yml, ready.yml,
maintenance.yml) against both load balancers and look at every one of them afterwards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import testinfra

LBS = ("lbrole-lb-debian11", "lbrole-lb-debian12")
testinfra_hosts = [f"podman://{lb}" for lb in LBS]

APPS = ("lbrole-app-debian11", "lbrole-app-debian12")
DRAINED = "lbrole-app-debian12"
SOCKET = "/run/haproxy/admin.sock"
MAINTENANCE_MAP = "/etc/haproxy/django-maintenance.map"
REQUESTS = 20
SLOW_REQUEST_UNIT = "molecule-slow-request"

# Run by a load balancer's python3: what a client and the runtime API see, in one remote call.
PROBE = r"""
import json, socket, sys, urllib.error, urllib.request
sock, map_file = sys.argv[1], sys.argv[2]
def get(path):
    try:
        with urllib.request.urlopen("http://127.0.0.1" + path, timeout=5) as response:
            status, headers, body = response.status, response.getheaders(), response.read()
    except urllib.error.HTTPError as error:
        status, headers, body = error.code, list(error.headers.items()), error.read()
    return {"status": status, "headers": {k.lower(): v for k, v in headers}, "body": body.decode()}
def api(command):
    client = socket.socket(socket.AF_UNIX)
    client.connect(sock)
    client.sendall(command.encode() + b"\n")
    out = b""
    while True:
        chunk = client.recv(65536)
        if not chunk:
            break
        out += chunk
    client.close()
    return out.decode()
with open(map_file) as handle:
    map_content = handle.read()
print(json.dumps({
    "root": get("/"), "whoami": get("/whoami"), "health": get("/healthz"),
    "map_file": map_content,
    "runtime_map": api("show map " + map_file).split()[1:],
    "pid": [line.split(":")[1].strip() for line in api("show info").splitlines() if line.startswith("Pid:")][0],
}))
"""


def runtime_api(host, command: str) -> str:
    return host.check_output(f"echo '{command}' | socat -t 5 STDIO UNIX-CONNECT:{SOCKET}")


def server_status(host, backend: str = "django_app") -> dict[str, str]:
    rows = [line.split(",") for line in runtime_api(host, "show stat").splitlines()]
    return {row[1]: row[17] for row in rows if row[0] == backend and row[1] in APPS}


def sessions(host) -> int:
    rows = [line.split(",") for line in runtime_api(host, "show stat").splitlines()]
    return sum(int(row[4]) for row in rows if row[0] == "django_app" and row[1] in APPS)


def answers(host, count: int = REQUESTS) -> Counter[str]:
    """Send `count` requests through this load balancer; count which backend answered each (or "failed").

    One remote call for all of them.
    """
    out = host.check_output(f"for i in $(seq {count}); do curl -sf --max-time 5 http://127.0.0.1/whoami || echo failed; done")
    return Counter(out.split())


@cache
def every_lb() -> list[Any]:
    return testinfra.get_hosts(testinfra_hosts)


def name(host) -> str:
    return host.backend.get_hostname()


def probe(host) -> dict[str, Any]:
    result = host.run("python3 -c %s %s %s", PROBE, SOCKET, MAINTENANCE_MAP)
    assert result.rc == 0, f"{name(host)}: {result.stderr}"
    return json.loads(result.stdout)


def run_playbook(name: str, extra_vars: dict[str, Any] | None = None, check: bool = False) -> dict[str, int]:
    """Run a playbook of the scenario; return the number of changed tasks per host from its recap."""
    scenario = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
    argv = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(scenario / name)]
    if extra_vars is not None:
        argv += ["--extra-vars", json.dumps(extra_vars)]
    if check:
        argv.append("--check")
    result = subprocess.run(
        argv, capture_output=True, text=True, check=False, env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    changed = {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+:\s+ok=\d+\s+changed=(\d+)", result.stdout, re.MULTILINE)}
    assert changed, result.stdout[-3000:]
    return changed


def window(opened: bool, check: bool = False) -> dict[str, int]:
    return run_playbook("maintenance.yml", {"loadbalancer_maintenance": opened}, check=check)


def assert_window_open(lb, state: dict[str, Any]) -> None:
    where = name(lb)
    root = state["root"]
    assert root["status"] == 503, (where, root)
    assert root["headers"]["retry-after"] == "30", (where, root["headers"])
    assert root["headers"]["content-type"].startswith("text/html"), (where, root["headers"])
    assert "Down for maintenance" in root["body"], (where, root["body"])
    assert state["whoami"]["status"] == 503, where
    # The health path still goes through to a backend (the tiny Python server answers it).
    health = state["health"]
    assert health["status"] == 200 and json.loads(health["body"]) == {"status": "ok"}, (where, health)
    assert health["headers"]["server"].startswith("SimpleHTTP"), (where, health["headers"])
    assert state["map_file"] == "state on\n", where
    assert state["runtime_map"] == ["state", "on"], where


def assert_window_closed(lb, state: dict[str, Any]) -> None:
    where = name(lb)
    assert state["root"]["status"] == 200, (where, state["root"])
    assert state["whoami"]["status"] == 200 and state["whoami"]["body"].strip() in APPS, (where, state["whoami"])
    assert state["map_file"] == "state off\n", where
    assert state["runtime_map"] == ["state", "off"], where


def reloaded(lb, old_pid: str) -> dict[str, Any]:
    """The probe once a new HAProxy worker (another pid) answers on the admin socket."""
    for _ in range(120):
        result = lb.run("python3 -c %s %s %s", PROBE, SOCKET, MAINTENANCE_MAP)
        if result.rc == 0 and json.loads(result.stdout)["pid"] != old_pid:
            return json.loads(result.stdout)
        time.sleep(0.5)
    raise AssertionError(f"{name(lb)}: no new HAProxy worker after the reload")


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


def test_maintenance_window_closed_after_converge(host):
    state = host.file(MAINTENANCE_MAP)
    assert (state.user, state.group, state.mode) == ("root", "haproxy", 0o644)
    assert_window_closed(host, probe(host))


def test_both_backends_up_and_serving(host):
    assert server_status(host) == dict.fromkeys(APPS, "UP")
    assert set(answers(host)) == set(APPS)


def test_static_files_go_to_the_static_servers_which_a_drain_leaves_serving(host):
    """/static/ goes to each app host's static port (8081), never to the app port (8000, which has no
    /static/); that backend is not drained with the app's server: a host restarting still serves them."""
    assert server_status(host, "django_static") == dict.fromkeys(APPS, "UP")
    fetch = "curl -sf --max-time 5 http://127.0.0.1/static/app.css || echo failed"
    out = host.check_output(f"for i in $(seq {REQUESTS}); do {fetch}; done")
    assert Counter(line.split()[2] for line in out.splitlines() if line.startswith("/*")) == dict.fromkeys(APPS, REQUESTS // 2)
    assert "failed" not in out
    # The app port's answer for a path outside the prefix: still the app (the tiny server's /whoami).
    assert set(answers(host)) == set(APPS)


def test_drained_backend_gets_no_new_requests_and_comes_back(host):
    run_playbook("rotation.yml", {"expected": []})
    run_playbook("drain.yml")
    assert server_status(host)[DRAINED] == "DRAIN"
    run_playbook("rotation.yml", {"expected": [DRAINED]})  # what an undo switches back first
    # Its static files are still served: only the app's server is drained.
    static = host.check_output("for i in 1 2 3 4; do curl -sf --max-time 5 http://127.0.0.1/static/app.css; done")
    assert DRAINED in static
    seen = answers(host)
    assert seen[DRAINED] == 0
    assert seen["lbrole-app-debian11"] == REQUESTS
    # Check mode neither puts it back nor waits for it to come UP (it never would).
    run_playbook("ready.yml", check=True)
    assert server_status(host)[DRAINED] == "DRAIN"
    run_playbook("ready.yml")
    # ready.yml returns once every load balancer reports the server UP: no waiting here.
    assert {name(lb): server_status(lb)[DRAINED] for lb in every_lb()} == {name(lb): "UP" for lb in every_lb()}
    assert answers(host)[DRAINED] > 0
    run_playbook("rotation.yml", {"expected": []})


def test_maintenance_window_opens_survives_a_reload_and_closes():
    try:
        assert sum(window(opened=True).values()) > 0
        assert window(opened=True) == {"lbrole-app-debian11": 0}, "opening an open window changed something"
        for lb in every_lb():
            assert_window_open(lb, probe(lb))
        # A reload re-reads the map file: the window stays open in the new worker.
        for lb in every_lb():
            old_pid = probe(lb)["pid"]
            assert lb.run("systemctl reload haproxy").rc == 0
            assert_window_open(lb, reloaded(lb, old_pid))
    finally:
        closing = window(opened=False)
    assert sum(closing.values()) > 0
    assert window(opened=False) == {"lbrole-app-debian11": 0}, "closing a closed window changed something"
    for lb in every_lb():
        assert_window_closed(lb, probe(lb))


def test_maintenance_check_mode_opens_nothing_and_does_not_wait_for_requests_in_flight():
    lb = every_lb()[0]
    start = lb.run(
        f"systemd-run --unit={SLOW_REQUEST_UNIT} --collect curl -s --limit-rate 100k -o /dev/null http://127.0.0.1/big"
    )
    assert start.rc == 0, start.stderr
    try:
        for _ in range(40):
            if sessions(lb) > 0:
                break
            time.sleep(0.5)
        assert sessions(lb) > 0, "the slow request never reached a backend"
        # A real opening would wait for that request (and give up after loadbalancer_drain_timeout).
        window(opened=True, check=True)
        assert sessions(lb) > 0, "the slow request ended: the test proves nothing"
        for each in every_lb():
            assert_window_closed(each, probe(each))
    finally:
        lb.run(f"systemctl stop {SLOW_REQUEST_UNIT}")


def check_results(host) -> dict[str, tuple[str, str]]:
    """(check_status, check_code) of each server of the app's backend, from `show stat`'s named columns."""
    lines = runtime_api(host, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    return {
        row["svname"]: (row["check_status"].lstrip("* "), row["check_code"])
        for row in rows
        if row.get("pxname") == "django_app" and row.get("svname") in APPS
    }


def test_a_health_page_that_redirects_keeps_the_servers_up():
    """The health gate takes 2xx and 3xx; HAProxy's check must take the same, or a project whose health
    page redirects (`/` to `/en/`) has every server DOWN. The tiny server answers /moved with a 301.
    Last test: it puts /healthz back."""
    try:
        run_playbook("converge.yml", {"loadbalancer_health_path": "/moved"})
        # Every server is checked on /moved, answers 301 and is UP. With a 2xx-only check they are
        # L7STS and DOWN after fall (3) checks 500 ms apart; poll rather than sleep a guess (a loaded
        # machine delays the reload's first checks).
        want = {name(lb): (dict.fromkeys(APPS, "UP"), dict.fromkeys(APPS, ("L7OK", "301"))) for lb in every_lb()}
        deadline = time.monotonic() + 60
        while True:
            seen = {name(lb): (server_status(lb), check_results(lb)) for lb in every_lb()}
            if seen == want or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert seen == want
    finally:
        run_playbook("converge.yml")
