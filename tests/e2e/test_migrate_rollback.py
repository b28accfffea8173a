"""migrate.yml and rollback.yml on the shared fleet: every failure path (the happy path under load is
the root Molecule scenario's, molecule/default).

Each test starts and ends with every app host on v1 (the fixture's first release). File order
matters only for speed: the first test pays for the Python 3.11 distribution once.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml
from run_record import stage_seconds  # scripts/, on the path conftest sets

from conftest import APP_HOSTS, E2E, ENV, FLEET, FLEET_UP_ARGS, INVENTORY, LOGS, PYTHON_VERSION, REPO


def assert_back_on_v1(e2e: E2E) -> None:
    """The site serves v1 from every host, all UP in HAProxy, checkouts work, the lock is free."""
    assert set(e2e.serving().values()) == {"v1"}, e2e.serving()
    assert set(e2e.haproxy_states().values()) == {"UP"}, e2e.haproxy_states()
    status, body = e2e.get("/healthz")
    assert status == 200 and json.loads(body)["release"] == "v1", body
    assert e2e.checkout_works()
    assert e2e.lock() is None


def failures(load: object) -> dict[str, int]:
    return dict(getattr(load, "summary", {}).get("failures_by_status", {}))


def column(table: str, name: str) -> str:
    """is_nullable of a column of the fixture's database ('' when it does not exist)."""
    return (
        "SELECT coalesce(max(is_nullable), '') FROM information_schema.columns"
        f" WHERE table_name = '{table}' AND column_name = '{name}'"
    )


def test_maintenance_migrate_failing_its_smoke_check_is_reversed_and_proven_without_users_seeing_v2(e2e: E2E) -> None:
    """Maintenance strategy, forced, with a smoke check only v1 passes: each host fails it on its own
    port before it would be put back (the switch behind the window), the run reverses its migrations
    there, proves the schema and django_migrations equal the backup's, switches back and opens again;
    users see only 503 meanwhile, and every order is kept."""
    v1_only = json.dumps({"project_smoke_checks": [{"path": "/healthz", "contains": '"release": "v1"'}]})
    with e2e.load("migrate-v2-smoke-fails") as load:
        run = e2e.migrate("v2", "-e", "migrate_strategy=maintenance", "-e", v1_only, check=False, log="migrate-v2-smoke-fails")
    record = e2e.run_record()
    print(f"\nmigrate v1->v2 (maintenance, smoke fails): {run.seconds:.0f}s, load {load.summary['total']} requests,"
          f" failures {failures(load)}, maintenance {record.get('maintenance', {}).get('seconds')}s,"
          f" stages {stage_seconds(record)}, validation {record.get('validation')}")  # fmt: skip
    assert run.rc != 0 and "failed at stage switch" in run.output, run.failed_line
    assert re.search(r"failed\s+1\s+of\s+1\s+smoke\s+checks\s+on\s+this\s+host:\s+GET\s+/healthz:\s+body\s+lacks", run.output)
    assert "Undone by reverse" in run.output
    assert record["result"] == "rolled_back" and record["strategy"] == "maintenance"
    assert record["converge"]["mode"] == "reverse"
    validation = record["validation"]
    assert validation["schema_equal"] is True and validation["migrations_equal"] is True, validation
    # Only the maintenance page may answer anything but success: no user reached v2.
    assert set(failures(load)) <= {"503"}, load.summary["failures_by_status"]
    assert load.missing_orders == 0, load.verify_output
    assert_back_on_v1(e2e)
    assert e2e.sql("SELECT max(name) FROM django_migrations WHERE app = 'catalog'") == "0001_initial"

    again = e2e.rollback(log="rollback-again")
    assert "nothing to do" in again.output
    assert_back_on_v1(e2e)


def migrate_v2_with_a_file_changed(
    e2e: E2E, host: str, path: str, change: str, name: str, *args: str
) -> tuple[Any, Any, dict[str, Any]]:
    """migrate.yml to v2 under load with one file of the prepared release changed on one host by the
    shell command `change` (the file's path in $F) for the run, then put back: (run, load, record)."""
    e2e.ssh(host, f"sudo cp -a {path} {path}.orig && F={path} && {change}")
    try:
        with e2e.load(name) as load:
            run = e2e.migrate("v2", *args, check=False, log=name)
    finally:
        e2e.ssh(host, f"sudo mv -f {path}.orig {path}")
    return run, load, e2e.run_record()


def prepare_v2(e2e: E2E) -> None:
    """v2 prepared on every app host (a test that runs alone finds it missing): a plan-only run
    prepares it and changes nothing else."""
    manifest = "/srv/acme/releases/v2/RELEASE.json"
    if any(e2e.ssh(host, f"sudo test -f {manifest}; echo $?") != "0" for host in APP_HOSTS):
        e2e.migrate("v2", "-e", "migrate_plan_only=true", log="prepare-v2")


def snapshot(e2e: E2E) -> dict[str, str]:
    """What a run could change: the files it manages on every host (path, size, mtime, link target;
    the app's own log directory left out), the database's whole dump, HAProxy's server states."""
    files = (
        "sudo find /srv /var/lib/djm /var/backups/postgresql /etc/haproxy /etc/systemd/system /opt"
        " -path /srv/acme/shared/logs -prune -o -printf '%p %s %T@ %l\\n' 2>/dev/null | sort | md5sum"
    )
    taken = {host: e2e.ssh(host, files) for host in ("lb1", *APP_HOSTS, "db1")}
    # The schema, and each table's rows as an order-independent hash (docs/fingerprint.md's query).
    # (pg_dump's \restrict line carries a random key each time: left out.)
    taken["schema"] = e2e.ssh("db1", "cd /tmp && sudo -u postgres pg_dump --schema-only -d acme | grep -Ev '^.(un)?restrict '")
    tables = (
        "SELECT format('SELECT %L, count(*), coalesce(sum(hashtextextended(t::text, 0)::numeric), 0) FROM ONLY %I.%I AS t',"
        " schemaname || '.' || tablename, schemaname, tablename) FROM pg_tables WHERE schemaname = 'public' ORDER BY 1 \\gexec"
    )
    taken["tables"] = e2e.ssh("db1", f"cd /tmp && printf '%s\\n' {shlex.quote(tables)} | sudo -u postgres psql -X -At -d acme")
    taken["haproxy"] = json.dumps(e2e.haproxy_states(), sort_keys=True)
    return taken


def test_check_mode_changes_nothing_and_shows_the_plan(e2e: E2E) -> None:
    """`--check` on migrate.yml and rollback.yml, as an SRE tries a command first: both exit 0, the
    migrate shows the plan and the strategy it would take, and nothing changed on any host."""
    prepare_v2(e2e)  # --check cannot build a release, and the plan runs in the release's interpreter
    before = snapshot(e2e)
    run = e2e.migrate("v2", "--check", check=False, log="migrate-v2-check")
    assert run.rc == 0, run.failed_line
    assert re.search(r"strategy: two_phase", run.output), run.output[-3000:]
    again = e2e.rollback("--check", check=False, log="rollback-check")
    assert again.rc == 0, again.failed_line
    # A release not prepared yet: --check cannot prepare it, so it cannot plan; it says so and changes nothing.
    unprepared = e2e.migrate("v2-bad-health", "--check", check=False, log="migrate-unprepared-check")
    assert unprepared.rc != 0
    assert re.search(r"Release\s+v2-bad-health\s+is\s+not\s+prepared\s+on\s+app1[\s\S]*?a\s+run\s+in\s+check\s+mode\s+does\s+not",
                     unprepared.output), unprepared.failed_line  # fmt: skip
    after = snapshot(e2e)
    changed = {key: "\n".join(difflib.unified_diff(before[key].splitlines(), after[key].splitlines(), lineterm="", n=1))
               for key in before if after.get(key) != before[key]}  # fmt: skip
    assert changed == {}, "\n".join(f"{key}:\n{diff}" for key, diff in changed.items())
    assert_back_on_v1(e2e)


def test_failed_migration_restores_automatically_without_flags(e2e: E2E) -> None:
    """v2-bad-migration commits half its data migration, then fails: restore, serve v1, data equal to the backup.

    Its plan says two_phase (a two-phase run would switch back and keep the half-applied data):
    the maintenance strategy, forced, is the one whose window makes the restore lose nothing.
    """
    run = e2e.migrate("v2-bad-migration", "-e", "migrate_strategy=maintenance", check=False)
    assert run.rc != 0
    record = e2e.run_record()
    assert record["result"] == "rolled_back", record
    assert record["converge"]["mode"] == "restore", record["converge"]
    assert "failed at stage migrate" in run.output
    assert e2e.backup_matches_live(record["backup_id"])
    # The restore ended every session of the workers, which stayed on v1: each was restarted, so none
    # answers its next request with the dead connection (the fixture keeps connections 60 s).
    statuses = [e2e.get("/healthz")[0] for _ in range(40)]
    assert statuses == [200] * 40, statuses
    assert_back_on_v1(e2e)


def test_two_phase_failed_health_gate_switches_back_and_the_next_run_finishes_the_contract(e2e: E2E) -> None:
    """v2 in two_phase with its health check broken on the second host only (the page layout its
    /healthz renders moved away in app2's copy of the release, which prepare keeps): expand, app1
    switches and serves v2, app2's gate fails, every host back on v1 (code), the expanded schema kept
    with its contract pending; migrate.yml to v2 then finishes it."""
    layout = "/srv/acme/releases/v2/acme/templates/acme/base.html"
    prepare_v2(e2e)
    run, load, record = migrate_v2_with_a_file_changed(e2e, "app2", layout, 'sudo rm "$F"', "migrate-v2-bad-health-on-app2")
    print(f"\nmigrate v1->v2 two_phase, gate failing on app2: {run.seconds:.0f}s, load {load.summary['total']} requests,"
          f" failures {failures(load)} (by kind {load.summary['failures_by_kind']}), missing {load.missing_orders};"
          f" stages {stage_seconds(record)}")  # fmt: skip
    assert run.rc != 0 and "failed at stage switch" in run.output
    assert record["strategy"] == "two_phase" and record["result"] == "rolled_back", record
    # app1 went first and passed its gate: a host that served v2 was switched back.
    assert record["failure"]["stage"] == "switch" and record["failure"]["host"] == "app2", record["failure"]
    assert record["converge"]["mode"] == "code"  # the database untouched
    assert record["contract_pending"] is True and len(record["two_phase"]["deferred_pending"]) == 2
    assert "Contract pending" in run.output
    assert load.missing_orders == 0, load.verify_output
    assert not any(status.startswith("5") for status in failures(load)), load.summary["failures_by_status"]
    assert e2e.sql(column("products", "category")) == "YES"  # kept for v1, nullable (interim)
    assert e2e.sql("SELECT count(*) FROM django_migrations WHERE app = 'catalog'") == "5"
    assert_back_on_v1(e2e)

    # A canary that fails where the gate and the smoke checks pass: v2's CMS page template links to a
    # route that does not exist, for a stored page only, in app1's copy (/healthz renders it with a
    # page that is not stored, and the dry-run checkout does not use it: both answer; every CMS page
    # fails). app1 switches first and serves alone for 15 s; its 500s in HAProxy's statistics stop
    # the roll before app2, and app1 goes back (code). migrate_canary_seconds comes from an
    # inventory's group_vars, as an operator sets it (a play's `serial` cannot read the inventory).
    page = "/srv/acme/releases/v2/cms/templates/cms/page.html"
    canary_inventory = LOGS / "canary-inventory"
    (canary_inventory / "group_vars" / "all").mkdir(parents=True, exist_ok=True)
    (canary_inventory / "hosts.yml").write_text("all: {}\n")
    (canary_inventory / "group_vars" / "all" / "canary.yml").write_text("migrate_canary_seconds: 15\n")
    dead_link = "{% if page.pk %}{% url 'djm-no-such-route' %}{% endif %}"
    broken = f'sudo sed -i "s/{{% block content %}}/{{% block content %}}{dead_link}/" "$F"'
    canary = ("-i", str(canary_inventory))
    run, load, record = migrate_v2_with_a_file_changed(e2e, "app1", page, broken, "migrate-v2-canary-fails", *canary)
    print(f"migrate v1->v2 two_phase, canary app1 failing its pages: {run.seconds:.0f}s, {load.summary['total']} requests,"
          f" failures {load.summary['failures_by_kind']}, missing {load.missing_orders};"
          f" stages {stage_seconds(record)}")  # fmt: skip
    assert run.rc != 0 and re.search(r"Canary\s+app1\s+failed:\s+[1-9]\d*\s+errors", run.output), run.failed_line
    assert record["failure"]["stage"] == "switch" and record["failure"]["host"] == "app1", record["failure"]
    assert record["converge"]["mode"] == "code" and record["contract_pending"] is True, record["converge"]
    # Users saw the canary's broken pages, and nothing else.
    assert set(load.summary["failures_by_kind"]) == {"browse"}, load.summary["failures_by_kind"]
    assert set(failures(load)) == {"500"}, failures(load)
    assert load.missing_orders == 0, load.verify_output
    assert_back_on_v1(e2e)

    # Expand now, contract later: v2 switched in with its contract still pending; the schema serves
    # both releases, so rollback.yml goes back by switching alone (code), under load, and fails nothing.
    with e2e.load("migrate-v2-contract-later") as load:
        run = e2e.migrate("v2", "--skip-tags", "contract", log="migrate-v2-contract-later")
    record = e2e.run_record()
    assert record["result"] == "succeeded" and record["contract_pending"] is True, record
    assert set(e2e.serving().values()) == {"v2"}
    assert failures(load) == {} and load.missing_orders == 0, (load.summary["failures_by_status"], load.verify_output)
    with e2e.load("rollback-code") as load:
        run = e2e.rollback(log="rollback-code")
    record = e2e.run_record()
    print(f"rollback code ({len(APP_HOSTS)} app hosts): {run.seconds:.1f}s, load {load.summary['total']} requests,"
          f" failures {failures(load)}, stages {stage_seconds(record)}")  # fmt: skip
    assert record["converge"]["mode"] == "code" and record["contract_pending"] is True, record["converge"]
    assert failures(load) == {} and load.missing_orders == 0, (load.summary["failures_by_status"], load.verify_output)
    assert_back_on_v1(e2e)

    with e2e.load("migrate-v2-finishes-contract") as load:
        run = e2e.migrate("v2", log="migrate-v2-finishes-contract")
    record = e2e.run_record()
    print(f"migrate v1->v2 finishing the contract: {run.seconds:.0f}s, failures {failures(load)}, stages {stage_seconds(record)}")
    assert record["result"] == "succeeded" and record["strategy"] == "two_phase", record.get("strategy_reason")
    assert "finishes the contract run" in record["strategy_reason"]
    assert record["contract_pending"] is False and len(record["two_phase"]["deferred_done"]) == 2
    assert failures(load) == {} and load.missing_orders == 0, (load.summary["failures_by_status"], load.verify_output)
    assert e2e.sql(column("products", "category")) == ""
    assert e2e.sql(column("products", "category_id")) == "NO"

    # Restoring the backup of the run that finished the contract brings back the database it found:
    # expanded, its contract pending. The record and the state file on app1 must say so again, or the
    # next run would find nothing to finish and leave the schema expanded for good.
    run = e2e.rollback(
        "-e", "rollback_mode=restore", "-e", "rollback_accept_data_loss=true", log="rollback-restore-after-finished-contract"
    )  # fmt: skip
    record = e2e.run_record()
    print(f"rollback restore of the run that finished the contract: {run.seconds:.0f}s, stages {stage_seconds(record)}")
    assert record["converge"]["mode"] == "restore", record["converge"]
    assert record["contract_pending"] is True, record.get("two_phase")
    assert len(record["two_phase"]["deferred_pending"]) == 2 and record["two_phase"]["deferred_done"] == [], record["two_phase"]
    assert e2e.sql(column("products", "category")) == "YES"
    assert_back_on_v1(e2e)
    run = e2e.migrate("v2", log="migrate-v2-finishes-contract-again")
    record = e2e.run_record()
    assert "finishes the contract run" in record["strategy_reason"], record.get("strategy_reason")
    assert record["contract_pending"] is False and len(record["two_phase"]["deferred_done"]) == 2, record["two_phase"]
    assert e2e.sql(column("products", "category")) == ""

    # The run owns the migrations of the run it finished: a rollback reverses them to v1's nodes.
    run = e2e.rollback(log="rollback-after-finished-contract")
    record = e2e.run_record()
    assert record["converge"]["mode"] == "reverse", record["converge"]
    assert_back_on_v1(e2e)
    assert e2e.sql("SELECT max(name) FROM django_migrations WHERE app = 'catalog'") == "0001_initial"


def test_unreachable_app_host_stops_the_run_before_any_change(e2e: E2E) -> None:
    migrations_before = e2e.sql("SELECT count(*) FROM django_migrations")
    last_run_before = e2e.run_record().get("run_id")
    subprocess.run(["podman", "stop", "-t", "0", f"{FLEET}-app1"], env=ENV, check=True, capture_output=True)
    try:
        run = e2e.migrate("v2", check=False, log="migrate-app1-down")
    finally:
        subprocess.run(["podman", "start", f"{FLEET}-app1"], env=ENV, check=True, capture_output=True)
        subprocess.run([sys.executable, "scripts/fleet.py", "up", "--name", FLEET, *FLEET_UP_ARGS],
                       cwd=REPO, env=ENV, check=True, capture_output=True)  # fmt: skip
    # Made whole with the fleet's own arguments: its variables are still in the inventory.
    assert yaml.safe_load(INVENTORY.read_text())["all"]["vars"].get("django_service_workers") == "2"
    assert run.rc != 0
    assert "UNREACHABLE" in run.output
    assert "TASK [Take the deploy lock" not in run.output  # stopped in preflight: no task of a later play ran
    assert e2e.run_record().get("run_id") == last_run_before
    assert e2e.sql("SELECT count(*) FROM django_migrations") == migrations_before
    e2e.wait_all_up(90)  # app1 boots, gunicorn starts (enabled), HAProxy's checks see it
    assert_back_on_v1(e2e)


def test_a_database_refusing_the_app_stops_the_run_in_preflight(e2e: E2E) -> None:
    """New connections to the app's database refused (the sessions already open keep serving, so the
    site stays up): the run stops in preflight with one line naming the cause, before the lock."""
    last_run_before = e2e.run_record().get("run_id")
    e2e.ssh("db1", "sudo -u postgres psql -X -At -d postgres -c 'ALTER DATABASE acme ALLOW_CONNECTIONS false'")
    try:
        run = e2e.migrate("v2", check=False, log="migrate-db-refuses")
    finally:
        e2e.ssh("db1", "sudo -u postgres psql -X -At -d postgres -c 'ALTER DATABASE acme ALLOW_CONNECTIONS true'")
        # A worker without an open session answered /healthz 503 meanwhile: HAProxy's checks see it again.
        e2e.wait_all_up(60)
    assert run.rc != 0
    cause = r"The database does not answer the app from app1 (release v1, its own settings): .*not currently accepting"
    assert re.search(re.escape(cause).replace(r"\ ", r"\s+").replace(r"\.\*", r"[\s\S]*?"), run.output), run.failed_line
    assert "TASK [Take the deploy lock" not in run.output
    assert e2e.run_record().get("run_id") == last_run_before and e2e.lock() is None
    assert_back_on_v1(e2e)


def one_line(pattern: str) -> str:
    """A regex for a message the callback may fold over lines: any run of spaces matches any whitespace."""
    return re.escape(pattern).replace(r"\ ", r"\s+")


def test_bad_input_is_refused_in_one_line_and_nothing_served_changes(e2e: E2E, tmp_path: Any) -> None:
    """Each mistake in the command or the inventory: non-zero exit, one line naming it, every host still on v1,
    the database's migrations and the lock as they were. What the inventory shows stops before the lock; what
    only the hosts can tell (a source that is not the Python asked for, a wrong sha256) stops in prepare, on
    the build host, before any host installs anything, and the run is recorded as undone by code."""
    applied = "SELECT string_agg(app || '.' || name, ',' ORDER BY app, name) FROM django_migrations"
    before = e2e.sql(applied)
    misspelt = yaml.safe_load(INVENTORY.read_text())
    misspelt["all"]["children"]["apps"] = misspelt["all"]["children"].pop("app")
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(misspelt))
    cases = [
        ("unknown release", ["v9"], True, "Release v9 has no artefact at"),
        ("missing variable", ["v2", "-e", "project_db_name="], True, "Variable 'project_db_name' is not set for host app1"),
        ("misspelt group", ["v2"], True, "Inventory group 'app' is missing"),
        # The source file is Python 3.11.2's: no build of 3.99.0 can come out of it.
        ("a Python the source cannot build", ["v2", "-e", "project_python_version=3.99.0"], False,
         "holds Python-3.11.2, not Python 3.99.0"),
        ("wrong sha256", ["v2", "-e", "project_python_version=3.11.3", "-e", "python_runtime_source_sha256=" + "0" * 64], False,
         "python_runtime_source_sha256 says " + "0" * 64 + ": fix the file or the checksum"),
    ]  # fmt: skip
    for name, (release, *args), before_lock, cause in cases:
        last_run = e2e.run_record().get("run_id")
        if name == "misspelt group":
            run = e2e.playbook("migrate.yml", "-e", "project_release_id=v2", inventory=tmp_path / "hosts.yml", log="bad-group")
        else:
            run = e2e.migrate(release, *args, check=False, log="bad-" + name.replace(" ", "-"))
        print(f"\nbad input, {name}: exit {run.rc} after {run.seconds:.0f}s: {run.failed_line[:300]}")
        assert run.rc != 0, name
        assert re.search(one_line(cause), run.output), (name, run.failed_line)
        if before_lock:
            assert "TASK [Take the deploy lock" not in run.output and e2e.run_record().get("run_id") == last_run, name
        else:
            record = e2e.run_record()
            assert record["run_id"] != last_run and record["failure"]["stage"] == "prepare", (name, record.get("failure"))
            assert record["result"] == "rolled_back" and record["converge"]["mode"] == "code", (name, record.get("converge"))
            installed = e2e.ssh("app2", "ls /opt/python 2>/dev/null || true")
            assert "3.99.0" not in installed and "3.11.3" not in installed, installed
        assert set(e2e.serving().values()) == {"v1"} and e2e.lock() is None, name
        assert e2e.sql(applied) == before, name
    assert_back_on_v1(e2e)


def test_a_backup_directory_without_room_stops_the_run_before_the_lock(e2e: E2E) -> None:
    """The backup directory on a 1 MiB filesystem (the database is a few MB): the run stops in preflight, one
    line naming the space needed and free, before the lock, the prepare or the window."""
    last_run = e2e.run_record().get("run_id")
    e2e.ssh("db1", "sudo mkdir -p /mnt/djm-small && sudo mount -t tmpfs -o size=1m tmpfs /mnt/djm-small"
                   " && sudo install -d -o postgres -g postgres -m 0700 /mnt/djm-small/backups")  # fmt: skip
    try:
        run = e2e.migrate("v2", "-e", "pg_backup_dir=/mnt/djm-small/backups", check=False, log="migrate-backup-full")
    finally:
        e2e.ssh("db1", "sudo umount /mnt/djm-small")
    print(f"\nbackup directory without room: exit {run.rc} after {run.seconds:.0f}s: {run.failed_line[:300]}")
    assert run.rc != 0
    assert re.search(one_line("pg_backup preflight failed for acme:") + r"[\s\S]*?/mnt/djm-small", run.output), run.failed_line
    assert "TASK [Take the deploy lock" not in run.output and e2e.run_record().get("run_id") == last_run
    assert_back_on_v1(e2e)


def test_the_runtime_failing_to_install_on_one_host_switches_no_host(e2e: E2E) -> None:
    """Python 3.11.2 cannot be put in place on app2 alone (a file where its directory goes); the other
    app hosts prepare v2. The run fails in prepare and no host is switched or migrated."""
    prepare_v2(e2e)  # the runtime in place on every app host, as a run before this one left it
    applied = "SELECT count(*) FROM django_migrations"
    before = e2e.sql(applied)
    runtime = f"/opt/python/{PYTHON_VERSION}"
    e2e.ssh("app2", f"sudo mv {runtime} {runtime}.aside && sudo touch {runtime}")
    try:
        run = e2e.migrate("v2", check=False, log="migrate-runtime-fails-on-app2")
    finally:
        e2e.ssh("app2", f"sudo rm -f {runtime} && sudo mv {runtime}.aside {runtime}")
    record = e2e.run_record()
    print(f"\nruntime failing on app2: exit {run.rc} after {run.seconds:.0f}s, {stage_seconds(record)}: {run.failed_line[:300]}")
    assert run.rc != 0
    assert re.search(one_line("failed at stage prepare on app2"), run.output), run.failed_line
    assert record["failure"]["host"] == "app2" and record["converge"]["mode"] == "code", record.get("converge")
    assert "switch" not in record.get("stages", {}) and e2e.sql(applied) == before
    assert_back_on_v1(e2e)


def test_the_virtualenv_failing_on_its_build_host_stops_every_host_sharing_it(e2e: E2E) -> None:
    """The app hosts share one virtualenv key for v2 (same requirements, Python and path): app1 builds it,
    the others unpack app1's. app1 cannot (a file where its wheelhouse directory goes): the others install
    nothing of their own and say why, the run fails in prepare and no host is switched or migrated."""
    applied = "SELECT count(*) FROM django_migrations"
    before = e2e.sql(applied)
    for host in APP_HOSTS:  # v2 not prepared anywhere: every host needs the virtualenv
        e2e.ssh(host, "sudo rm -rf /srv/acme/releases/v2")
    e2e.ssh("app1", "sudo rm -rf /srv/acme/wheelhouse && sudo touch /srv/acme/wheelhouse")
    try:
        run = e2e.migrate("v2", check=False, log="migrate-venv-fails-on-app1")
    finally:
        e2e.ssh("app1", "sudo rm -f /srv/acme/wheelhouse")
    record = e2e.run_record()
    print(f"\nvirtualenv failing on app1: exit {run.rc} after {run.seconds:.0f}s, {stage_seconds(record)}: {run.failed_line}")
    assert run.rc != 0
    assert record["failure"]["stage"] == "prepare" and record["converge"]["mode"] == "code", record.get("failure")
    assert re.search(one_line("failed at stage prepare on app1: /srv/acme/wheelhouse already exists as a file"), run.output)
    assert len(APP_HOSTS) > 1, APP_HOSTS
    for host in APP_HOSTS[1:]:
        said = "app1 did not build the virtualenv this host shares with it (see its error above)."
        said += f" Nothing was installed on {host}"
        assert re.search(one_line(said), run.output), host
        assert e2e.ssh(host, "sudo test -e /srv/acme/releases/v2/venv; echo $?") == "1", host
    assert "switch" not in record.get("stages", {}) and e2e.sql(applied) == before
    assert_back_on_v1(e2e)


def test_a_second_run_is_refused_and_a_stale_lock_is_reported(e2e: E2E) -> None:
    stale = {"run_id": "20260101T000000Z-dead0", "owner": "someone", "controller": "elsewhere.example",
             "pid": 1, "playbook": "migrate", "target": "v9", "locked_at": "2026-01-01T00:00:00Z"}  # fmt: skip
    # The project's state directory exists once a run has taken the lock; on a new fleet (this test first
    # on its worker) the test makes it as the lock would (0750), then plants the lock of a dead run.
    plant = "sudo install -d -m 0750 /var/lib/djm/acme && sudo tee /var/lib/djm/acme/lock.json >/dev/null"
    e2e.ssh("db1", f"echo {json.dumps(json.dumps(stale))} | {{ {plant}; }}")
    try:
        run = e2e.migrate("v2", check=False, log="migrate-locked")
        assert run.rc != 0
        assert "holds the deploy lock of acme: run 20260101T000000Z-dead0 (migrate to v9) by someone" in run.output
        assert "-e migrate_break_lock=true" in run.output
        assert set(e2e.serving().values()) == {"v1"}
    finally:
        e2e.ssh("db1", "sudo rm -f /var/lib/djm/acme/lock.json")


def run_and_kill(log: str, ready: Callable[[str], bool], *args: str) -> None:
    """Start migrate.yml to v2, SIGKILL the controller (ansible-playbook and its workers) once ready(log text)."""
    argv = ["ansible-playbook", "-i", str(INVENTORY), "migrate.yml", "-e", "project_release_id=v2",
            "-e", f"project_python_version={PYTHON_VERSION}", *args]  # fmt: skip
    LOGS.mkdir(parents=True, exist_ok=True)
    path = LOGS / f"{log}.log"
    with path.open("w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None and not ready(path.read_text()):
            time.sleep(0.5)
        assert proc.poll() is None, f"the run ended before the point where it is killed: {path.read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_controller_killed_mid_switch_is_finished_by_rollback_without_a_failed_request(e2e: E2E) -> None:
    """Two-phase, the contract left for later: the controller dies while the LAST app host is drained for
    its switch, the others serving v2. The run records no failure; rollback.yml goes back by switching
    alone (code), one host at a time, under load. The drained host must go back first: taking a serving
    host out first leaves a fleet of two app hosts with no server ready."""
    last, drain = APP_HOSTS[-1], "Drain the host in HAProxy before switching it to v2"

    def last_host_drained(log: str) -> bool:
        return log.count(drain) >= len(APP_HOSTS) and e2e.haproxy_states().get(last) == "DRAIN"

    try:
        run_and_kill("migrate-killed-mid-switch", last_host_drained, "--skip-tags", "contract")
        record = e2e.run_record()
        assert "result" not in record and record["stage"] == "switch", record.get("stage")
        assert e2e.lock() is not None
        assert e2e.haproxy_states()[last] == "DRAIN" and e2e.serving()[APP_HOSTS[0]] == "v2"

        refused = e2e.migrate("v2", check=False, log="migrate-after-kill")
        assert refused.rc != 0 and "rollback.yml" in refused.output

        with e2e.load("rollback-after-kill") as load:
            rollback = e2e.rollback(log="rollback-after-kill")
        record = e2e.run_record()
        print(f"\nrollback after a kill mid-switch of {last}: {rollback.seconds:.0f}s, load {load.summary['total']} requests,"
              f" failures {failures(load)}, missing {load.missing_orders}")  # fmt: skip
        assert record["result"] == "rolled_back" and record["converge"]["mode"] == "code", record.get("converge")
        assert failures(load) == {} and load.missing_orders == 0, (load.summary["failures_by_status"], load.verify_output)
        assert_back_on_v1(e2e)
    finally:
        # The next test on this fleet starts from v1 with no contract pending: finish it, then go back.
        if e2e.lock() is not None:
            e2e.rollback(check=False, log="killed-mid-switch-cleanup-rollback")
        if e2e.run_record().get("contract_pending"):
            e2e.migrate("v2", log="killed-mid-switch-cleanup-contract")
            e2e.rollback(log="killed-mid-switch-cleanup-back")


def test_controller_killed_mid_migration_leaves_nothing_running_that_could_apply_it_later(e2e: E2E) -> None:
    """The controller dies while manage.py migrate (forced rolling, no lock_timeout) waits behind a long
    transaction on products. The migration goes on without it on app1 and its session on db1 waits in
    the lock queue, blocking every query on products behind it. rollback.yml must stop that process and
    its session before it decides anything: else the migration applies under v1 once the lock is free."""
    applied = "SELECT string_agg(app || '.' || name, ',' ORDER BY app, name) FROM django_migrations"
    before = e2e.sql(applied)
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = 'acme' AND wait_event_type = 'Lock'"
    with e2e.products_held():
        run_and_kill("migrate-killed-migrating", lambda _: e2e.sql(waiting) != "0", "-e", "migrate_strategy=rolling")
        time.sleep(3)
        assert e2e.sql(waiting) != "0", "the killed run's migration no longer waits: nothing was left running"
        rollback = e2e.rollback(log="rollback-after-killed-migration")
    said = " ".join(rollback.output.split())
    print(f"\nrollback after a kill mid-migration: {rollback.seconds:.0f}s")
    assert "left running" in said, said[-3000:]
    time.sleep(5)  # what a surviving migration would need to apply once the lock is free
    assert e2e.sql(applied) == before
    assert "manage.py migrate" not in e2e.ssh("app1", "ps -eo args")
    assert e2e.run_record()["result"] == "rolled_back"
    assert_back_on_v1(e2e)


def scratch_databases(e2e: E2E) -> list[str]:
    """The restore's scratch databases (acme__restore_<time>) on db1."""
    query = "SELECT datname FROM pg_database WHERE datname LIKE 'acme\\_\\_restore\\_%'"
    return e2e.ssh("db1", f'sudo -u postgres psql -X -At -c "{query}"').split()


def test_rollback_modes_refuse_what_would_break_or_lose_and_restore_keeps_the_replaced_database(e2e: E2E) -> None:
    e2e.migrate("v2", log="migrate-v2-for-modes")
    # code: v2 dropped products.category, which v1 reads.
    code = e2e.rollback("-e", "rollback_mode=code", check=False, log="rollback-code")
    assert code.rc != 0 and "break the code of v1" in code.output, code.output[-3000:]
    assert set(e2e.serving().values()) == {"v2"} and e2e.lock() is None

    # restore from the run's backup damaged since it was taken (one byte of its largest data file): refused
    # before the window opens; the site goes on serving v2 and the live database is untouched.
    data = e2e.ssh("db1", f"sudo sh -c 'ls -S /var/backups/postgresql/{e2e.run_record()['backup_id']}/dump/*.dat.gz | head -1'")
    e2e.ssh("db1", f"sudo cp -a {data} /tmp/djm-intact.dat.gz && printf X | sudo dd of={data} bs=1 seek=99 conv=notrunc")
    live = snapshot(e2e)
    try:
        corrupt = e2e.rollback("-e", "rollback_mode=restore", "-e", "rollback_accept_data_loss=true", check=False, log="corrupt")
    finally:
        e2e.ssh("db1", f"sudo cp -a /tmp/djm-intact.dat.gz {data} && sudo rm -f /tmp/djm-intact.dat.gz")
    print(f"\nrestore from a corrupt backup: exit {corrupt.rc} after {corrupt.seconds:.0f}s: {corrupt.failed_line[:300]}")
    refused = one_line("did not complete: check on db1: pg_restore refused")
    assert corrupt.rc != 0 and re.search(refused, corrupt.output), corrupt.failed_line
    assert re.search(r"corrupt\s+or\s+incomplete[\s\S]*?The\s+site\s+is\s+serving", corrupt.output), corrupt.failed_line
    after = snapshot(e2e)
    assert (after["schema"], after["tables"], after["haproxy"]) == (live["schema"], live["tables"], live["haproxy"])
    assert set(e2e.serving().values()) == {"v2"} and e2e.get("/healthz")[0] == 200 and e2e.lock() is None

    # restore: users wrote since the backup (checkouts on v2): refused, the site left in maintenance,
    # nothing discarded.
    with e2e.load("rollback-restore-refused") as load:
        refused = e2e.rollback("-e", "rollback_mode=restore", check=False, log="rollback-restore-refused")
    assert refused.rc != 0 and "nothing was discarded" in refused.output, refused.output[-3000:]
    assert e2e.get("/smoke/profile/1")[0] == 503  # the maintenance page, not the app
    assert load.missing_orders == 0, load.verify_output
    acknowledged = [json.loads(line)["order_id"] for line in load.out.read_text().splitlines() if '"order_id": ' in line]
    acknowledged = [order for order in acknowledged if order is not None]
    assert acknowledged, "the load placed no order before the window"
    # The backup was restored beside the live database before the window; refused in the window, that copy is
    # dropped (a database the size of the live one is not left behind).
    assert scratch_databases(e2e) == [], "the refused restore left its restored database"

    # What a restore cut during its swap leaves (controller killed): the live database closed to
    # connections and a scratch copy. rollback.yml repairs both before it restores.
    e2e.ssh("db1", "sudo -u postgres psql -X -q -c 'ALTER DATABASE acme WITH ALLOW_CONNECTIONS false'"
                   " -c 'CREATE DATABASE \"acme__restore_20260101T000000Z\"'")  # fmt: skip

    # restore, discarding those writes on purpose: they stay in the replaced database. Under the same
    # traffic: the window is still open, so users see only the maintenance page until it closes on v1.
    with e2e.load("rollback-restore", preflight=False) as during:
        accepted = e2e.rollback("-e", "rollback_mode=restore", "-e", "rollback_accept_data_loss=true", log="rollback-restore")
    said = " ".join(accepted.output.split())  # the callback folds long messages over lines
    assert "re-allowed connections to acme" in said and "dropped acme__restore_20260101T000000Z" in said, said[-3000:]
    # Undoing a migrate that had finished: the backup is restored (and proven) while the site serves, before the
    # window opens; inside it only the live comparison and the swap.
    restored_at = accepted.output.find("TASK [Restore the backup into a new database while the site serves")
    window_at = accepted.output.find("TASK [Answer 503 with the maintenance page")
    assert 0 <= restored_at < window_at, (restored_at, window_at)
    before_window = accepted.output[restored_at:window_at].split("TASK [")
    restore_task = [t for t in before_window if t.startswith("pg_restore : Restore the backup into a new database and require")]
    assert restore_task and "changed: [db1]" in restore_task[0], before_window
    assert scratch_databases(e2e) == []
    record = e2e.run_record()
    failed_db = record["restored"]["failed_db"]
    print(f"\nrollback restore: {accepted.seconds:.0f}s, maintenance {record['maintenance'].get('seconds')}s,"
          f" {len(acknowledged)} orders kept in {failed_db}; during it {during.summary.get('total')} requests,"
          f" failures {failures(during)}")  # fmt: skip
    assert record["converge"]["mode"] == "restore" and failed_db
    assert set(failures(during)) <= {"503"} and during.missing_orders == 0, (failures(during), during.verify_output)
    kept = e2e.ssh("db1", f"sudo -u postgres psql -X -At -d {failed_db} -c "
                          f"'SELECT count(*) FROM orders WHERE id IN ({','.join(map(str, acknowledged))})'")  # fmt: skip
    assert int(kept) == len(acknowledged)
    assert e2e.backup_matches_live(record["backup_id"])
    assert_back_on_v1(e2e)


def test_a_lock_held_on_products_trips_the_lock_timeout_and_the_run_goes_back_without_blocking_the_site(e2e: E2E) -> None:
    """A long transaction holds products: expand's ALTER TABLE waits lock_timeout (2 s here), retries,
    then the run fails cleanly and switches back; the site is never blocked longer than the timeout
    (a request blocked longer would time out in the load generator, whose limit is 5 s)."""
    with e2e.products_held():
        time.sleep(2)
        with e2e.load("migrate-v2-lock-timeout") as load:
            run = e2e.migrate("v2", "-e", "django_release_two_phase_lock_timeout=2s", "-e", "django_release_two_phase_retries=2",
                              check=False, log="migrate-v2-lock-timeout")  # fmt: skip
    record = e2e.run_record()
    checkout = load.summary["by_kind"].get("checkout", {}).get("latency_ms", {})
    print(f"\nmigrate v2 with products locked: {run.seconds:.0f}s, failures {failures(load)}, checkout latency ms {checkout},"
          f" two_phase {record.get('two_phase', {}).get('migrations')}")  # fmt: skip
    assert run.rc != 0 and "failed at stage migrate" in run.output, run.failed_line
    cause = [line for line in run.output.splitlines() if "failed at stage migrate" in line][-1]
    assert "lock not available within 2000ms after 3 attempt(s)" in cause and "Undone by code" in cause, cause
    assert record["result"] == "rolled_back" and record["converge"]["mode"] == "code", record.get("converge")
    assert failures(load) == {} and load.missing_orders == 0, (load.summary["failures_by_status"], load.verify_output)
    assert_back_on_v1(e2e)
    assert e2e.sql("SELECT max(name) FROM django_migrations WHERE app = 'catalog'") == "0001_initial"


def test_forced_rolling_run_failing_half_way_exports_users_writes_then_restores(e2e: E2E) -> None:
    """v2-bad-migration forced rolling under load: no window before the backup, so users' orders land in the
    database while the non-atomic data migration rewrites half of the payments and fails. The undo opens the
    window at once, exports every row written since the backup into the run's directory, restores, serves v1;
    every acknowledged order is in the restored database or in the export, and the export re-applies."""
    with e2e.load("rolling-bad-migration", max_seconds=1800) as load:
        run = e2e.migrate("v2-bad-migration", "-e", "migrate_strategy=rolling", check=False, log="migrate-rolling-bad")
    record = e2e.run_record()
    export = record.get("restored", {}).get("export") or {}
    print(f"\nforced rolling v2-bad-migration: {run.seconds:.0f}s, load {load.summary.get('total')} requests,"
          f" {load.summary.get('orders_acknowledged')} orders, failures {failures(load)},"
          f" maintenance {record.get('maintenance', {}).get('seconds')}s; export {export.get('rows')} rows"
          f" {json.dumps(export.get('tables'))}; missing after restore {load.missing_orders}")  # fmt: skip
    assert run.rc != 0
    assert record["strategy"] == "rolling" and record["result"] == "rolled_back", record.get("converge")
    # catalog.0003 (atomic) locks products EXCLUSIVE, so it no longer loses a deadlock to a checkout
    # and rolls back whole (the case where the rule reversed); the non-atomic migration after it fails
    # half-way, so the run must restore, and export the users' writes first.
    assert record["converge"]["mode"] == "restore", record["converge"]
    run_dir = f"/var/lib/djm/acme/runs/{record['run_id']}/export"
    assert export["dir"] == run_dir and export["rows"] > 0, export
    # one line: the cause, the undo, and where the users' writes are
    cause = [line for line in run.output.splitlines() if "failed at stage migrate" in line]
    assert cause and run_dir in cause[-1] and "exported" in cause[-1], cause
    assert_back_on_v1(e2e)

    manifest = json.loads(e2e.ssh("db1", f"sudo cat {run_dir}/export.json"))
    assert e2e.ssh("db1", f"sudo stat -c '%U:%G %a' {run_dir} {run_dir}/apply.sql").split("\n") == [
        "root:postgres 750",
        "root:postgres 640",
    ]
    assert "public.django_migrations" in manifest["skipped"]
    # Every acknowledged order is in the restored database or in the export.
    missing = json.loads(load.verify_output.splitlines()[0])["missing"] if load.missing_orders > 0 else []
    exported: set[int] = set()
    if missing:
        orders = manifest["tables"]["public.orders"]
        rows_csv = e2e.ssh("db1", f"sudo cat {run_dir}/{orders['files']['rows']}")
        exported = {int(row["id"]) for row in csv.DictReader(io.StringIO(rows_csv))}
    assert set(missing) <= exported, sorted(set(missing) - exported)

    # The export re-applies onto the restored database (orders placed since the restore keep their ids:
    # the sequences were moved past the exported ones), after which no acknowledged order is missing.
    psql = f"cd / && runuser -u postgres -- psql -X -q -d acme < {run_dir}/apply.sql"
    applied = e2e.ssh("db1", f"sudo sh -c '{psql}' 2>&1; echo rc=$?")
    assert applied.endswith("rc=0"), applied
    verify = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "loadgen.py"), "verify", str(load.out), "--json",
         "--min-orders", "0", "--psql-cmd", e2e.psql_cmd()],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    print(f"after apply.sql: {verify.stdout.strip()[:300]}")
    assert verify.returncode == 0 and json.loads(verify.stdout)["missing"] == [], verify.stdout + verify.stderr
    assert_back_on_v1(e2e)
