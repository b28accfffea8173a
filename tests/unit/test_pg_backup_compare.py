"""pg_backup_compare.py: the live database proven against a backup after reverse migrations, on the throwaway cluster.

The database plays a Django project: a migration drops a column and adds a table, users write orders,
the migration is reversed the way Django reverses it (the column comes back at the end of the table).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pgsql import execute

REPO = Path(__file__).resolve().parents[2]
BACKUP_PROGRAM = REPO / "roles" / "pg_backup" / "files" / "pg_snapshot_backup.py"
COMPARE_PROGRAM = REPO / "roles" / "pg_restore" / "files" / "pg_backup_compare.py"
sys.path[:0] = [str(BACKUP_PROGRAM.parent), str(COMPARE_PROGRAM.parent)]

import pg_backup_compare  # noqa: E402

DB = "cmp_app"
MIGRATE = (
    "ALTER TABLE shop_product DROP COLUMN category",
    "CREATE TABLE shop_tag (id serial PRIMARY KEY, name text NOT NULL)",
    "INSERT INTO django_migrations (app, name, applied) VALUES ('shop', '0002_contract', '2026-11-30')",
)
REVERSE = (
    "ALTER TABLE shop_product ADD COLUMN category varchar(40) NOT NULL DEFAULT 'misc'",
    "ALTER TABLE shop_product ALTER COLUMN category DROP DEFAULT",
    "DROP TABLE shop_tag",
    "DELETE FROM django_migrations WHERE name = '0002_contract'",
)


def run(program: Path, *args: str, expect: int = 0) -> dict[str, Any]:
    env = {"PYTHONPATH": f"{BACKUP_PROGRAM.parent}:{COMPARE_PROGRAM.parent}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(program), *args], capture_output=True, text=True, timeout=600,
                          check=False, env=env)  # fmt: skip
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture
def backed_up(pg_cluster: Any, tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A fresh project database and a verified backup of it; yields its DSN and the compare arguments."""
    admin = pg_cluster.dsn("postgres")
    execute(admin, f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)', f'CREATE DATABASE "{DB}"')
    dsn = pg_cluster.dsn(DB)
    execute(
        dsn,
        "CREATE TABLE django_migrations (id serial PRIMARY KEY, app varchar(255), name varchar(255), applied timestamptz)",
        "INSERT INTO django_migrations (app, name, applied) VALUES ('shop', '0001_initial', '2025-01-01')",
        "CREATE TABLE shop_product (id serial PRIMARY KEY, name text NOT NULL, category varchar(40) NOT NULL,"
        " price numeric(8,2))",
        "CREATE INDEX shop_product_name_idx ON shop_product (name)",
        "INSERT INTO shop_product (name, category, price) SELECT 'p' || g, 'c' || (g % 3), g FROM generate_series(1, 50) g",
        "CREATE TABLE shop_order (id serial PRIMARY KEY, product_id int REFERENCES shop_product, qty int)",
    )
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700)
    common = ["--backup-dir", str(backups), "--dsn", dsn, "--bin-dir", str(pg_cluster.bindir), "--id", "pre-v2"]
    run(BACKUP_PROGRAM, "backup", *common, "--release-id", "v1")
    yield dsn, [*common, "--database", DB]
    execute(admin, f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')


def test_statements_ignore_comments_settings_and_column_order() -> None:
    a = "-- c\nSET x = 1;\n\\restrict abc\nCREATE TABLE t (\n    a int,\n    b text\n);\nCREATE INDEX i ON t (a);\n"
    b = "CREATE INDEX i ON t (a);\n\nCREATE TABLE t (\n    b text,\n    a int\n);\n-- other comment\n"
    assert pg_backup_compare.statements(a) == pg_backup_compare.statements(b)
    assert pg_backup_compare.statements(a) != pg_backup_compare.statements(b.replace("b text", "b varchar"))


def test_reversed_migrations_with_user_writes_kept_prove_equal(backed_up: tuple[str, list[str]]) -> None:
    dsn, args = backed_up
    execute(dsn, *MIGRATE, "INSERT INTO shop_order (product_id, qty) SELECT g, 1 FROM generate_series(1, 7) g", *REVERSE)
    result = run(COMPARE_PROGRAM, *args)
    assert result["equal"] and result["schema"]["equal"] and result["migrations"]["equal"], result
    # The users' orders are kept and reported; the reversed column's data is the reverse's default.
    changed = {d["table"]: d for d in result["tables_changed"]}
    assert changed["public.shop_order"]["row_delta"] == 7
    assert set(changed) == {"public.shop_order", "public.shop_product"}


def test_a_migration_left_applied_is_found(backed_up: tuple[str, list[str]]) -> None:
    dsn, args = backed_up
    execute(dsn, *MIGRATE)
    result = run(COMPARE_PROGRAM, *args, expect=1)
    assert not result["equal"] and not result["schema"]["equal"]
    assert [r["name"] for r in result["migrations"]["only_live"]] == ["0002_contract"]
    assert any("shop_tag" in s for s in result["schema"]["only_live"])
    assert any("category" in s for s in result["schema"]["only_backup"])


def test_a_schema_left_different_by_a_reverse_is_found(backed_up: tuple[str, list[str]]) -> None:
    dsn, args = backed_up
    # The migration row is gone but the index the migration dropped was never rebuilt.
    execute(dsn, "DROP INDEX shop_product_name_idx")
    result = run(COMPARE_PROGRAM, *args, expect=1)
    assert result["migrations"]["equal"] and not result["schema"]["equal"]
    assert result["schema"]["only_backup"] == ["CREATE INDEX shop_product_name_idx ON public.shop_product USING btree (name);"]


def test_an_index_whose_reverse_kept_the_new_name_is_the_same_index(backed_up: tuple[str, list[str]]) -> None:
    """Django's RenameIndex(old_fields=...) (django-taggit's 0006) reverses to nothing: the index keeps its
    new name. Same table, same columns, same method: the same index for every query, and Django finds an
    unnamed index by its fields. Reported, not a difference; another definition under a new name still is."""
    dsn, args = backed_up
    execute(dsn, "ALTER INDEX shop_product_name_idx RENAME TO shop_prod_name_8fc721_idx")
    result = run(COMPARE_PROGRAM, *args)
    assert result["equal"] and result["schema"]["equal"], result
    assert result["schema"]["renamed_indexes"] == [
        {"backup": "shop_product_name_idx", "live": "shop_prod_name_8fc721_idx", "table": "public.shop_product"}
    ]
    execute(dsn, "DROP INDEX shop_prod_name_8fc721_idx", "CREATE INDEX shop_prod_name_8fc721_idx ON shop_product (price)")
    result = run(COMPARE_PROGRAM, *args, expect=1)
    assert not result["schema"]["equal"] and result["schema"]["renamed_indexes"] == []


def test_an_unknown_backup_is_an_error_on_one_line(backed_up: tuple[str, list[str]]) -> None:
    _, args = backed_up
    bad = [("missing" if a == "pre-v2" else a) for a in args]
    result = run(COMPARE_PROGRAM, *bad, expect=2)
    assert "backup missing does not exist" in result["error"] and "\n" not in result["error"]
