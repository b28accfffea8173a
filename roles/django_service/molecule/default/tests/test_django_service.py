"""Checks of the django_service scenario: fixture v1 and a plain WSGI app under gunicorn, hardened, health-gated.

The gate's failures are exercised by side_effect.yml (each asserted there).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
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
    props = show(
        host,
        "NoNewPrivileges",
        "ProtectSystem",
        "PrivateTmp",
        "ProtectHome",
        "PrivateDevices",
        "CapabilityBoundingSet",
        "ReadWritePaths",
    )
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


def test_nginx_serves_the_static_files_of_current_then_of_every_prepared_release(host):
    def get(path: str) -> tuple[str, str]:
        out = host.check_output(f"curl -s --path-as-is -D - -o /root/static-body -w '%{{http_code}}' http://127.0.0.1:8081{path}")
        return out[-3:], out

    css = "admin/css/base.css"  # collected from Django's admin into the release's static/
    status, headers = get(f"/static/{css}")
    assert status == "200", headers
    assert "cache-control: public, max-age=3600" in headers.lower()
    assert host.check_output("md5sum < /root/static-body") == host.check_output(f"md5sum < /srv/acme/current/static/{css}")
    # The union holds what prepare added (this release's files) ...
    assert host.file(f"/srv/acme/shared/static/{css}").exists
    # ... and a file of another release that current does not have is served from there.
    host.check_output("install -D -m 0644 /dev/null /srv/acme/shared/static/older/only-in-an-older-release.css")
    host.check_output("echo 'p{}' > /srv/acme/shared/static/older/only-in-an-older-release.css")
    status, headers = get("/static/older/only-in-an-older-release.css")
    assert status == "200" and host.file("/root/static-body").content_string == "p{}\n", headers
    # Nothing else: a missing file, a path outside the prefix, a way out of the directories.
    for path in ("/static/no/such.css", "/healthz", "/static/../../../etc/passwd", "/srv/acme/current/.env"):
        assert get(path)[0] in ("404", "400"), path
    assert get("/.djm-static-health")[0] == "200"


def test_plain_app_has_no_health_endpoint_and_redirects_its_root(host):
    """The plain app passed the default gate with a 301 on `/` and no JSON anywhere."""
    assert host.service("plain").is_running
    out = host.check_output("curl -s -o /dev/null -w '%{http_code} %{redirect_url}' -H 'Host: localhost' http://127.0.0.1:8001/")
    assert out == "301 https://localhost/"
    assert host.check_output("curl -s -H 'Host: localhost' http://127.0.0.1:8001/healthz") == "plain release r1"
    # Without the Host the gate sends (localhost), the app refuses: why the gate sends one.
    assert host.check_output("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8001/") == "400"


def check_serving_process(host, *args: str) -> dict:
    """The role's host-side check, run the way the role runs it (python3 -c <file>)."""
    script = (Path(__file__).parents[3] / "files" / "check_serving_process.py").read_text()
    out = host.check_output(" ".join(shlex.quote(arg) for arg in ["python3", "-c", script, *args]))
    return json.loads(out)


@pytest.mark.parametrize(
    ("unit", "root", "port", "release"),
    [
        ("acme.service", "/srv/acme", "8000", "v1"),
        ("plain.service", "/srv/plain", "8001", "r1"),
    ],
)
def test_the_host_check_finds_the_serving_process(host, unit, root, port, release):
    report = check_serving_process(
        host, f"--unit={unit}", f"--current={root}/current", f"--port={port}", f"--expected-release={release}"
    )
    assert report["problems"] == []
    assert str(report["main_pid"]) == host.check_output(f"systemctl show -p MainPID --value {unit}")
    assert report["cwd"] == f"{root}/releases/{release}"
    assert report["release"] == release
    assert report["listening_ours"]


def test_the_host_check_names_what_is_wrong(host):
    report = check_serving_process(
        host,
        "--unit=acme.service",
        "--current=/srv/plain/current",
        "--port=8001",
        "--expected-release=v2",
        f"--started-after={time.time() + 3600}",
    )
    pid = report["main_pid"]
    plain = int(host.check_output("systemctl show -p MainPID --value plain.service"))
    holders = [f"{p} (gunicorn)" for p in sorted([plain, *map(int, host.check_output(f"pgrep -P {plain}").split())])]
    assert report["problems"] == [
        f"main process {pid} runs from /srv/acme/releases/v1, current is /srv/plain/releases/r1",
        f"main process {pid} runs release 'v1' (/srv/acme/releases/v1), expected 'v2'",
        f"main process {pid} started at {report['started']}, before django_service_started_after at {report['reference']}",
        f"port 8001 is not listened on by main process {pid} of acme.service or its children",
        f"port 8001 is also listened on by process {', '.join(holders)}, outside acme.service",
    ]


def run_playbook(name: str) -> subprocess.CompletedProcess[str]:
    scenario = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
    return subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(scenario / name)],
        capture_output=True,
        text=True,
        check=False,
        env=os.environ.copy(),
    )


def test_a_newer_environment_file_restarts_the_service(host):
    """An environment file written after gunicorn started (a rotated secret) means a restart."""
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
