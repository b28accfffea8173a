"""roles/deploy_run/library/deploy_run_processes.py as a real Ansible module, on processes of this test.

The processes stand for what a killed controller leaves on a host: commands marked with another run's
PGAPPNAME (one that ignores SIGTERM, one whose child has a clean environment), next to a command of the
calling run and an unmarked one, which must survive.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MODULE = Path(__file__).resolve().parents[2] / "roles" / "deploy_run" / "library" / "deploy_run_processes.py"


def load_module() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_run_processes", MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(tmp_path: Path, check: bool = False, **params: Any) -> dict[str, Any]:
    args = tmp_path / f"args-{time.monotonic_ns()}.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {**params, "_ansible_check_mode": check}}))
    proc = subprocess.run([sys.executable, str(MODULE), str(args)], capture_output=True, text=True, timeout=60, check=False)
    result = dict(json.loads(proc.stdout))
    assert (proc.returncode != 0) == bool(result.get("failed")), proc.stdout + proc.stderr
    return result


def spawn(script: str, marker: str | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "PGAPPNAME"}
    if marker is not None:
        env["PGAPPNAME"] = marker
    return subprocess.Popen(["sh", "-c", script], env=env, start_new_session=True)


def alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


@pytest.fixture
def hosts_processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs = {
        "other run": spawn("sleep 300", "djm:shop:run-old"),
        "other run, deaf to TERM": spawn("trap '' TERM; sleep 300 & wait; sleep 300", "djm:shop:run-older"),
        "other run, child unmarked": spawn("env -u PGAPPNAME sh -c 'sleep 300' & wait", "djm:shop:run-old"),
        "this run": spawn("sleep 300", "djm:shop:run-now"),
        "another project": spawn("sleep 300", "djm:shopfront:run-old"),
        "unmarked": spawn("sleep 300", None),
    }
    time.sleep(0.5)
    yield procs
    for proc in procs.values():
        if alive(proc):
            os.killpg(proc.pid, 9)
        proc.wait()


def test_stops_what_other_runs_left_and_nothing_else(tmp_path: Path, hosts_processes: dict[str, subprocess.Popen[bytes]]) -> None:
    result = call(tmp_path, prefix="djm:shop:", keep="djm:shop:run-now", timeout=2)
    assert result["changed"]
    found = {p["pid"] for p in result["processes"]}
    others = ["other run", "other run, deaf to TERM", "other run, child unmarked"]
    assert {hosts_processes[name].pid for name in others} <= found
    for name in others:
        hosts_processes[name].wait(timeout=10)
    # The unmarked child of a marked shell is stopped too: not left to apply anything.
    session = str(hosts_processes["other run, child unmarked"].pid)
    assert subprocess.run(["pgrep", "-s", session], capture_output=True, text=True, check=False).stdout == ""
    assert hosts_processes["other run, deaf to TERM"].pid in result["killed"]
    for name in ["this run", "another project", "unmarked"]:
        assert alive(hosts_processes[name]), name


def test_check_mode_reports_and_stops_nothing(tmp_path: Path, hosts_processes: dict[str, subprocess.Popen[bytes]]) -> None:
    result = call(tmp_path, check=True, prefix="djm:shop:", keep="djm:shop:run-now")
    assert result["changed"] and result["killed"] == []
    assert hosts_processes["other run"].pid in {p["pid"] for p in result["processes"]}
    assert all(alive(proc) for proc in hosts_processes.values())


def test_nothing_left_changes_nothing(tmp_path: Path) -> None:
    result = call(tmp_path, prefix="djm:nobody-runs-this:", keep="djm:nobody-runs-this:now")
    assert result == {**result, "changed": False, "processes": [], "killed": []}


def test_an_empty_prefix_is_refused(tmp_path: Path) -> None:
    result = call(tmp_path, prefix="")
    assert result["failed"] and "prefix must not be empty" in result["msg"]


def test_after_stopping_reports_which_client_sockets_to_the_peer_port_are_still_open(tmp_path: Path) -> None:
    """A database session whose client is dead is found on the database host by its client address
    and port: after the stop, the stopped process's socket is closed on this host (FIN_WAIT, or gone)
    while a live client's is open. Read from the network namespace, without other users' fds."""
    listeners = [socket.create_server(("127.0.0.1", 0)), socket.create_server(("::1", 0), family=socket.AF_INET6)]
    marked, live = [], []
    try:
        for listener in listeners:
            host, port = listener.getsockname()[:2]
            script = f"import socket, time; s = socket.create_connection(({host!r}, {port})); time.sleep(300)"
            env = {**os.environ, "PGAPPNAME": "djm:shop:run-old"}
            marked.append(subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True))
            live.append(socket.create_connection((host, port)))
        accepted = [listener.accept()[0] for listener in listeners for _ in range(2)]
        for index, listener in enumerate(listeners):
            port = listener.getsockname()[1]
            result = call(tmp_path, prefix="djm:shop:", keep="djm:shop:run-now", timeout=2, peer_port=port)
            # The first call stops both marked clients; the second finds nothing left to stop.
            assert result["changed"] == (index == 0) and time.time() - 60 < result["read_at"] <= time.time()
            open_ports = {tuple(pair) for pair in result["sockets"]}
            client = next(c for c in live if c.getpeername()[1] == port)
            assert tuple(client.getsockname()[:2]) in open_ports, (client.getsockname(), open_ports)
            assert len(open_ports) == 1, open_ports  # the stopped client's socket is closed
            assert "127.0.0.1" in result["addresses"] and "::1" in result["addresses"]
        for proc in marked:
            proc.wait(timeout=10)
        assert call(tmp_path, prefix="djm:shop:", keep="x")["sockets"] == []  # no peer_port: nothing read
        del accepted
    finally:
        for proc in marked:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for sock in live + listeners:
            sock.close()


def test_addresses_as_the_kernel_writes_them() -> None:
    module = load_module()
    assert module.address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert module.address("00000000000000000000000001000000:0016") == ("::1", 22)
    assert module.address("0000000000000000FFFF00000A00580A:1538") == ("10.88.0.10", 5432)
