#!/usr/bin/env python3
"""Restore a verified pg_snapshot_backup backup and swap it in place of the live database (pg_restore role).

Runs on the database host as the PostgreSQL OS user (peer authentication). Ships next to
pg_snapshot_backup.py, pg_backup_store.py and db_fingerprint.py, which it imports.

Commands (each prints one JSON document on stdout):
    check          pick the backup (default: newest verified), re-verify its checksums, versions, free space,
                   and whether the live database already is this backup restored by us (nothing to do)
    compare-live   fingerprint the live database, compare with the manifest, write the report; exit 3 when
                   tables changed after the backup and none of --writes-blocked, --export-dir,
                   --accept-data-loss is given
    restore        create <db>__restore_<ts> like the live database, pg_restore -j into it, and check its
                   fingerprints equal the manifest's (the scratch database is dropped if anything fails)
    export         read the live database in one snapshot, and for every table that differs from the backup
                   write the rows that differ from the restored database (inserted or updated: CSV of the
                   columns both have; deleted: CSV of the primary key) into --export-dir with apply.sql and
                   export.json, verified by row counts; advance the restored database's sequences past the
                   live ones. The live database is only read.
    swap           block connections to the live database, terminate its sessions, compare it with the
                   manifest (report; refusal as in compare-live; with --export-dir, refusal when it changed
                   since the export), then in one transaction rename it to <db>__failed_<ts> and the restored
                   database to <db>; re-allow connections
    apply-export   re-apply an export onto --database in one transaction (what apply.sql does with psql)
    cleanup        undo an interrupted restore: drop the scratch database, re-allow connections to the live one
    failed-retention  keep the newest N <db>__failed_* databases, drop the others
Exit codes: 0 success, 1 failure, 2 usage error, 3 refused: writes after the backup would be lost.
"""

from __future__ import annotations

import argparse
import csv
import graphlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import db_fingerprint
import pg_backup_store as store
import pg_snapshot_backup as psb
import psycopg
from psycopg import sql

STATE_FILE = "restore-state.json"
EXPORT_MANIFEST = "export.json"
APPLY_SCRIPT = "apply.sql"
EXIT_REFUSED = 3
FAILED_PATTERN = r"__failed_\d{8}T\d{6}Z$"


class Refused(store.BackupError):
    """The live database holds writes made after the backup and the caller did not allow discarding them."""


def maintenance(args: argparse.Namespace) -> str:
    return psb.dsn_for(args.dsn, args.maintenance_db)


def backup_for(args: argparse.Namespace) -> store.BackupInfo:
    """The backup to restore: --id, or the newest verified one. It must be verified."""
    backup_dir = Path(args.backup_dir)
    if args.id:
        info = store.inspect(backup_dir, store.check_id(args.id))
        if info is None:
            raise store.BackupError(f"backup {args.id} does not exist in {backup_dir}: check the backup id")
    else:
        info = store.newest_verified(backup_dir)
        if info is None:
            raise store.BackupError(f"there is no verified backup in {backup_dir}: take one with the pg_backup role first")
    if info.state != "verified":
        raise store.BackupError(
            f"backup {info.backup_id} in {backup_dir} is {info.state}, not verified: it is incomplete or was never "
            "verified; refusing to restore it"
        )
    return info


def live_name(args: argparse.Namespace, manifest: dict[str, Any]) -> str:
    return args.database or manifest["database"]


def read_state(backup_dir: Path) -> dict[str, Any]:
    path = backup_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}


def judge(diffs: Sequence[dict[str, Any]], writes_blocked: bool, accept_data_loss: bool, export: bool = False) -> str:
    """'none' (nothing changed), 'discard' (allowed), 'export' (kept in files first) or 'refuse'.

    Writes blocked since the backup: the differences are the failed run's own, nothing to keep. Otherwise an
    export, when asked for, keeps them before they are discarded (even when data loss is accepted).
    """
    if not diffs:
        return "none"
    if writes_blocked:
        return "discard"
    if export:
        return "export"
    return "discard" if accept_data_loss else "refuse"


def write_report(root: Path, stage: str, backup_id: str, database: str, diffs: list[dict[str, Any]],
                 decision: str, args: argparse.Namespace, compared: int) -> tuple[str, str]:
    text = db_fingerprint.format_diffs(diffs, compared)
    report = {
        "backup_id": backup_id,
        "database": database,
        "stage": stage,
        "compared_at": store.isotime(store.utcnow()),
        "writes_blocked": args.writes_blocked,
        "accept_data_loss": args.accept_data_loss,
        "decision": decision,
        "export_dir": args.export_dir or None,
        "changed_tables": diffs,
        "text": text,
    }
    path = root / f"restore-report-{store.stamp(store.utcnow())}-{stage}.json"
    store.write_json(path, report)
    return str(path), text


def refusal_message(database: str, backup_id: str, text: str, report: str) -> str:
    return (
        f"the live database {database} changed after backup {backup_id} was taken; restoring would discard these "
        f"writes:\n{text}Report: {report}\nBlock writes (maintenance mode) and set pg_restore_writes_blocked: true, "
        "or set pg_restore_export_dir to keep them in files first, or pg_restore_accept_data_loss: true to discard them."
    )


# --------------------------------------------------------------------------------------------------------------
# check


def cmd_check(args: argparse.Namespace) -> dict[str, Any]:
    psb.check_dsn(args.dsn)
    info = backup_for(args)
    assert info.manifest is not None
    manifest = info.manifest
    database = live_name(args, manifest)
    problems: list[str] = []
    result: dict[str, Any] = {
        "id": info.backup_id,
        "path": str(info.path),
        "database": database,
        "release_id": manifest.get("release_id"),
        "finished_at": manifest.get("finished_at"),
        "db_size_bytes": manifest.get("db_size_bytes"),
    }
    result["checksums"] = store.verify_checksums(info.path, manifest, args.jobs)  # raises: corrupt, nothing touched
    pg_restore = store.find_program("pg_restore", args.bin_dir)
    version = store.program_version(pg_restore)
    result.update(pg_restore=pg_restore, pg_restore_version=version)
    if store.version_major(version) < int(manifest.get("pg_dump_major", 0)):
        problems.append(f"pg_restore {version} cannot read an archive of pg_dump {manifest.get('pg_dump_version')}: set bin_dir")
    longest = len(database) + len(psb.scratch_name("", "restore", store.utcnow()))
    if longest > store.NAMEDATALEN:
        problems.append(f"database name {database} is too long for the {longest - len(database)}-character suffixes")
    with psb.connect(maintenance(args)) as conn:
        live = psb.database_properties(conn, database)
        data_directory = conn.execute("SELECT current_setting('data_directory')").fetchone()
    result["live"] = live
    if live is not None and not live["allow_connections"]:
        problems.append(f"database {database} does not allow connections (datallowconn false): an interrupted restore? "
                        "run the role's cleanup or ALTER DATABASE ... ALLOW_CONNECTIONS true")
    if data_directory and os.access(data_directory[0], os.R_OK):
        free, _, measured = store.free_bytes(Path(data_directory[0]))
        need = int((manifest.get("db_size_bytes") or 0) * args.margin)
        result["space"] = {"free": free, "need": need, "path": str(measured)}
        if free < need:
            problems.append(f"not enough free space for the restored database in {measured}: {free // 2**20} MiB free, "
                            f"{need // 2**20} MiB needed (database size x margin {args.margin})")
    state = read_state(Path(args.backup_dir)).get(database) or {}
    result["already_restored"] = False
    if live is not None and state.get("oid") == live["oid"] and state.get("backup_id") == info.backup_id:
        live_fp = db_fingerprint.fingerprint(psb.dsn_for(args.dsn, database), jobs=args.fingerprint_jobs,
                                             method=db_fingerprint.method_of(manifest["fingerprints"]))
        result["already_restored"] = not db_fingerprint.compare(manifest["fingerprints"], live_fp)
    result["problems"] = problems
    result["ok"] = not problems
    return result


# --------------------------------------------------------------------------------------------------------------
# compare-live


def compare_live(args: argparse.Namespace, info: store.BackupInfo, database: str, stage: str,
                 conn_factory: db_fingerprint.ConnSource | None = None) -> dict[str, Any]:
    assert info.manifest is not None
    t0 = time.monotonic()
    live = db_fingerprint.fingerprint(conn_factory or psb.dsn_for(args.dsn, database), jobs=args.fingerprint_jobs,
                                      method=db_fingerprint.method_of(info.manifest["fingerprints"]))
    diffs = db_fingerprint.compare(info.manifest["fingerprints"], live)
    decision = judge(diffs, args.writes_blocked, args.accept_data_loss, bool(args.export_dir))
    compared = len(set(live["tables"]) | set(info.manifest["fingerprints"]["tables"]))
    result: dict[str, Any] = {"equal": not diffs, "changed_tables": diffs, "decision": decision,
                              "seconds": round(time.monotonic() - t0, 3), "live": live}
    if args.write_report:
        result["report"], result["text"] = write_report(info.path, stage, info.backup_id, database, diffs, decision,
                                                        args, compared)
    else:
        result["report"], result["text"] = None, db_fingerprint.format_diffs(diffs, compared)
    return result


def cmd_compare_live(args: argparse.Namespace) -> dict[str, Any]:
    psb.check_dsn(args.dsn)
    os.umask(0o077)
    info = backup_for(args)
    assert info.manifest is not None
    database = live_name(args, info.manifest)
    result = compare_live(args, info, database, "precheck")
    del result["live"]
    if result["decision"] == "refuse":
        raise Refused(refusal_message(database, info.backup_id, result["text"], result["report"] or "(not written)"))
    return result


# --------------------------------------------------------------------------------------------------------------
# restore


def cmd_restore(args: argparse.Namespace) -> dict[str, Any]:
    psb.check_dsn(args.dsn)
    info = backup_for(args)
    assert info.manifest is not None
    manifest = info.manifest
    database = live_name(args, manifest)
    pg_restore = store.find_program("pg_restore", args.bin_dir)
    restored = psb.scratch_name(database, "restore", store.utcnow())
    timings: dict[str, float] = {}
    with psb.connect(maintenance(args)) as conn:
        props = psb.database_properties(conn, database) or manifest.get("database_properties")
        if not props:
            raise store.BackupError(f"database {database} does not exist and the manifest has no database properties")
        psb.create_database(conn, restored, props)
        try:
            t0 = time.monotonic()
            store.run_program(
                [pg_restore, f"--jobs={args.jobs}", "--exit-on-error", "--no-password",
                 f"--dbname={psb.dsn_for(args.dsn, restored)}", str(info.path / store.DUMP_DIR)],
                "pg_restore",
            )
            timings["pg_restore_s"] = round(time.monotonic() - t0, 3)
            t0 = time.monotonic()
            fingerprint = db_fingerprint.fingerprint(psb.dsn_for(args.dsn, restored), jobs=args.fingerprint_jobs,
                                                     method=db_fingerprint.method_of(manifest["fingerprints"]))
            timings["fingerprint_s"] = round(time.monotonic() - t0, 3)
            diffs = db_fingerprint.compare(manifest["fingerprints"], fingerprint)
            if diffs:
                text = db_fingerprint.format_diffs(diffs, len(fingerprint["tables"]))
                raise store.BackupError(f"the restored database {restored} does not match backup {info.backup_id}:\n{text}")
            t0 = time.monotonic()
            timings["analyzed_relations"] = analyze(psb.dsn_for(args.dsn, restored), args.jobs)
            timings["analyze_s"] = round(time.monotonic() - t0, 3)
        except BaseException:
            psb.drop_database(conn, restored)
            raise
    return {"changed": True, "id": info.backup_id, "database": database, "restored_db": restored,
            "tables": len(fingerprint["tables"]), "timings": timings}


def analyze(dsn: str, jobs: int) -> int:
    """ANALYZE every relation a database-wide ANALYZE would (tables, materialized views, partitioned tables,
    the catalogs'), largest first, on ``jobs`` connections: pg_restore leaves planner statistics empty, and
    one connection took 3.1 of the 28 s of a 1.95 GiB restore. Returns how many relations were analyzed."""
    with psb.connect(dsn, "pg_snapshot_restore") as conn:
        names = [r[0] for r in conn.execute(
            "SELECT c.oid::regclass::text FROM pg_catalog.pg_class c"
            " WHERE c.relkind IN ('r', 'm', 'p') AND c.relpersistence <> 't' ORDER BY c.relpages DESC, 1").fetchall()]
    pending = list(reversed(names))  # pop() takes the largest first
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with psb.connect(dsn, "pg_snapshot_restore") as conn:
                while not errors:
                    with lock:
                        if not pending:
                            return
                        name = pending.pop()
                    conn.execute(sql.SQL("ANALYZE {}").format(sql.SQL(name)))  # regclass text: already quoted
        except BaseException as exc:  # re-raised in the calling thread
            with lock:
                errors.append(exc)

    db_fingerprint.run_workers(worker, [()] * max(1, min(jobs, len(names))), errors)
    return len(names)


# --------------------------------------------------------------------------------------------------------------
# export: the rows that differ from the backup, kept in files before a restore discards them


def _session(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """Pin the settings that render values as text (as the fingerprints do): ISO dates in UTC, exact floats."""
    for name, value in db_fingerprint.SESSION_SETTINGS.items():
        conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    return conn


def _columns(conn: psycopg.Connection[Any], qualified: str) -> list[str]:
    """Columns a COPY can write (no generated ones), in table order."""
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped"
        " AND attgenerated = '' ORDER BY attnum",
        (qualified,),
    ).fetchall()
    return [r[0] for r in rows]


def _primary_key(conn: psycopg.Connection[Any], qualified: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
        " WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
        (qualified,),
    ).fetchall()
    return [r[0] for r in rows]


def _parents_first(conn: psycopg.Connection[Any], tables: Sequence[str]) -> list[str]:
    """The tables ordered so that a table comes after every table it references (foreign keys among them)."""
    edges = conn.execute(
        "SELECT cn.nspname || '.' || c.relname, pn.nspname || '.' || p.relname FROM pg_constraint k"
        " JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace"
        " JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE k.contype = 'f'"
    ).fetchall()
    graph: dict[str, set[str]] = {t: set() for t in sorted(tables)}
    for child, parent in edges:
        if child in graph and parent in graph and child != parent:
            graph[child].add(parent)
    try:
        return list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:  # a cycle: the transaction's deferred constraints must cope
        return sorted(tables)


def _file_name(index: int, table: str, kind: str) -> str:
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', table)}.{kind}.csv"


def _csv_records(path: Path) -> int:
    with path.open(newline="", encoding="utf-8") as handle:
        return max(sum(1 for _ in csv.reader(handle)) - 1, 0)  # minus the header


def _copy_out(conn: psycopg.Connection[Any], query: sql.Composable, path: Path, form: str = "csv") -> None:
    options = sql.SQL("WITH (FORMAT csv, HEADER true)" if form == "csv" else "")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle, conn.cursor().copy(
        sql.SQL("COPY ({}) TO STDOUT {}").format(query, options)
    ) as copy:
        for chunk in copy:
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())


def export_table(live: psycopg.Connection[Any], scratch: psycopg.Connection[Any], name: str, index: int, out: Path,
                 rows_backup: int, rows_live: int) -> dict[str, Any]:
    """Rows of one table that differ between the live database and the restored backup, written to out.

    The live rows (the columns both have) are copied into a temporary table of the restored database's session,
    and compared there with the backup's rows: by primary key (inserted, updated, deleted), or, for a table
    without one, as multisets (added, removed). Nothing is written to either database.
    """
    schema, table = name.split(".", 1)
    qualified = sql.Identifier(schema, table).as_string(scratch)
    backup_columns, live_columns = _columns(scratch, qualified), _columns(live, qualified)
    columns = [c for c in backup_columns if c in live_columns]
    key = _primary_key(scratch, qualified)
    if not set(key) <= set(columns):
        key = []
    ident = sql.Identifier(schema, table)
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    live_tmp, rows_tmp, del_tmp = (sql.Identifier(f"djm_{kind}_{index:02d}") for kind in ("live", "rows", "deleted"))
    scratch.execute(sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM ONLY {} WITH NO DATA").format(live_tmp, cols, ident))
    with live.cursor().copy(sql.SQL("COPY (SELECT {} FROM ONLY {}) TO STDOUT").format(cols, ident)) as source, \
            scratch.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(live_tmp, cols)) as target:
        for chunk in source:
            target.write(chunk)
    scratch.execute(sql.SQL("ANALYZE {}").format(live_tmp))

    def as_text(alias: str) -> sql.Composable:
        return sql.SQL(", ").join(sql.SQL("{}.{}::text").format(sql.Identifier(alias), sql.Identifier(c)) for c in columns)

    if key:
        same_key = sql.SQL(" AND ").join(
            sql.SQL("l.{0} = b.{0}").format(sql.Identifier(c)) for c in key)
        scratch.execute(sql.SQL(
            "CREATE TEMP TABLE {rows} AS SELECT l.*, b.{k0} IS NULL AS djm_new FROM {live} l LEFT JOIN ONLY {t} b ON {on}"
            " WHERE b.{k0} IS NULL OR ROW({lt}) IS DISTINCT FROM ROW({bt})").format(
                rows=rows_tmp, k0=sql.Identifier(key[0]), live=live_tmp, t=ident, on=same_key, lt=as_text("l"),
                bt=as_text("b")))
        scratch.execute(sql.SQL(
            "CREATE TEMP TABLE {d} AS SELECT {k} FROM ONLY {t} b WHERE NOT EXISTS (SELECT 1 FROM {live} l WHERE {on})").format(
                d=del_tmp, k=sql.SQL(", ").join(sql.SQL("b.{}").format(sql.Identifier(c)) for c in key), t=ident,
                live=live_tmp, on=same_key))
        counts = scratch.execute(sql.SQL(
            "SELECT (SELECT count(*) FILTER (WHERE djm_new) FROM {r}), (SELECT count(*) FILTER (WHERE NOT djm_new) FROM {r}),"
            " (SELECT count(*) FROM {d})").format(r=rows_tmp, d=del_tmp)).fetchone()
        order = sql.SQL(", ").join(map(sql.Identifier, key))
        rows_query = sql.SQL("SELECT {} FROM {} ORDER BY {}").format(cols, rows_tmp, order)
        del_query = sql.SQL("SELECT * FROM {} ORDER BY {}").format(del_tmp, order)
    else:  # as multisets of text rows: what was added, what was removed
        text_cols = sql.SQL(", ").join(sql.SQL("{0}::text AS {0}").format(sql.Identifier(c)) for c in columns)
        scratch.execute(sql.SQL("CREATE TEMP TABLE {r} AS SELECT {tc} FROM {live} EXCEPT ALL SELECT {tc} FROM ONLY {t}").format(
            r=rows_tmp, tc=text_cols, live=live_tmp, t=ident))
        scratch.execute(sql.SQL("CREATE TEMP TABLE {d} AS SELECT {tc} FROM ONLY {t} EXCEPT ALL SELECT {tc} FROM {live}").format(
            d=del_tmp, tc=text_cols, live=live_tmp, t=ident))
        counts = scratch.execute(sql.SQL("SELECT (SELECT count(*) FROM {r}), 0, (SELECT count(*) FROM {d})").format(
            r=rows_tmp, d=del_tmp)).fetchone()
        rows_query = sql.SQL("SELECT * FROM {}").format(rows_tmp)
        del_query = sql.SQL("SELECT * FROM {}").format(del_tmp)
    assert counts is not None
    inserted, updated, deleted = (int(n) for n in counts)
    entry: dict[str, Any] = {
        "table": name, "columns": columns, "primary_key": key, "inserted": inserted, "updated": updated,
        "deleted": deleted, "rows_backup": rows_backup, "rows_live": rows_live, "files": {},
        "columns_only_live": [c for c in live_columns if c not in backup_columns],
        "columns_only_backup": [c for c in backup_columns if c not in live_columns],
    }
    if rows_live != rows_backup + inserted - deleted:
        raise store.BackupError(f"export of {name}: {rows_live} live rows, but the backup's {rows_backup} + {inserted} "
                                f"new - {deleted} gone do not add up: not exported")
    for kind, count, query in (("rows", inserted + updated, rows_query),
                               ("deleted" if key else "removed", deleted, del_query)):
        if count == 0:
            continue
        file_name = _file_name(index, name, kind)
        _copy_out(scratch, query, out / file_name)
        written = _csv_records(out / file_name)
        if written != count:
            raise store.BackupError(f"export of {name}: {file_name} holds {written} rows, {count} expected")
        entry["files"][kind] = file_name
        if kind != "removed":  # the same rows in COPY's text format, inlined into apply.sql (then removed)
            _copy_out(scratch, query, out / f".{file_name}.copy", "text")
    for tmp in (live_tmp, rows_tmp, del_tmp):
        scratch.execute(sql.SQL("DROP TABLE {}").format(tmp))
    entry["apply"] = apply_statements(scratch, entry, index)
    return entry


def apply_statements(conn: psycopg.Connection[Any], entry: dict[str, Any], index: int) -> dict[str, str]:
    """The SQL that re-applies one table's export (apply.sql and apply-export run the same statements)."""
    schema, table = entry["table"].split(".", 1)
    ident, key, columns = sql.Identifier(schema, table), entry["primary_key"], entry["columns"]
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    rows_tmp, del_tmp = sql.Identifier(f"djm_rows_{index:02d}"), sql.Identifier(f"djm_deleted_{index:02d}")
    statements: dict[str, sql.Composable] = {}
    if "rows" in entry["files"]:
        statements["load_rows"] = sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM ONLY {} WITH NO DATA").format(
            rows_tmp, cols, ident)
        statements["copy_rows"] = sql.SQL("{} ({})").format(rows_tmp, cols)
        # Existing rows are updated and new ones inserted, in two statements: an INSERT ... ON CONFLICT would check
        # the NOT NULL of a column the live table no longer had (the backup's value stays) before the conflict.
        others = [c for c in columns if c not in key]
        same_key = sql.SQL(" AND ").join(sql.SQL("t.{0} = r.{0}").format(sql.Identifier(c)) for c in key)
        if key and others:
            statements["update"] = sql.SQL("UPDATE ONLY {} t SET {} FROM {} r WHERE {}").format(
                ident, sql.SQL(", ").join(sql.SQL("{0} = r.{0}").format(sql.Identifier(c)) for c in others), rows_tmp,
                same_key)
        new_only = sql.SQL(" WHERE NOT EXISTS (SELECT 1 FROM ONLY {} t WHERE {})").format(ident, same_key) if key else sql.SQL("")
        statements["insert"] = sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} r{}").format(
            ident, cols, sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in columns), rows_tmp, new_only)
    if "deleted" in entry["files"]:
        kcols = sql.SQL(", ").join(map(sql.Identifier, key))
        statements["load_deleted"] = sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM ONLY {} WITH NO DATA").format(
            del_tmp, kcols, ident)
        statements["copy_deleted"] = sql.SQL("{} ({})").format(del_tmp, kcols)
        statements["delete"] = sql.SQL("DELETE FROM ONLY {} t USING {} d WHERE {}").format(
            ident, del_tmp, sql.SQL(" AND ").join(sql.SQL("t.{0} = d.{0}").format(sql.Identifier(c)) for c in key))
    return {name: statement.as_string(conn) for name, statement in statements.items()}


def advance_sequences(live: psycopg.Connection[Any], scratch: psycopg.Connection[Any]) -> list[str]:
    """Set every sequence of the restored database at least where the live one is: ids handed out since the
    backup (and now in the export) are never handed out again. Sequences are not part of the fingerprints."""
    query = "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), last_value FROM pg_sequences"
    live_values = {name: value for name, value in live.execute(query).fetchall() if value is not None}
    advanced = []
    for name, value in scratch.execute(query).fetchall():
        if name in live_values and (value is None or live_values[name] > value):
            scratch.execute("SELECT setval(%s::regclass, %s, true)", (name, live_values[name]))
            advanced.append(name)
    return advanced


def write_apply_script(manifest: dict[str, Any], out: Path) -> None:
    """apply.sql: the export re-applied with psql in one transaction, the rows inlined (COPY ... FROM STDIN, as
    pg_dump writes them), so that psql needs to read nothing but the script, from wherever it runs."""
    lines = render_apply_script(manifest).splitlines(keepends=True)
    fd = os.open(out / APPLY_SCRIPT, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        for line in lines:
            if not line.startswith("\\copy "):
                handle.write(line.encode())
                continue
            target, source = line[len("\\copy "):].split(" FROM '", 1)
            data = out / f".{source.split(chr(39), 1)[0]}.copy"
            handle.write(f"COPY {target} FROM STDIN;\n".encode())
            with data.open("rb") as rows:
                shutil.copyfileobj(rows, handle)
            handle.write(b"\\.\n")
            data.unlink()
        handle.flush()
        os.fsync(handle.fileno())


def render_apply_script(manifest: dict[str, Any]) -> str:
    """The statements of apply.sql, with a psql \\copy line where the rows of a file go."""
    tables = manifest["tables"]
    order = manifest["apply_order"]
    lines = [
        f"-- Rows of {manifest['database']} that differed from backup {manifest['backup_id']} when it was restored",
        f"-- (exported {manifest['exported_at']}, {manifest['rows']} rows in {len(tables)} tables; export.json has the details).",
        "-- Updated rows are updated and inserted rows inserted, by primary key (the columns the live and the backed-up",
        "-- table had in common; a column only the backup has keeps its value), deleted rows deleted again; a table",
        "-- without a primary key gets its added rows inserted, its removed rows are only listed (*.removed.csv).",
        "-- One transaction: all or nothing. Review before running:",
        "-- rows a failed migration rewrote are rows that differ too. The rows are inlined; on the database host:",
        f"--   sudo sh -c 'cd / && runuser -u postgres -- psql -X -d {manifest['database']} < <this directory>/{APPLY_SCRIPT}'",
        "\\set ON_ERROR_STOP on",
        "BEGIN;",
        "SET CONSTRAINTS ALL DEFERRED;",
    ]
    for name in order:
        entry = tables[name]
        for kind in ("rows", "deleted"):
            if kind in entry["files"]:
                lines.append(entry["apply"][f"load_{kind}"] + ";")
                target, source = entry["apply"][f"copy_{kind}"], entry["files"][kind]
                lines.append(f"\\copy {target} FROM '{source}' WITH (FORMAT csv, HEADER true)")
    lines += [tables[name]["apply"]["delete"] + ";" for name in reversed(order) if "delete" in tables[name]["apply"]]
    for name in order:
        lines += [tables[name]["apply"][step] + ";" for step in ("update", "insert") if step in tables[name]["apply"]]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    psb.check_dsn(args.dsn)
    os.umask(0o077)
    if not args.export_dir or not args.restored_db:
        raise store.BackupError("export needs --export-dir and --restored-db")
    info = backup_for(args)
    assert info.manifest is not None
    database = live_name(args, info.manifest)
    out = Path(args.export_dir)
    partial = out.with_name(out.name + ".partial")
    t0 = time.monotonic()
    with psb.connect(maintenance(args)) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (args.restored_db,)).fetchone() is None:
            raise store.BackupError(f"restored database {args.restored_db} does not exist: run the restore step first")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(mode=0o700, parents=True)
    with _session(psb.connect(psb.dsn_for(args.dsn, database), "pg_snapshot_restore")) as live, \
            _session(psb.connect(psb.dsn_for(args.dsn, args.restored_db), "pg_snapshot_restore")) as scratch:
        live.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot_row = live.execute("SELECT pg_export_snapshot()").fetchone()
        assert snapshot_row is not None
        fingerprint = db_fingerprint.fingerprint(psb.dsn_for(args.dsn, database), snapshot=snapshot_row[0],
                                                 jobs=args.fingerprint_jobs,
                                                 method=db_fingerprint.method_of(info.manifest["fingerprints"]))
        backup_tables = info.manifest["fingerprints"]["tables"]
        diffs = db_fingerprint.compare(info.manifest["fingerprints"], fingerprint)
        tables: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for index, diff in enumerate(diffs, start=1):
            name = diff["table"]
            if db_fingerprint._selected(name, args.export_exclude):
                skipped[name] = "excluded (--export-exclude)"
            elif diff["status"] == "only_in_b":
                skipped[name] = "created after the backup: not in the backup's schema (its rows stay in the replaced database)"
            elif diff["status"] == "only_in_a":
                skipped[name] = "dropped after the backup: no live rows to export"
            else:
                tables[name] = export_table(live, scratch, name, index, partial, backup_tables[name]["rows"],
                                            fingerprint["tables"][name]["rows"])
        sequences = advance_sequences(live, scratch)
        order = _parents_first(scratch, list(tables))
        live.execute("COMMIT")
    manifest = {
        "backup_id": info.backup_id, "database": database, "restored_db": args.restored_db,
        "exported_at": store.isotime(store.utcnow()), "tables": tables, "skipped": skipped, "apply_order": order,
        "rows": sum(t["inserted"] + t["updated"] + t["deleted"] for t in tables.values()),
        "sequences_advanced": sequences, "live_fingerprint": fingerprint, "verified": True,
    }
    write_apply_script(manifest, partial)
    store.write_json(partial / EXPORT_MANIFEST, manifest)
    if out.exists():  # an earlier export for this restore is kept beside the new one, never overwritten
        out.rename(out.with_name(f"{out.name}.replaced-{store.stamp(store.utcnow())}"))
    partial.rename(out)
    summary = {name: {k: t[k] for k in ("inserted", "updated", "deleted", "primary_key", "files", "columns_only_live",
                                        "columns_only_backup")} for name, t in tables.items()}
    return {"changed": True, "id": info.backup_id, "database": database, "export_dir": str(out), "tables": summary,
            "skipped": skipped, "rows": manifest["rows"], "sequences_advanced": sequences, "verified": True,
            "seconds": round(time.monotonic() - t0, 3), "text": export_text(manifest, str(out))}


def export_text(manifest: dict[str, Any], where: str) -> str:
    parts = [f"{name} +{t['inserted']} ~{t['updated']} -{t['deleted']}" for name, t in sorted(manifest["tables"].items())]
    text = f"exported {manifest['rows']} rows of {len(parts)} tables to {where}" + (": " + ", ".join(parts) if parts else "")
    if manifest["skipped"]:
        text += "; not exported: " + ", ".join(f"{n} ({why})" for n, why in sorted(manifest["skipped"].items()))
    return text


def check_export(out: Path, backup_id: str, database: str, live: dict[str, Any]) -> dict[str, Any]:
    """The export in out is of this backup and database, verified, and the live database has not changed since."""
    try:
        manifest = json.loads((out / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Refused(f"no usable export in {out} ({exc}): run the export step before the swap") from exc
    if manifest.get("backup_id") != backup_id or manifest.get("database") != database or not manifest.get("verified"):
        raise Refused(f"the export in {out} is not a verified export of {database} against backup {backup_id}")
    since = db_fingerprint.compare(manifest["live_fingerprint"], live)
    if since:
        raise Refused(f"the live database {database} changed after the export in {out} was taken; these writes would be "
                      f"lost:\n{db_fingerprint.format_diffs(since, len(live['tables']))}Block writes and export again.")
    return {"dir": str(out), "rows": manifest["rows"], "tables": {n: {k: t[k] for k in ("inserted", "updated", "deleted")}
                                                                   for n, t in manifest["tables"].items()},
            "skipped": manifest["skipped"], "text": export_text(manifest, str(out))}


def cmd_apply_export(args: argparse.Namespace) -> dict[str, Any]:
    """Re-apply an export onto --database, in one transaction: what apply.sql does, without psql."""
    psb.check_dsn(args.dsn)
    out = Path(args.export_dir)
    manifest = json.loads((out / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    tables, order = manifest["tables"], manifest["apply_order"]
    with psycopg.connect(psb.dsn_for(args.dsn, args.database), application_name="pg_snapshot_restore") as conn:
        _session(conn)
        conn.execute("SET CONSTRAINTS ALL DEFERRED")
        for name in order:
            entry = tables[name]
            for kind in ("rows", "deleted"):
                if kind not in entry["files"]:
                    continue
                conn.execute(entry["apply"][f"load_{kind}"])
                with (out / entry["files"][kind]).open("rb") as handle, conn.cursor().copy(
                        f"COPY {entry['apply'][f'copy_{kind}']} FROM STDIN WITH (FORMAT csv, HEADER true)") as copy:
                    while chunk := handle.read(1 << 20):
                        copy.write(chunk)
        for name in reversed(order):
            if "delete" in tables[name]["apply"]:
                conn.execute(tables[name]["apply"]["delete"])
        for name in order:
            for step in ("update", "insert"):
                if step in tables[name]["apply"]:
                    conn.execute(tables[name]["apply"][step])
        conn.commit()
    not_applied = sum(t["deleted"] for t in tables.values() if not t["primary_key"])
    return {"changed": True, "database": args.database, "export_dir": str(out), "rows": manifest["rows"] - not_applied,
            "not_applied": not_applied}


# --------------------------------------------------------------------------------------------------------------
# swap


def set_allow_connections(conn: psycopg.Connection[Any], database: str, allow: bool) -> None:
    conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(sql.Identifier(database), sql.Literal(allow)))


def terminate_others(conn: psycopg.Connection[Any], database: str, keep: Sequence[int], timeout: float) -> int:
    """Terminate every session on database except ours; wait until they are gone. Returns how many were terminated."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> ALL(%s)",
        (database, list(keep)),
    ).fetchall()
    deadline = time.monotonic() + timeout
    while True:
        left = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> ALL(%s)", (database, list(keep))
        ).fetchone()
        if not left or left[0] == 0:
            return len(rows)
        if time.monotonic() > deadline:
            raise store.BackupError(f"{left[0]} sessions on {database} did not end within {timeout:g}s of pg_terminate_backend")
        time.sleep(0.2)


def record_state(backup_dir: Path, database: str, entry: dict[str, Any]) -> None:
    state = read_state(backup_dir)
    state[database] = entry
    store.write_json(backup_dir / STATE_FILE, state)


def cmd_swap(args: argparse.Namespace) -> dict[str, Any]:
    psb.check_dsn(args.dsn)
    os.umask(0o077)
    info = backup_for(args)
    assert info.manifest is not None
    database = live_name(args, info.manifest)
    restored = args.restored_db
    moment = store.utcnow()
    failed = psb.scratch_name(database, "failed", moment)
    result: dict[str, Any] = {"changed": True, "id": info.backup_id, "database": database, "restored_db": restored}
    t0 = time.monotonic()
    with psb.connect(maintenance(args)) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (restored,)).fetchone() is None:
            raise store.BackupError(f"restored database {restored} does not exist: run the restore step first")
        live = psb.database_properties(conn, database)
        if live is None:  # nothing to replace: the restored database simply takes the name
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(restored), sql.Identifier(database)))
            result.update(failed_db=None, report=None, changed_tables=[], decision="none")
        else:
            allow_before = live["allow_connections"]
            # Our fingerprint connections are opened before connections are blocked, then everyone else is terminated:
            # the comparison sees the final state of the live database, and nobody can write after it.
            pool = [psb.connect(psb.dsn_for(args.dsn, database), "pg_snapshot_restore") for _ in range(args.fingerprint_jobs)]
            blocked = False
            swapped = False
            try:
                pids = [c.info.backend_pid for c in pool]
                set_allow_connections(conn, database, False)
                blocked = True
                result["terminated_sessions"] = terminate_others(conn, database, pids, args.terminate_timeout)
                handed = list(pool)

                def factory() -> psycopg.Connection[Any]:
                    if not handed:
                        raise store.BackupError("internal: more fingerprint connections requested than opened")
                    return handed.pop()

                compared = compare_live(args, info, database, "swap", factory)
                result.update(report=compared["report"], changed_tables=compared["changed_tables"],
                              decision=compared["decision"], compare_seconds=compared["seconds"], text=compared["text"])
                if compared["decision"] == "refuse":
                    raise Refused(refusal_message(database, info.backup_id, compared["text"], compared["report"]))
                if compared["decision"] == "export":
                    result["export"] = check_export(Path(args.export_dir), info.backup_id, database, compared["live"])
                for c in pool:
                    c.close()
                conn.execute("BEGIN")
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(database), sql.Identifier(failed)))
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(restored), sql.Identifier(database)))
                set_allow_connections(conn, database, allow_before)
                set_allow_connections(conn, failed, allow_before)
                conn.execute("COMMIT")
                swapped = True
                result["failed_db"] = failed
            finally:
                for c in pool:
                    c.close()
                if blocked and not swapped:
                    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        conn.execute("ROLLBACK")
                    set_allow_connections(conn, database, allow_before)
        new_oid = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (database,)).fetchone()
    assert new_oid is not None
    record_state(Path(args.backup_dir), database, {
        "oid": int(new_oid[0]), "backup_id": info.backup_id, "restored_at": store.isotime(moment),
        "failed_db": result.get("failed_db"), "report": result.get("report"),
    })
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result


# --------------------------------------------------------------------------------------------------------------
# cleanup / failed-retention


def cmd_cleanup(args: argparse.Namespace) -> dict[str, Any]:
    """After a failure before the swap: drop this run's scratch database and let clients into the live one again."""
    psb.check_dsn(args.dsn)
    done: list[str] = []
    with psb.connect(maintenance(args)) as conn:
        if args.restored_db and conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (args.restored_db,)).fetchone():
            psb.drop_database(conn, args.restored_db)
            done.append(f"dropped {args.restored_db}")
        row = conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (args.database,)).fetchone()
        if args.allow_connections and row is not None and not row[0]:
            set_allow_connections(conn, args.database, True)
            done.append(f"re-allowed connections to {args.database}")
    return {"changed": bool(done), "done": done}


def cmd_failed_retention(args: argparse.Namespace) -> dict[str, Any]:
    psb.check_dsn(args.dsn)
    if args.keep < 0:
        raise store.BackupError("keep must be 0 or more")
    pattern = re.compile(re.escape(args.database) + FAILED_PATTERN)
    with psb.connect(maintenance(args)) as conn:
        names = sorted((r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall() if pattern.match(r[0])),
                       reverse=True)
        keep, drop = names[: args.keep], names[args.keep :]
        if not args.dry_run:
            for name in drop:
                conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    return {"changed": bool(drop), "keep": keep, "drop": drop, "dry_run": args.dry_run}


# --------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pg_snapshot_restore.py", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, backup: bool = True) -> None:
        p.add_argument("--dsn", default="", help="libpq connection string (its dbname is ignored), no password")
        p.add_argument("--maintenance-db", default="postgres", help="database to connect to for CREATE/ALTER/DROP DATABASE")
        p.add_argument("--database", default="", help="live database name (default: the manifest's)")
        if backup:
            p.add_argument("--backup-dir", required=True)
            p.add_argument("--id", default="", help="backup id (default: the newest verified)")
            p.add_argument("--bin-dir", default="", help="PostgreSQL bin directory (default: newest installed)")
            p.add_argument("--jobs", type=int, default=2, help="pg_restore -j and checksum threads")
            p.add_argument("--fingerprint-jobs", type=int, default=2)
            p.add_argument("--writes-blocked", action="store_true", help="writes were blocked since the backup")
            p.add_argument("--accept-data-loss", action="store_true", help="discard writes made after the backup")
            p.add_argument("--write-report", action="store_true", help="write the live comparison report next to the backup")
            p.add_argument("--export-dir", default="",
                           help="export the rows written since the backup here (export); they count as kept (compare-live, swap)")

    chk = sub.add_parser("check", help="pick and re-verify the backup; read-only")
    common(chk)
    chk.add_argument("--margin", type=float, default=1.2, help="free space needed = database size x margin")
    cmp_ = sub.add_parser("compare-live", help="compare the live database with the backup; exit 3 to refuse")
    common(cmp_)
    rst = sub.add_parser("restore", help="restore into a new database and check its fingerprints")
    common(rst)
    swp = sub.add_parser("swap", help="replace the live database by the restored one")
    common(swp)
    swp.add_argument("--restored-db", required=True)
    swp.add_argument("--terminate-timeout", type=float, default=30.0)
    exp = sub.add_parser("export", help="export the rows that differ from the backup, before a restore discards them")
    common(exp)
    exp.add_argument("--restored-db", default="", help="the restored database (from the restore step) to compare with")
    exp.add_argument("--export-exclude", action="append", default=[], metavar="T",
                     help="tables not to export: schema.table or table, fnmatch patterns (repeatable)")
    app = sub.add_parser("apply-export", help="re-apply an export onto --database in one transaction")
    common(app, backup=False)
    app.add_argument("--export-dir", required=True)
    cln = sub.add_parser("cleanup", help="drop the scratch database, re-allow connections")
    common(cln, backup=False)
    cln.add_argument("--restored-db", default="")
    cln.add_argument("--allow-connections", action="store_true", help="re-allow connections to the live database")
    ret = sub.add_parser("failed-retention", help="keep the newest N <db>__failed_* databases")
    common(ret, backup=False)
    ret.add_argument("--keep", type=int, default=2)
    ret.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.command in ("cleanup", "failed-retention", "apply-export") and not args.database:
        parser.error("--database is required")
    return args


COMMANDS = {
    "check": cmd_check,
    "compare-live": cmd_compare_live,
    "restore": cmd_restore,
    "export": cmd_export,
    "swap": cmd_swap,
    "apply-export": cmd_apply_export,
    "cleanup": cmd_cleanup,
    "failed-retention": cmd_failed_retention,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result, code = COMMANDS[args.command](args), 0
    except Refused as exc:
        result, code = {"failed": True, "refused": True, "error": str(exc)}, EXIT_REFUSED
    except (store.BackupError, db_fingerprint.FingerprintError) as exc:
        result, code = {"failed": True, "error": str(exc)}, 1
    except (psycopg.Error, OSError) as exc:
        result, code = {"failed": True, "error": f"{type(exc).__name__}: {str(exc).strip()}"}, 1
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    if code:
        sys.stderr.write(f"pg_snapshot_restore {args.command}: {result['error']}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
