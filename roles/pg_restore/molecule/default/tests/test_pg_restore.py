"""What the pg_restore scenario left: the restored live database, the kept failed one, the refusals' traces."""

from __future__ import annotations

import json
from typing import Any

BACKUP = "/var/backups/postgresql/before-release"
DB = "molecule_app"
VENV = "/opt/pg-tools/venv/bin"


def psql(host: Any, query: str, db: str = "postgres") -> str:
    result = host.run("runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -d %s -c %s", db, query)
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def reports(host: Any, stage: str) -> list[dict[str, Any]]:
    names = host.check_output(f"find {BACKUP} -maxdepth 1 -name 'restore-report-*-{stage}.json' | sort").splitlines()
    return [json.loads(host.file(name).content_string) for name in names]


def test_live_database_equals_the_backup(host: Any) -> None:
    result = host.run(
        f"runuser -u postgres -- {VENV}/python {VENV}/db_fingerprint.py compare {BACKUP}/manifest.json dsn:dbname={DB}"
    )
    assert result.rc == 0, result.stdout + result.stderr
    assert (
        psql(host, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders' AND column_name = 'discount'", DB)
        == "0"
    )
    assert (
        psql(host, "SELECT string_agg(name, ',' ORDER BY id) FROM django_migrations", DB)
        == "0001_initial,0001_initial,0002_orders"
    )
    assert psql(host, "SELECT count(*) FROM orders", DB) == "150000"


def test_failed_database_is_kept_with_the_failed_migration(host: Any) -> None:
    failed = sorted(psql(host, f"SELECT datname FROM pg_database WHERE datname LIKE '{DB}\\_\\_failed\\_%'").splitlines())
    assert len(failed) == 2  # the converge's, and the one the export step replaced (with the late row)
    assert psql(host, "SELECT count(*) FROM django_migrations WHERE name = '0003_bad'", failed[0]) == "1"
    assert psql(host, "SELECT count(*) FROM orders WHERE discount IS NOT NULL", failed[0]) == "1000"
    assert psql(host, "SELECT count(*) FROM customers WHERE id = 999999", failed[1]) == "1"


def test_the_late_row_was_exported_before_the_restore_and_reapplies(host: Any) -> None:
    export = "/var/lib/molecule-runs/run-1/export"
    directory = host.file(export)
    assert directory.is_directory and directory.mode == 0o750 and (directory.user, directory.group) == ("root", "postgres")
    manifest = json.loads(host.file(f"{export}/export.json").content_string)
    assert manifest["tables"]["public.customers"]["inserted"] == 1 and manifest["rows"] == 1
    for name in host.check_output(f"find {export} -type f").splitlines():
        assert host.file(name).mode == 0o640 and host.file(name).user == "root", name
    rows = host.file(f"{export}/{manifest['tables']['public.customers']['files']['rows']}").content_string
    assert "999999" in rows and "late customer" in rows
    assert psql(host, "SELECT count(*) FROM customers WHERE id = 999999", DB) == "0"
    # apply.sql (self-contained: psql reads only the script, which root opens) re-applies it onto a copy
    psql(host, f"CREATE DATABASE molecule_apply TEMPLATE {DB}")
    try:
        result = host.run(f"cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d molecule_apply < {export}/apply.sql")
        assert result.rc == 0, result.stdout + result.stderr
        assert psql(host, "SELECT name FROM customers WHERE id = 999999", "molecule_apply") == "late customer"
    finally:
        psql(host, "DROP DATABASE molecule_apply")
    assert not host.file("/var/backups/postgresql/before-release/export").exists  # the staging copy is gone


def test_ownership_and_grants_are_preserved(host: Any) -> None:
    assert psql(host, f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{DB}'") == DB
    assert psql(host, f"SELECT has_database_privilege('molecule_reader', '{DB}', 'CONNECT')") == "t"
    assert psql(host, f"SELECT has_database_privilege('public', '{DB}', 'CONNECT')") == "f"
    assert psql(host, "SELECT has_table_privilege('molecule_reader', 'orders', 'SELECT')", DB) == "t"
    assert psql(host, "SELECT tableowner FROM pg_tables WHERE tablename = 'orders'", DB) == DB
    assert psql(host, f"SELECT datallowconn FROM pg_database WHERE datname = '{DB}'") == "t"


def test_restore_report_lists_the_discarded_changes(host: Any) -> None:
    swaps = [r for r in reports(host, "swap") if r["decision"] == "discard"]
    assert len(swaps) == 1 and swaps[0]["writes_blocked"] is True
    changed = {t["table"]: t for t in swaps[0]["changed_tables"]}
    assert changed["public.django_migrations"]["row_delta"] == 1
    assert changed["public.order_notes"]["row_delta"] == -50
    assert changed["public.orders"]["status"] == "content"


def test_writes_after_the_backup_were_refused_and_reported(host: Any) -> None:
    refused = [r for r in reports(host, "precheck") + reports(host, "swap") if r["decision"] == "refuse"]
    assert {r["stage"] for r in refused} == {"precheck", "swap"}
    for report in refused:
        assert [(t["table"], t["row_delta"]) for t in report["changed_tables"]] == [("public.customers", 1)]
    assert host.file(f"{BACKUP}").mode == 0o700
    for name in host.check_output(f"find {BACKUP} -maxdepth 1 -name 'restore-report-*'").splitlines():
        assert host.file(name).mode == 0o600 and host.file(name).user == "postgres"


def test_refusals_left_the_live_database_untouched(host: Any) -> None:
    # The database the refusals left alone is the one the export step then replaced (it kept the late row).
    oid_before = host.file("/root/molecule-live-oid").content_string.strip()
    failed = sorted(psql(host, f"SELECT datname FROM pg_database WHERE datname LIKE '{DB}\\_\\_failed\\_%'").splitlines())
    assert psql(host, f"SELECT oid FROM pg_database WHERE datname = '{failed[-1]}'") == oid_before
    assert psql(host, f"SELECT count(*) FROM pg_database WHERE datname LIKE '{DB}\\_\\_restore\\_%'") == "0"
    state = json.loads(host.file("/var/backups/postgresql/restore-state.json").content_string)
    live_oid = psql(host, f"SELECT oid FROM pg_database WHERE datname = '{DB}'")
    assert str(state[DB]["oid"]) == live_oid != oid_before and state[DB]["backup_id"] == "before-release"
