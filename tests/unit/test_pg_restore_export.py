"""pg_snapshot_restore.py export: the rows users wrote since the backup, kept in files before a restore discards them.

The scene of a forced rolling run whose non-atomic data migration failed half-way: after the backup, the
migration added a column, dropped another, created a table, rewrote some rows and recorded itself, while
users inserted, updated and deleted rows. The export, taken from the live database against the restored
backup, must hold every row that differs, re-apply (with the program and with psql) onto the restored
database, and give back the live rows; the swap must refuse when anything was written after the export.
"""

from __future__ import annotations

import csv
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgsql import execute, scalar

REPO = Path(__file__).resolve().parents[2]
BACKUP_PROGRAM = REPO / "roles" / "pg_backup" / "files" / "pg_snapshot_backup.py"
RESTORE_PROGRAM = REPO / "roles" / "pg_restore" / "files" / "pg_snapshot_restore.py"

DB = "ex_app"
BACKUP_ID = "pre-v2-run1"
ORDERS = 3000

# (schema.table, columns compared): the columns the live and the backed-up table have in common.
COMPARED = {
    "app.customers": "id, name",
    "app.orders": "id, customer_id, amount, placed::text, payload::text, note",
    "app.order_tags": "order_id, tag",
    "app.events": "kind, body::text",
    "app.products": "id, name, stock",
}


def rows(dsn: str, table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return sorted(conn.execute(f"SELECT {COMPARED[table]} FROM {table}").fetchall(), key=repr)


def run(*args: str, expect: int = 0, program: Path = RESTORE_PROGRAM) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(program), *args], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def scene(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Backup taken, then a half-applied migration and user writes on the live database; backup restored beside it."""
    admin = pg_cluster.dsn("postgres")
    execute(admin, f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)', f'CREATE DATABASE "{DB}" TEMPLATE template0')
    dsn = pg_cluster.dsn(DB)
    execute(
        dsn,
        "CREATE SCHEMA app",
        "CREATE TABLE app.customers (id int PRIMARY KEY, name text NOT NULL, email text)",
        "INSERT INTO app.customers SELECT g, 'customer ' || g, 'c' || g || '@x.test' FROM generate_series(1, 200) g",
        # Not deferrable: re-applying must order parents before children (and deletes the other way).
        "CREATE TABLE app.orders (id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES app.customers,"
        " amount numeric(12,2), placed timestamptz, payload json, note text)",
        f"INSERT INTO app.orders (customer_id, amount, placed, payload) SELECT g % 200 + 1, g * 0.37,"
        f" timestamptz '2025-01-01 00:00+00' + g * interval '1 minute', json_build_object('n', g)"
        f" FROM generate_series(1, {ORDERS}) g",
        "CREATE TABLE app.order_tags (order_id bigint REFERENCES app.orders, tag text, PRIMARY KEY (order_id, tag))",
        "INSERT INTO app.order_tags SELECT g, 'gift' FROM generate_series(1, 50) g",
        "CREATE TABLE app.events (kind text, body jsonb)",  # no primary key
        "INSERT INTO app.events SELECT 'seen', jsonb_build_object('n', g) FROM generate_series(1, 20) g",
        # the run drops a NOT NULL column: re-applied updates must keep the backup's value, not insert a NULL
        "CREATE TABLE app.products (id int PRIMARY KEY, name text NOT NULL, category text NOT NULL, stock int)",
        "INSERT INTO app.products SELECT g, 'product ' || g, 'cat ' || g % 3, 100 FROM generate_series(1, 20) g",
        "CREATE TABLE app.untouched (id int PRIMARY KEY)",
        "INSERT INTO app.untouched SELECT generate_series(1, 10)",
        "CREATE TABLE public.django_migrations (id serial PRIMARY KEY, app varchar(255), name varchar(255), applied timestamptz)",
        "INSERT INTO public.django_migrations (app, name, applied) VALUES ('shop', '0001_initial', '2025-01-01')",
    )
    backups = tmp_path_factory.mktemp("export-backups") / "pg"
    backups.mkdir(mode=0o700)
    run("backup", "--backup-dir", str(backups), "--dsn", dsn, "--bin-dir", str(pg_cluster.bindir), "--id", BACKUP_ID,
        program=BACKUP_PROGRAM)  # fmt: skip
    run("verify", "--backup-dir", str(backups), "--dsn", dsn, "--bin-dir", str(pg_cluster.bindir), "--id", BACKUP_ID,
        program=BACKUP_PROGRAM)  # fmt: skip
    execute(
        dsn,
        # the failed run: schema changes, a half-done data migration, its migration row
        "ALTER TABLE app.orders ADD COLUMN status text DEFAULT 'new'",
        "ALTER TABLE app.customers DROP COLUMN email",
        "ALTER TABLE app.products DROP COLUMN category",
        "CREATE TABLE app.refunds (id serial PRIMARY KEY, order_id bigint)",
        "INSERT INTO app.refunds (order_id) VALUES (1), (2)",
        "UPDATE app.orders SET amount = amount * 2 WHERE id <= 10",
        "INSERT INTO public.django_migrations (app, name, applied) VALUES ('shop', '0002_half', now())",
        # users: new customers and orders (awkward text too), changes, deletions
        "INSERT INTO app.customers (id, name) VALUES (201, 'new, \"quoted\" customer'), (202, 'another')",
        "INSERT INTO app.orders (customer_id, amount, placed, payload, note) VALUES"
        " (201, 12.50, '2026-01-01 10:00+00', '{\"n\": 9001}', 'line one\nline two, with comma'),"
        " (202, 7.00, '2026-01-01 10:01+00', NULL, NULL),"
        " (5, 1.00, '2026-01-01 10:02+00', '{\"n\": 9003}', '')",
        "INSERT INTO app.order_tags SELECT max(id), 'express' FROM app.orders",
        "UPDATE app.orders SET note = 'changed by user' WHERE id = 100",
        "UPDATE app.customers SET name = 'renamed' WHERE id = 7",
        "DELETE FROM app.order_tags WHERE order_id = 3",
        "DELETE FROM app.orders WHERE id = 3",
        "DELETE FROM app.orders WHERE customer_id = 199",
        "DELETE FROM app.customers WHERE id = 199",
        "INSERT INTO app.events VALUES ('seen', '{\"n\": 21}'), ('seen', '{\"n\": 1}')",
        "UPDATE app.products SET stock = stock - 1 WHERE id IN (2, 4)",
    )
    restored = run("restore", "--backup-dir", str(backups), "--dsn", dsn, "--bin-dir", str(pg_cluster.bindir),
                   "--database", DB, "--id", BACKUP_ID)["restored_db"]  # fmt: skip
    live_rows = {table: rows(dsn, table) for table in COMPARED}
    return {"dsn": dsn, "admin": admin, "backups": backups, "restored": restored, "live_rows": live_rows,
            "export": tmp_path_factory.mktemp("run") / "export"}  # fmt: skip


def args(pg_cluster: Any, scene: dict[str, Any], *extra: str) -> list[str]:
    return ["--backup-dir", str(scene["backups"]), "--dsn", scene["dsn"], "--bin-dir", str(pg_cluster.bindir),
            "--database", DB, "--id", BACKUP_ID, "--write-report", *extra]  # fmt: skip


def test_precheck_accepts_the_writes_when_an_export_is_asked_for(pg_cluster: Any, scene: dict[str, Any]) -> None:
    refused = run("compare-live", *args(pg_cluster, scene), expect=3)
    assert refused["refused"]
    result = run("compare-live", *args(pg_cluster, scene, "--export-dir", str(scene["export"])))
    assert result["decision"] == "export"
    assert {"app.orders", "app.customers"} <= {t["table"] for t in result["changed_tables"]}


def test_export_holds_every_row_that_differs_per_table(pg_cluster: Any, scene: dict[str, Any]) -> None:
    out = scene["export"]
    result = run(
        "export",
        *args(
            pg_cluster,
            scene,
            "--export-dir",
            str(out),
            "--restored-db",
            scene["restored"],
            "--export-exclude",
            "django_migrations",
        ),
    )
    tables = result["tables"]
    # users' and the half-done migration's rows alike: the tool cannot tell them apart, the operator can
    # orders 1..10 rewritten by the migration (3 deleted since), 100 by a user; 3 and customer 199's 15 deleted
    assert (tables["app.orders"]["inserted"], tables["app.orders"]["updated"], tables["app.orders"]["deleted"]) == (3, 10, 16)
    assert (tables["app.customers"]["inserted"], tables["app.customers"]["updated"],
            tables["app.customers"]["deleted"]) == (2, 1, 1)  # fmt: skip
    assert (tables["app.order_tags"]["inserted"], tables["app.order_tags"]["deleted"]) == (1, 1)
    assert tables["app.events"]["inserted"] == 2 and tables["app.events"]["primary_key"] == []
    assert "app.untouched" not in tables
    assert tables["app.orders"]["columns_only_live"] == ["status"]
    assert tables["app.customers"]["columns_only_backup"] == ["email"]
    assert tables["app.products"]["updated"] == 2 and tables["app.products"]["columns_only_backup"] == ["category"]
    # a table the run created cannot go back into the backup's schema: named, not exported
    assert "app.refunds" in result["skipped"]
    # the run's own migration rows are excluded on request: the restored schema is the old one
    assert "public.django_migrations" in result["skipped"] and "public.django_migrations" not in tables
    assert result["rows"] == sum(t["inserted"] + t["updated"] + t["deleted"] for t in tables.values())
    assert result["verified"] is True
    # files: mode 0600 in a 0700 directory, one CSV per table and kind, re-appliable as they are
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    with (out / tables["app.orders"]["files"]["rows"]).open(newline="") as f:
        records = list(csv.DictReader(f))
    assert any(r["note"] == "line one\nline two, with comma" for r in records)
    assert len(records) == 13 and "status" not in records[0] and "id" in records[0]
    with (out / tables["app.orders"]["files"]["deleted"]).open(newline="") as f:
        assert sorted(int(r["id"]) for r in csv.DictReader(f)) == [3, *range(198, ORDERS + 1, 200)]
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["backup_id"] == BACKUP_ID and manifest["tables"]["app.orders"]["inserted"] == 3
    assert (out / "apply.sql").is_file() and not list(out.glob(".*"))


def test_swap_refuses_when_anything_was_written_after_the_export(pg_cluster: Any, scene: dict[str, Any]) -> None:
    execute(scene["dsn"], "INSERT INTO app.customers (id, name) VALUES (9999, 'too late')")
    refused = run("swap", *args(pg_cluster, scene, "--export-dir", str(scene["export"]), "--restored-db", scene["restored"]),
                  expect=3)  # fmt: skip
    assert "after the export" in refused["error"]
    assert scalar(scene["admin"], f"SELECT datallowconn FROM pg_database WHERE datname = '{DB}'") is True
    execute(scene["dsn"], "DELETE FROM app.customers WHERE id = 9999")


def test_swap_restores_the_backup_and_keeps_the_export(pg_cluster: Any, scene: dict[str, Any]) -> None:
    swapped = run("swap", *args(pg_cluster, scene, "--export-dir", str(scene["export"]), "--restored-db", scene["restored"]))
    assert swapped["decision"] == "export" and swapped["export"]["rows"] > 0
    scene["failed_db"] = swapped["failed_db"]
    compare = subprocess.run([sys.executable, str(RESTORE_PROGRAM.parent / "db_fingerprint.py"), "compare",
                              str(scene["backups"] / BACKUP_ID / "manifest.json"), f"dsn:{scene['dsn']}"],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert compare.returncode == 0, compare.stdout + compare.stderr
    # ids handed out since the backup are never handed out again: they are in the export
    assert scalar(scene["dsn"], "SELECT nextval('app.orders_id_seq')") > ORDERS + 3


def test_the_export_reapplies_with_psql_and_gives_back_the_live_rows(pg_cluster: Any, scene: dict[str, Any]) -> None:
    copy = f"{DB}_psql"
    execute(scene["admin"], f'DROP DATABASE IF EXISTS "{copy}"', f'CREATE DATABASE "{copy}" TEMPLATE "{DB}"')
    # self-contained: psql reads the script on stdin, from another directory, and nothing else
    with (scene["export"] / "apply.sql").open() as script:
        proc = subprocess.run([str(pg_cluster.bindir / "psql"), "-X", "-q", "-d", pg_cluster.dsn(copy)], stdin=script,
                              cwd="/", capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for table in ("app.customers", "app.orders", "app.order_tags", "app.products"):
        assert rows(pg_cluster.dsn(copy), table) == scene["live_rows"][table], table
    events = rows(pg_cluster.dsn(copy), "app.events")
    assert len(events) == len(scene["live_rows"]["app.events"])  # inserted only: removals are listed, not applied
    execute(scene["admin"], f'DROP DATABASE "{copy}"')


def test_the_export_reapplies_with_the_program_and_gives_back_the_live_rows(pg_cluster: Any, scene: dict[str, Any]) -> None:
    applied = run("apply-export", "--dsn", scene["dsn"], "--database", DB, "--export-dir", str(scene["export"]))
    assert applied["changed"] and applied["rows"] == json.loads((scene["export"] / "export.json").read_text())["rows"]
    for table in ("app.customers", "app.orders", "app.order_tags", "app.products"):
        assert rows(scene["dsn"], table) == scene["live_rows"][table], table
    assert scalar(scene["dsn"], "SELECT category FROM app.products WHERE id = 4") == "cat 1"
    # the backup's value stays where the live table no longer had the column
    assert scalar(scene["dsn"], "SELECT email FROM app.customers WHERE id = 7") == "c7@x.test"
    assert scalar(scene["dsn"], "SELECT count(*) FROM public.django_migrations") == 1
