#!/usr/bin/env python3
"""Prove a live database against a backup without changing anything: same schema, same migration rows.

After reverse migrations, the schema of the live database must be the backup's again and the rows of the
migrations table (django_migrations) must be the backup's; the content of tables may differ (writes
made by users since the backup are kept), and those tables are listed with their row counts.

    pg_backup_compare.py --backup-dir DIR --id ID --dsn DSN [--database DB] [--bin-dir DIR] [--fingerprint-jobs N]

Schema: `pg_restore --schema-only` of the backup's dump and `pg_dump --schema-only` of the live
database, compared as sets of statements, comments and session settings left out, the column lines
of each CREATE TABLE sorted (a reversed RemoveField adds its column back at the end of the table:
the same schema for every query that names its columns, which Django does), and an index that
differs by its name alone reported in schema.renamed_indexes rather than as a difference (a
reversed RenameIndex(old_fields=...) keeps the new name).
Migration rows: the manifest's copy (taken in the backup's snapshot) against the live table.

Prints one JSON document. Exit codes: 0 schema and migration rows equal, 1 they differ, 2 error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import db_fingerprint
import pg_backup_store as store
import pg_snapshot_backup as psb

SKIPPED_LINE = re.compile(r"^(--|SET |SELECT pg_catalog\.set_config\(|\\restrict |\\unrestrict )")
SHOWN = 20  # differing statements shown per side


def statements(dump_sql: str) -> list[str]:
    """The schema's statements, normalised: no comments or session settings, CREATE TABLE columns sorted."""
    lines = [line.rstrip() for line in dump_sql.splitlines() if line.strip() and not SKIPPED_LINE.match(line)]
    out: list[str] = []
    current: list[str] = []
    for line in lines:
        current.append(line)
        if line.endswith(";"):
            out.append(normalise("\n".join(current)))
            current = []
    if current:
        out.append(normalise("\n".join(current)))
    return sorted(out)


def normalise(statement: str) -> str:
    lines = statement.split("\n")
    if lines[0].startswith("CREATE TABLE ") and lines[0].endswith("(") and lines[-1].startswith(")"):
        columns = sorted(line.strip().rstrip(",") for line in lines[1:-1])
        return "\n".join([lines[0], *columns, lines[-1]])
    return statement


def schema_of_backup(info: store.BackupInfo, bin_dir: str) -> str:
    pg_restore = store.find_program("pg_restore", bin_dir)
    return store.run_program([pg_restore, "--schema-only", "--file=-", str(info.path / store.DUMP_DIR)], "pg_restore").stdout


def schema_of_live(dsn: str, bin_dir: str) -> str:
    pg_dump = store.find_program("pg_dump", bin_dir)
    return store.run_program([pg_dump, "--schema-only", "--no-password", f"--dbname={dsn}"], "pg_dump").stdout


def multiset_difference(a: Sequence[str], b: Sequence[str]) -> list[str]:
    rest = list(b)
    only: list[str] = []
    for item in a:
        if item in rest:
            rest.remove(item)
        else:
            only.append(item)
    return only


INDEX = re.compile(r"^CREATE (UNIQUE )?INDEX (\S+) ON (\S+) (.*)$", re.DOTALL)


def pair_renamed_indexes(only_live: list[str], only_backup: list[str]) -> list[dict[str, str]]:
    """Take out of both lists the indexes that differ by their name alone (same table, columns, method).

    Django's RenameIndex(old_fields=...) reverses to nothing (the old index had no name of its own), so a
    reversed run leaves the new name on the same index: every query, and Django, which finds an unnamed
    index by its fields, sees the same index. Returns the pairs taken out.
    """
    pairs = []
    for statement in list(only_live):
        live = INDEX.match(statement)
        if live is None:
            continue
        for candidate in only_backup:
            backup = INDEX.match(candidate)
            if backup and (backup[1], backup[3], backup[4]) == (live[1], live[3], live[4]) and backup[2] != live[2]:
                only_live.remove(statement)
                only_backup.remove(candidate)
                pairs.append({"backup": backup[2], "live": live[2], "table": live[3]})
                break
    return pairs


def row_key(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, default=str)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    psb.check_dsn(args.dsn)
    info = store.inspect(Path(args.backup_dir), store.check_id(args.id))
    if info is None or info.manifest is None:
        raise store.BackupError(f"backup {args.id} does not exist in {args.backup_dir}: check the backup id")
    manifest = info.manifest
    database = args.database or manifest["database"]
    live_dsn = psb.dsn_for(args.dsn, database)

    backup_schema = statements(schema_of_backup(info, args.bin_dir))
    live_schema = statements(schema_of_live(live_dsn, args.bin_dir))
    only_live = multiset_difference(live_schema, backup_schema)
    only_backup = multiset_difference(backup_schema, live_schema)
    renamed_indexes = pair_renamed_indexes(only_live, only_backup)

    saved = manifest.get("migrations")
    result_migrations: dict[str, Any] = {"table": None, "equal": None, "only_live": [], "only_backup": []}
    if saved:
        with psb.connect(live_dsn, "pg_backup_compare") as conn:
            live_rows = psb.migration_rows(conn, saved["table"])
        live_keys = [row_key(r) for r in (live_rows or {"rows": []})["rows"]]
        backup_keys = [row_key(r) for r in saved["rows"]]
        result_migrations = {
            "table": saved["table"],
            "equal": live_rows is not None and sorted(live_keys) == sorted(backup_keys),
            "only_live": [json.loads(k) for k in multiset_difference(live_keys, backup_keys)],
            "only_backup": [json.loads(k) for k in multiset_difference(backup_keys, live_keys)],
        }

    live_fp = db_fingerprint.fingerprint(live_dsn, jobs=args.fingerprint_jobs,
                                         method=db_fingerprint.method_of(manifest["fingerprints"]))
    changed = db_fingerprint.compare(manifest["fingerprints"], live_fp)
    schema_equal = not only_live and not only_backup
    return {
        "backup_id": info.backup_id,
        "database": database,
        "equal": schema_equal and result_migrations["equal"] is not False,
        "schema": {
            "equal": schema_equal,
            "statements": len(live_schema),
            "only_live": only_live[:SHOWN],
            "only_backup": only_backup[:SHOWN],
            "differing": len(only_live) + len(only_backup),
            "renamed_indexes": renamed_indexes,
        },
        "migrations": result_migrations,
        "tables_changed": changed,
        "tables_changed_text": db_fingerprint.format_diffs(changed, len(live_fp["tables"])),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pg_backup_compare.py", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--backup-dir", required=True)
    parser.add_argument("--id", required=True, help="backup id")
    parser.add_argument("--dsn", default="", help="libpq connection string (its dbname is ignored), no password")
    parser.add_argument("--database", default="", help="live database name (default: the manifest's)")
    parser.add_argument("--bin-dir", default="", help="PostgreSQL bin directory (default: newest installed)")
    parser.add_argument("--fingerprint-jobs", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = compare(args)
        code = 0 if result["equal"] else 1
    except (store.BackupError, db_fingerprint.FingerprintError) as exc:
        result, code = {"failed": True, "error": str(exc)}, 2
    except (psb.psycopg.Error, OSError) as exc:
        result, code = {"failed": True, "error": f"{type(exc).__name__}: {str(exc).strip()}"}, 2
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    if code == 2:
        sys.stderr.write(f"pg_backup_compare: {result['error']}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
