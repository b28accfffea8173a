"""Checks of the django_service scenario: fixture v1 under gunicorn, hardened, health-gated."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

UNIT = "acme.service"


def show(host, *properties: str) -> dict[str, str]:
    out = host.check_output(f"systemctl show {UNIT} -p {','.join(properties)}")
    return dict(line.split("=", 1) for line in out.splitlines())


def test_service_active_and_enabled(host):
    service = host.service("acme")
    assert service.is_running
    assert service.is_enabled
    assert show(host, "Type")["Type"] == "notify"


def test_runs_as_the_app_user_from_current(host):
    props = show(host, "MainPID", "User", "WorkingDirectory")
    assert props["User"] == "acme"
    assert props["WorkingDirectory"] == "/srv/acme/current"
    pid = props["MainPID"]
    assert host.check_output(f"ps -o user= -p {pid}").strip() == "acme"
    assert "/srv/acme/current/venv/bin/gunicorn" in host.file(f"/proc/{pid}/cmdline").content_string


def test_hardening_properties(host):
    props = show(host, "NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome", "PrivateDevices",
                 "CapabilityBoundingSet", "ReadWritePaths")
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["PrivateTmp"] == "yes"
    assert props["ProtectHome"] == "yes"
    assert props["PrivateDevices"] == "yes"
    assert props["CapabilityBoundingSet"] == ""
    assert "/srv/acme/shared" in props["ReadWritePaths"]


def test_hardening_is_enforced_on_the_process(host):
    pid = show(host, "MainPID")["MainPID"]
    status = host.file(f"/proc/{pid}/status").content_string
    assert "NoNewPrivs:\t1" in status
    mounts = host.file(f"/proc/{pid}/mountinfo").content_string.splitlines()
    root = next(line for line in mounts if line.split()[4] == "/")
    assert " ro," in f" {root.split()[5]},"  # ProtectSystem=strict: / is read-only
    shared = [line for line in mounts if line.split()[4] == "/srv/acme/shared"]
    assert shared and shared[-1].split()[5].startswith("rw")


def test_healthz_answers_the_release_through_gunicorn(host):
    out = host.check_output("curl -s -w '\\n%{http_code}' http://127.0.0.1:8000/healthz")
    body, status = out.rsplit("\n", 1)
    assert status == "200", body
    data = json.loads(body)
    assert data["release"] == "v1"
    assert data["database"] is True
    assert data["django"] == "3.2.25"


def test_health_gate_fails_on_the_wrong_release(host):
    """The gate fails, shows the journal, and the running service is left alone."""
    if host.backend.get_hostname() != "djservice-debian12":
        pytest.skip("one run of the playbook covers both hosts")
    pids_before = show(host, "MainPID")["MainPID"]
    result = run_playbook("wrong_release.yml")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "release=v999" in output
    assert "Last 50 journal lines" in output
    assert "gunicorn" in output.split("Last 50 journal lines", 1)[1]
    assert show(host, "MainPID")["MainPID"] == pids_before


def run_playbook(name: str) -> subprocess.CompletedProcess[str]:
    scenario = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
    return subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(scenario / name)],
        capture_output=True, text=True, check=False, env=os.environ.copy(),
    )


def test_a_newer_environment_file_restarts_the_service(host):
    """An environment file written after gunicorn started (a rotated secret) means a restart."""
    if host.backend.get_hostname() != "djservice-debian11":
        pytest.skip("one run of the playbook covers both hosts")
    pid_before = show(host, "MainPID")["MainPID"]
    host.check_output("touch /srv/acme/current/.env")
    result = run_playbook("converge.yml")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert show(host, "MainPID")["MainPID"] != pid_before
    assert host.service("acme").is_running
    # Nothing stale any more: a second run restarts nothing.
    pid_after = show(host, "MainPID")["MainPID"]
    result = run_playbook("converge.yml")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert show(host, "MainPID")["MainPID"] == pid_after
