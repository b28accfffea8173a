"""The root scenario's proof: every host of the fleet (testinfra over `podman exec`) and the load results.

After converge (migrate.yml to v2 under load), idempotence (the same again: unchanged) and side_effect
(rollback.yml under load), the fleet must be back on v1 with both releases prepared, every server UP
behind a closed maintenance window, the backup the run took verified and kept, the run records telling
what happened, the database proven against that backup, and the load without a failed request or a
lost order. The fixture's project is `acme` (inventories/local/group_vars/all/project.yml).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
LOGS = REPO / "build" / "molecule-root"
STATE = "/var/lib/djm/acme"
PYTHON = "3.11.2"
FLEET = os.environ.get("DJM_MOLECULE_FLEET") or "djmmol"


def role(host: Any) -> str:
    """lb, app or db, from the container's name (<fleet>-lb1, <fleet>-app2, ...)."""
    return host.backend.get_hostname().rsplit("-", 1)[1].rstrip("0123456789")


def only(host: Any, wanted: str) -> None:
    if role(host) != wanted:
        pytest.skip(f"a check of the {wanted} hosts")


def history(host: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in host.file(f"{STATE}/history.jsonl").content_string.splitlines() if line.strip()]


def servers(host: Any, backend: str) -> dict[str, str]:
    """The status of each server of an HAProxy backend on this load balancer (`show stat`)."""
    stat = host.check_output("echo 'show stat' | socat -t 5 stdio unix-connect:/run/haproxy/admin.sock")
    rows = (line.split(",") for line in stat.splitlines())
    return {fields[1]: fields[17] for fields in rows if fields[0] == backend and fields[1] not in ("BACKEND", "FRONTEND")}


def loads(name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(summary, order lookup) of each run of `name`, oldest first."""
    runs = []
    for summary in sorted(LOGS.glob(f"load-*-{name}.json")):
        verify = LOGS / summary.name.replace("load-", "verify-", 1)
        runs.append((json.loads(summary.read_text()), json.loads(verify.read_text())))
    return runs


def test_app_hosts_serve_v1_again_with_v2_and_its_python_prepared(host: Any) -> None:
    only(host, "app")
    assert host.file("/srv/acme/current").linked_to == "/srv/acme/releases/v1"
    service = host.service("acme")
    assert service.is_running and service.is_enabled
    # The process answering on the host is v1's (podman exec lacks the capability to read /proc/<pid>/cwd).
    health = json.loads(host.check_output("curl -sS -H 'Host: localhost' http://127.0.0.1:8000/healthz"))
    assert health["release"] == "v1" and health["status"] == "ok", health
    # v2 stays prepared beside v1, on the CPython the run installed beside the system python3.
    version = "import platform; print(platform.python_version())"
    assert host.check_output(f"/opt/python/{PYTHON}/bin/python3.11 -c '{version}'") == PYTHON
    assert host.check_output("/srv/acme/releases/v2/venv/bin/python -c 'import sys; print(sys.version.split()[0])'") == PYTHON
    assert host.check_output("/srv/acme/releases/v1/venv/bin/python -c 'import sys; print(sys.version_info[:2])'") == "(3, 9)"


def hosts_by_status(log: str, task: str) -> dict[str, list[str]]:
    """{status: [host, ...]} of one task in an ansible-playbook output (the default callback)."""
    found: dict[str, list[str]] = {}
    for block in log.split("\nTASK [")[1:]:
        if block.startswith(task):
            for status, host in re.findall(r"^(ok|changed|skipping|failed|fatal): \[([^\]]+)\]", block, re.M):
                found.setdefault(status, []).append(host)
    return found


def test_the_v2_virtualenv_was_built_on_one_app_host_and_unpacked_on_the_others() -> None:
    """pip installs and byte-compiles once: the other app hosts unpack the first one's virtualenv."""
    log = sorted(LOGS.glob("*-migrate-v2.log"))[0].read_text()
    pip = hosts_by_status(log, "django_release : Install the requirements from the wheelhouse, offline")
    unpacked = hosts_by_status(log, "django_release : Unpack the virtualenv beside the release's venv")
    assert pip.get("changed") == ["app1"], pip
    assert sorted(unpacked.get("changed", [])) == ["app2", "app3"], unpacked


def test_load_balancer_has_every_app_host_up_and_the_window_closed(host: Any) -> None:
    only(host, "lb")
    assert host.service("haproxy").is_running
    assert servers(host, "acme_app") == {"app1": "UP", "app2": "UP", "app3": "UP"}
    assert host.file("/etc/haproxy/acme-maintenance.map").content_string.split() == ["state", "off"]


def test_static_files_are_served_through_the_load_balancer_from_either_release(host: Any) -> None:
    """Django serves no static file with DEBUG off: nginx on each app host does, behind HAProxy.
    After the rollback the hosts run v1 (Django 3.2); v2 (Django 4.2) was prepared, so a file only
    4.2's admin has is still served, from the union of prepared releases: a v2 page that a v1 host's
    nginx is asked for during a roll finds its files."""
    only(host, "lb")
    assert servers(host, "acme_static") == {"app1": "UP", "app2": "UP", "app3": "UP"}

    def get(path: str) -> tuple[str, str]:
        body, _, status = host.check_output(f"curl -sS -w '\\n%{{http_code}}' http://127.0.0.1{path}").rpartition("\n")
        return status, body

    status, body = get("/static/admin/css/base.css")
    assert status == "200" and "DJANGO Admin styles" in body, (status, body[:200])
    assert get("/static/admin/js/theme.js")[0] == "200"  # Django 4.2's admin only
    assert get("/static/admin/js/no-such-file.js")[0] == "404"


def test_db_keeps_the_verified_backup_of_the_run_and_its_history(host: Any) -> None:
    only(host, "db")
    results = [(r["playbook"], r["result"]) for r in history(host)]
    # migrate (two_phase, no 503), migrate again (nothing to do), then that first run undone.
    assert results == [("migrate", "succeeded"), ("migrate", "unchanged"), ("migrate", "rolled_back")], results
    migrate, unchanged, undone = history(host)
    # v2 drops products.category and makes category_id NOT NULL: two_phase, both deferred to contract.
    assert migrate["strategy"] == "two_phase" and migrate["contract_pending"] is False, migrate.get("strategy_reason")
    two_phase = migrate["two_phase"]
    assert len(two_phase["deferred_done"]) == 2 and two_phase["deferred_pending"] == []
    assert two_phase["contract"]["status"] == "done" and "verify" in migrate["stages"]
    assert {m["migration"] for m in two_phase["migrations"]} == set(migrate["applied"])
    assert unchanged["previous_run"] == migrate["run_id"] and "backup_id" not in unchanged
    assert undone["run_id"] == migrate["run_id"] and undone["converge"]["mode"] == "reverse"
    validation = undone["validation"]
    assert validation["schema_equal"] is True and validation["migrations_equal"] is True, validation
    assert not host.file(f"{STATE}/lock.json").exists
    # Reversed: v1's schema again, the orders placed meanwhile kept (listed as changed since the backup).
    assert any(t.startswith("public.orders ") for t in validation["tables_changed"]), validation
    psql = "sudo -u postgres psql -X -At -d acme -c"
    assert host.check_output(f"{psql} \"SELECT max(name) FROM django_migrations WHERE app = 'catalog'\"") == "0001_initial"
    category = "SELECT count(*) FROM information_schema.columns WHERE table_name = 'products' AND column_name = 'category'"
    assert host.check_output(f'{psql} "{category}"') == "1"
    assert host.file(f"{STATE}/last-run").content_string.strip() == migrate["run_id"]

    backups = json.loads(host.check_output(
        "/opt/pg-tools/venv/bin/python /opt/pg-tools/venv/bin/pg_backup_store.py list --backup-dir /var/backups/postgresql"
    ))  # fmt: skip
    states = {b["id"]: b["state"] for b in backups["backups"]}
    assert states.get(migrate["backup_id"]) == "verified", states
    backup_dir = host.file(f"/var/backups/postgresql/{migrate['backup_id']}")
    assert backup_dir.is_directory and backup_dir.user == "postgres" and backup_dir.mode & 0o077 == 0
    assert host.file(f"/var/backups/postgresql/{migrate['backup_id']}/manifest.json").mode & 0o077 == 0


def test_the_controller_keeps_a_copy_of_the_history(host: Any) -> None:
    only(host, "db")
    lines = (REPO / "build" / "deploys" / "acme" / "history.jsonl").read_text().splitlines()
    copy = [json.loads(line) for line in lines if line.strip()]
    assert copy[-3:] == history(host), (copy[-3:], history(host))


def test_the_migrate_failed_no_request_and_lost_no_order() -> None:
    runs = loads("migrate-v2")
    assert len(runs) == 2  # converge, then idempotence
    for summary, verify in runs:
        assert summary["failed"] == 0 and summary["total"] > 0, summary["failures_by_status"]
        assert verify["missing"] == [], verify
    assert runs[0][0]["orders_acknowledged"] > 0
    # The canary (migrate_canary_seconds=10) answered alone, through HAProxy, without an error.
    first_log = sorted(LOGS.glob("*-migrate-v2.log"))[0].read_text()
    canary = re.search(r"Canary\s+app1:\s+(\d+)\s+errors\s+in\s+(\d+)\s+responses\s+in\s+10\s+s", first_log)
    assert canary and canary.group(1) == "0" and int(canary.group(2)) > 0, canary


def test_the_rollback_answered_only_the_maintenance_page_and_lost_no_order() -> None:
    ((summary, verify),) = loads("rollback")
    assert set(summary["failures_by_status"]) <= {"503"}, summary["failures_by_status"]
    assert verify["missing"] == [], verify


# ---------------------------------------------------------------- secrets
# The database password and the secret key of this fleet (its stand-in for a vault file), looked for
# in everything the runs left: the commands' whole output at -vvv, the process lists sampled on every
# host twice a second during them, each host's journal, and the run records and history on the hosts.


def secrets() -> dict[str, str]:
    return json.loads((REPO / ".fleet" / FLEET / "secrets.json").read_text())


def leaks(text: str, where: str) -> list[str]:
    return [f"{name} in {where}" for name, value in secrets().items() if len(value) >= 8 and value in text]


def test_the_secret_scan_finds_a_secret_where_there_is_one() -> None:
    assert len(secrets()) == 2
    for name, value in secrets().items():
        assert leaks(f"PGPASSWORD={value} psql", "a planted line") == [f"{name} in a planted line"]


def test_no_secret_in_the_commands_output_or_in_any_process_list_during_them() -> None:
    logs = sorted(LOGS.glob("*-migrate-v2.log")) + sorted(LOGS.glob("*-rollback.log"))
    samples = sorted(LOGS.glob("ps-*.txt"))
    events = sorted((LOGS / "events").rglob("*.jsonl"))  # the event log of each command
    assert len(logs) == 3 and all("ESTABLISH SSH CONNECTION" in log.read_text() for log in logs)  # -vvv
    assert len(events) >= 3 and all('"stage"' in path.read_text() for path in events), events  # and the deploy
    assert len(samples) == 3 * 5 and all(sample.read_text().count("\n---\n") >= 10 for sample in samples)
    assert sum("BECOME-SUCCESS" in sample.read_text() for sample in samples) >= 10  # it saw the modules at work
    hits = [hit for path in logs + samples + events for hit in leaks(path.read_text(errors="replace"), path.name)]
    assert hits == []


def test_no_secret_in_the_journal_or_the_run_records(host: Any) -> None:
    journal = host.run("journalctl --no-pager --output=cat")
    assert journal.rc == 0 and len(journal.stdout) > 1000
    records = host.run("find /var/lib/djm -type f \\( -name '*.json' -o -name '*.jsonl' \\) -exec cat {} + 2>/dev/null").stdout
    hits = leaks(journal.stdout, f"{role(host)}'s journal") + leaks(records, f"{role(host)}'s run records")
    assert hits == []
