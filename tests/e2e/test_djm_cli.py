"""The djm command on the shared fleet, read-only and cheap (well under a minute): `djm status`,
`djm backups list` and `djm plan` (--check) as an operator types them, with the exit code, what they
print, the report and the event log they leave, and nothing served changed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import E2E, ENV, INVENTORY, LOGS, REPO


def djm(*args: str, timeout: float = 600) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "djm.py"), *args, "-i", str(INVENTORY)],
        cwd="/",  # an operator's shell anywhere: the inventory path is resolved from there, the playbooks from the checkout
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / f"djm-{args[0]}-{int(time.time())}.log").write_text(proc.stdout)
    return proc.returncode, proc.stdout, time.monotonic() - started


def test_djm_status_backups_and_plan_change_nothing(e2e: E2E) -> None:
    serving = e2e.serving()
    assert set(serving.values()) == {"v1"}

    rc, out, seconds = djm("status")
    assert rc == 0, out
    for host in serving:
        assert f"{host}      v1" in out, out
    assert "lock      free" in out and "last run  " in out and "backup    " in out, out
    print(f"djm status: {seconds:.0f}s")

    rc, out, seconds = djm("backups", "list")
    assert rc == 0, out
    assert out.startswith("backup ") or "state" in out.splitlines()[0], out
    print(f"djm backups list: {seconds:.0f}s")

    rc, out, seconds = djm("plan", "v2", "-e", "project_python_version=3.11.2")
    print(f"djm plan v2: {seconds:.0f}s, exit {rc}")
    # v2 prepared by an earlier run on this fleet: the plan (exit 0); not yet: refused with the way out (exit 3).
    assert rc in (0, 3), out
    assert "▸ preflight" in out and "▸ plan" in out, out
    if rc == 0:
        assert "strategy  two_phase" in out and "catalog.0004_remove_product_category_string" in out, out
    else:
        assert "is not prepared" in out and "--prepare" in out, out
    report_path = next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("json "))
    report = json.loads(Path(report_path).read_text())
    assert report["exit_code"] == rc and report["command"] == "plan" and report["arguments"]["check"] is True
    assert Path(report["paths"]["html"]).is_file() and Path(report["paths"]["events"]).is_file()
    events = [json.loads(line) for line in Path(report["paths"]["events"]).read_text().splitlines()]
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    assert not any(value in Path(report["paths"]["events"]).read_text() for value in e2e.secrets.values())

    # --check: nothing served changed, no lock left, no run recorded as the last one.
    assert e2e.serving() == serving and e2e.lock() is None
    assert set(e2e.haproxy_states().values()) == {"UP"}
