#!/usr/bin/env python3
"""Snapshot-consistent, verified pg_dump backups (the program behind the pg_backup role).

Runs on the database host as the PostgreSQL OS user (peer authentication; no password is ever put on a
command line). The shipped copy lives next to db_fingerprint.py, which it imports.

The preflight checks and the backup directory's layout live in pg_backup_store.py (standard library only).

Commands (each prints one JSON document on stdout):
    backup     export a snapshot, fingerprint every table inside it, pg_dump -Fd --snapshot from it,
               write manifest.json with sha256 of every file, rename <id>.partial/ to <id>/
    verify     checksums, pg_restore --list, optionally a full test restore whose fingerprints must
               equal the manifest's; records verified.json next to the manifest
    retention  delete old verified backups (keep the last N, those younger than D days, the newest,
               and the one an in-progress migration marker names)
    progress   the bytes a running backup has written so far (in <id>.partial/), and whether the
               background job running it (ansible's async job file) has finished; reads only

Layout of a backup directory:
    <backup-dir>/<id>/manifest.json     what was dumped: versions, times, sizes, sha256 of every file,
                                        fingerprints, migration rows, release id
    <backup-dir>/<id>/verified.json     verification result (sha256 of the manifest it verified)
    <backup-dir>/<id>/dump/             pg_dump -Fd output
Exit codes: 0 success, 1 failure (message in the JSON "error" field and on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import db_fingerprint
import psycopg
from pg_backup_store import (
    DELETING_SUFFIX,
    DUMP_DIR,
    MANIFEST,
    NAMEDATALEN,
    PARTIAL_SUFFIX,
    VERIFIED,
    BackupError,
    BackupInfo,
    check_id,
    checksum_files,
    directory_lock,
    dump_files,
    find_program,
    fsync_path,
    inspect,
    isotime,
    list_backups,
    manifest_sha256,
    program_version,
    run_program,
    stamp,
    utcnow,
    verify_checksums,
    version_major,
    write_json,
)
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

MANIFEST_FORMAT = 1
# GUCs whose value is a list: ALTER DATABASE ... SET must get them as separate literals (as pg_dump does).
LIST_GUCS = {
    "search_path",
    "temp_tablespaces",
    "session_preload_libraries",
    "local_preload_libraries",
    "shared_preload_libraries",
}


def check_dsn(dsn: str) -> str:
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise BackupError(f"unparsable connection string: {exc}") from exc
    if "password" in params:
        raise BackupError("the connection string carries a password: use peer authentication or a .pgpass file (PGPASSFILE)")
    return dsn


def dsn_for(dsn: str, dbname: str) -> str:
    return make_conninfo(dsn, dbname=dbname)


def connect(dsn: str, application: str = "pg_snapshot_backup") -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True, application_name=application)
    except psycopg.Error as exc:
        raise BackupError(f"cannot connect ({db_fingerprint.redact_dsn(dsn)}): {str(exc).strip()}") from exc


# --------------------------------------------------------------------------------------------------------------
# PostgreSQL client programs


# --------------------------------------------------------------------------------------------------------------
# Files


# --------------------------------------------------------------------------------------------------------------
# Backups on disk


# --------------------------------------------------------------------------------------------------------------
# Database facts


def database_properties(conn: psycopg.Connection[Any], dbname: str) -> dict[str, Any] | None:
    """What CREATE DATABASE needs to recreate dbname with the same owner, locale, grants and settings."""
    version = conn.info.server_version
    icu = "datlocale" if version >= 170000 else ("daticulocale" if version >= 150000 else "NULL")
    provider = "datlocprovider" if version >= 150000 else "'c'"
    row = conn.execute(
        sql.SQL(
            """
            SELECT d.oid, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate, d.datctype,
                   {provider}::text, {icu}::text, d.datconnlimit, d.datallowconn, t.spcname,
                   shobj_description(d.oid, 'pg_database')
              FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace
             WHERE d.datname = %s
            """
        ).format(provider=sql.SQL(provider), icu=sql.SQL(icu)),
        (dbname,),
    ).fetchone()
    if row is None:
        return None
    oid = row[0]
    acl = conn.execute(
        """
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable
          FROM pg_database d, aclexplode(d.datacl) a
         WHERE d.oid = %s ORDER BY 1, 2
        """,
        (oid,),
    ).fetchall()
    has_acl = conn.execute("SELECT datacl IS NOT NULL FROM pg_database WHERE oid = %s", (oid,)).fetchone()
    settings = conn.execute(
        """
        SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, s.setconfig
          FROM pg_db_role_setting s WHERE s.setdatabase = %s ORDER BY 1 NULLS FIRST
        """,
        (oid,),
    ).fetchall()
    return {
        "oid": int(oid),
        "owner": row[1],
        "encoding": row[2],
        "lc_collate": row[3],
        "lc_ctype": row[4],
        "locale_provider": row[5],
        "icu_locale": row[6],
        "connection_limit": int(row[7]),
        "allow_connections": bool(row[8]),
        "tablespace": row[9],
        "comment": row[10],
        "acl": [{"grantee": g, "privilege": p, "grantable": bool(o)} for g, p, o in acl] if has_acl and has_acl[0] else None,
        "settings": [{"role": r, "config": list(c)} for r, c in settings],
    }


def create_database(conn: psycopg.Connection[Any], name: str, props: dict[str, Any]) -> None:
    """CREATE DATABASE name like props (owner, locale, tablespace, connection limit, grants, settings, comment)."""
    options = [
        sql.SQL("OWNER = {}").format(sql.Identifier(props["owner"])),
        sql.SQL("TEMPLATE = template0"),
        sql.SQL("ENCODING = {}").format(sql.Literal(props["encoding"])),
        sql.SQL("LC_COLLATE = {}").format(sql.Literal(props["lc_collate"])),
        sql.SQL("LC_CTYPE = {}").format(sql.Literal(props["lc_ctype"])),
        sql.SQL("TABLESPACE = {}").format(sql.Identifier(props["tablespace"])),
        sql.SQL("CONNECTION LIMIT = {}").format(sql.Literal(props["connection_limit"])),
    ]
    if props.get("locale_provider") == "i" and props.get("icu_locale"):
        options += [sql.SQL("LOCALE_PROVIDER = icu"), sql.SQL("ICU_LOCALE = {}").format(sql.Literal(props["icu_locale"]))]
    conn.execute(sql.SQL("CREATE DATABASE {} ").format(sql.Identifier(name)) + sql.SQL(" ").join(options))
    ident = sql.Identifier(name)
    if props.get("acl") is not None:
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(ident, sql.Identifier(props["owner"])))
        for item in props["acl"]:
            grantee = sql.SQL("PUBLIC") if item["grantee"] == "PUBLIC" else sql.Identifier(item["grantee"])
            grant = sql.SQL("GRANT {} ON DATABASE {} TO {}").format(sql.SQL(item["privilege"]), ident, grantee)
            if item["grantable"]:
                grant += sql.SQL(" WITH GRANT OPTION")
            conn.execute(grant)
    for setting in props.get("settings") or []:
        target = sql.SQL("ALTER DATABASE {}").format(ident)
        if setting["role"]:
            target = sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(setting["role"]), ident)
        for item in setting["config"]:
            key, _, value = item.partition("=")
            if key.lower() in LIST_GUCS:
                values = [v.strip().strip('"') for v in value.split(",") if v.strip()]
                literal = sql.SQL(", ").join(sql.Literal(v) for v in values)
            else:
                literal = sql.Literal(value)
            conn.execute(target + sql.SQL(" SET {} TO ").format(sql.Identifier(key)) + literal)
    if props.get("comment"):
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(props["comment"])))


def drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    force = sql.SQL(" WITH (FORCE)") if conn.info.server_version >= 130000 else sql.SQL("")
    if conn.info.server_version < 130000:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)) + force)


def scratch_name(dbname: str, kind: str, moment: datetime.datetime) -> str:
    suffix = f"__{kind}_{stamp(moment)}"
    return dbname[: NAMEDATALEN - len(suffix)] + suffix


def migration_rows(conn: psycopg.Connection[Any], table: str) -> dict[str, Any] | None:
    """Rows of the migrations table (e.g. django_migrations), ordered by its first column; None if absent."""
    if not table:
        return None
    row = conn.execute("SELECT to_regclass(%s)::text", (table,)).fetchone()
    if row is None or row[0] is None:
        return None
    parts = table.split(".")
    query = sql.SQL("SELECT coalesce(json_agg(t), '[]'::json) FROM (SELECT * FROM {} ORDER BY 1) AS t").format(
        sql.Identifier(*parts)
    )
    rows = conn.execute(query).fetchone()
    return {"table": table, "rows": rows[0] if rows else []}


# backup


def take_backup(args: argparse.Namespace) -> dict[str, Any]:
    """The dump itself: snapshot, fingerprints, pg_dump, checksums, manifest, rename. Caller holds the lock."""
    backup_dir = Path(args.backup_dir)
    backup_id = check_id(args.id)
    info = inspect(backup_dir, backup_id)
    if info is not None and info.state in ("complete", "verified"):
        return {"changed": False, "state": info.state, "id": backup_id, "path": str(info.path)}
    if info is not None and info.state == "incomplete":
        raise BackupError(
            f"{info.path} exists without a readable {MANIFEST}: it is not a backup this program finished; move it away"
        )
    partial = backup_dir / (backup_id + PARTIAL_SUFFIX)
    cleaned = partial.exists()
    if cleaned:
        shutil.rmtree(partial)
    final = backup_dir / backup_id
    pg_dump = find_program("pg_dump", args.bin_dir)
    dump_version = program_version(pg_dump)
    partial.mkdir(mode=0o700)
    timings: dict[str, float] = {}
    try:
        started = utcnow()
        with connect(args.dsn) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot_row = conn.execute("SELECT pg_export_snapshot()").fetchone()
            assert snapshot_row is not None
            snapshot = snapshot_row[0]
            row = conn.execute(
                "SELECT current_database(), current_setting('server_version'), current_setting('server_version_num')::int,"
                " pg_database_size(current_database())"
            ).fetchone()
            assert row is not None
            database, server_version, version_num, db_size = row
            if version_major(dump_version) < version_num // 10000:
                raise BackupError(f"pg_dump {dump_version} is older than the server {server_version}")
            migrations = migration_rows(conn, args.migrations_table)
            t0 = time.monotonic()
            fingerprints = db_fingerprint.fingerprint(args.dsn, snapshot=snapshot, jobs=args.fingerprint_jobs)
            timings["fingerprint_s"] = round(time.monotonic() - t0, 3)
            t0 = time.monotonic()
            run_program(
                [
                    pg_dump,
                    "--format=directory",
                    f"--jobs={args.jobs}",
                    f"--compress={args.compress}",
                    f"--snapshot={snapshot}",
                    f"--lock-wait-timeout={args.lock_wait_timeout}",
                    "--no-password",
                    f"--file={partial / DUMP_DIR}",
                    f"--dbname={args.dsn}",
                ],
                "pg_dump",
            )
            timings["dump_s"] = round(time.monotonic() - t0, 3)
            props = database_properties(conn, database)
            conn.execute("COMMIT")
        finished = utcnow()
        t0 = time.monotonic()
        files = checksum_files(partial, dump_files(partial), args.jobs)
        timings["checksum_s"] = round(time.monotonic() - t0, 3)
        manifest = {
            "format": MANIFEST_FORMAT,
            "backup_id": backup_id,
            "release_id": args.release_id,
            "host": socket.getfqdn(),
            "database": database,
            "database_properties": props,
            "server_version": server_version,
            "server_version_num": version_num,
            "pg_dump": pg_dump,
            "pg_dump_version": dump_version,
            "pg_dump_major": version_major(dump_version),
            "snapshot": snapshot,
            "started_at": isotime(started),
            "finished_at": isotime(finished),
            "db_size_bytes": int(db_size),
            "dump_size_bytes": sum(f["size"] for f in files.values()),
            "dump_format": "directory",
            "jobs": args.jobs,
            "compression": args.compress,
            "files": files,
            "fingerprints": fingerprints,
            "migrations": migrations,
            "timings": timings,
        }
        write_json(partial / MANIFEST, manifest)
        fsync_path(partial / DUMP_DIR)
        fsync_path(partial)
        os.rename(partial, final)
        fsync_path(backup_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {
        "changed": True,
        "state": "complete",
        "id": backup_id,
        "path": str(final),
        "cleaned_partial": cleaned,
        "db_size_bytes": manifest["db_size_bytes"],
        "dump_size_bytes": manifest["dump_size_bytes"],
        "timings": timings,
    }


def cmd_backup(args: argparse.Namespace) -> dict[str, Any]:
    os.umask(0o077)
    check_dsn(args.dsn)
    with directory_lock(Path(args.backup_dir)):
        return take_backup(args)


# --------------------------------------------------------------------------------------------------------------
# verify


def restore_list(pg_restore: str, dump: Path) -> int:
    """Entries of the archive's table of contents (pg_restore --list must parse it)."""
    out = run_program([pg_restore, "--list", str(dump)], "pg_restore --list").stdout
    entries = [line for line in out.splitlines() if line.strip() and not line.startswith(";")]
    if not entries:
        raise BackupError(f"pg_restore --list found no entries in {dump}")
    return len(entries)


def test_restore(args: argparse.Namespace, root: Path, manifest: dict[str, Any], pg_restore: str) -> dict[str, Any]:
    """Restore into a scratch database, fingerprint it, compare with the manifest, drop it."""
    database = manifest["database"]
    maintenance = dsn_for(args.dsn, args.maintenance_db)
    scratch = scratch_name(database, "verify", utcnow())
    started = time.monotonic()
    with connect(maintenance) as conn:
        stale = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) AND datname <> %s",
            (scratch.rsplit("_", 1)[0] + "_", database),
        ).fetchall()
        for (name,) in stale:  # left by a crashed run (the directory lock is held: no other run is verifying)
            drop_database(conn, name)
        props = dict(database_properties(conn, database) or manifest.get("database_properties") or {})
        if not props:
            raise BackupError(f"database {database} does not exist and the manifest has no database properties")
        props["acl"], props["settings"], props["comment"] = None, [], None
        create_database(conn, scratch, props)
        try:
            t0 = time.monotonic()
            run_program(
                [pg_restore, f"--jobs={args.jobs}", "--exit-on-error", "--no-password",
                 f"--dbname={dsn_for(args.dsn, scratch)}", str(root / DUMP_DIR)],
                "test restore (pg_restore)",
            )
            restore_s = time.monotonic() - t0
            t0 = time.monotonic()
            restored = db_fingerprint.fingerprint(dsn_for(args.dsn, scratch), jobs=args.fingerprint_jobs,
                                                  method=db_fingerprint.method_of(manifest["fingerprints"]))
            fingerprint_s = time.monotonic() - t0
        finally:
            drop_database(conn, scratch)
    diffs = db_fingerprint.compare(manifest["fingerprints"], restored)
    if diffs:
        text = db_fingerprint.format_diffs(diffs, len(restored["tables"]))
        raise BackupError(f"the test restore of {root} does not match the manifest's fingerprints:\n{text}")
    return {
        "database": scratch,
        "tables": len(restored["tables"]),
        "rows": sum(t["rows"] for t in restored["tables"].values()),
        "equal": True,
        "restore_seconds": round(restore_s, 3),
        "fingerprint_seconds": round(fingerprint_s, 3),
        "seconds": round(time.monotonic() - started, 3),
    }


def verify_backup(args: argparse.Namespace) -> dict[str, Any]:
    backup_dir = Path(args.backup_dir)
    backup_id = check_id(args.id)
    info = inspect(backup_dir, backup_id)
    if info is None or info.state in ("partial", "incomplete"):
        raise BackupError(f"backup {backup_id} in {backup_dir} is {info.state if info else 'absent'}: nothing to verify")
    if info.state == "verified" and not args.force and not args.checksums_only:
        return {"changed": False, "verified": True, "id": backup_id, "path": str(info.path), "verification": info.verification}
    assert info.manifest is not None
    root = info.path
    pg_restore = find_program("pg_restore", args.bin_dir)
    restore_version = program_version(pg_restore)
    if version_major(restore_version) < int(info.manifest.get("pg_dump_major", 0)):
        raise BackupError(
            f"pg_restore {restore_version} cannot read an archive of pg_dump {info.manifest.get('pg_dump_version')}: "
            "install a newer PostgreSQL client or set bin_dir"
        )
    checks: dict[str, Any] = {"checksums": verify_checksums(root, info.manifest, args.jobs)}
    if args.checksums_only:
        return {"changed": False, "verified": info.state == "verified", "id": backup_id, "path": str(root), "checks": checks}
    t0 = time.monotonic()
    checks["pg_restore_list"] = {"entries": restore_list(pg_restore, root / DUMP_DIR), "seconds": round(time.monotonic() - t0, 3)}
    checks["test_restore"] = test_restore(args, root, info.manifest, pg_restore) if args.test_restore else None
    verification = {
        "verified": True,
        "verified_at": isotime(utcnow()),
        "backup_id": backup_id,
        "manifest_sha256": manifest_sha256(root),
        "pg_restore": pg_restore,
        "pg_restore_version": restore_version,
        "checks": checks,
    }
    write_json(root / VERIFIED, verification)
    return {"changed": True, "verified": True, "id": backup_id, "path": str(root), "verification": verification}


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    os.umask(0o077)
    check_dsn(args.dsn)
    if args.checksums_only:  # read-only: no lock, so it also runs beside a backup in progress
        return verify_backup(args)
    with directory_lock(Path(args.backup_dir)):
        return verify_backup(args)


# --------------------------------------------------------------------------------------------------------------
# retention


def read_marker(path: str) -> tuple[str | None, str | None]:
    """(backup id the in-progress migration marker names, warning). JSON {"backup_id": ...} or the id as text."""
    if not path or not os.path.exists(path):
        return None, None
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        return None, f"cannot read migration marker {path}: {exc}"
    value: Any = text
    if text.startswith("{"):
        try:
            value = json.loads(text).get("backup_id")
        except (ValueError, AttributeError):
            value = None
    elif text:
        value = text.splitlines()[0].strip()
    if not isinstance(value, str) or not value:
        return None, f"migration marker {path} names no backup id"
    return value, None


def plan_retention(
    backups: Sequence[BackupInfo],
    keep_last: int,
    keep_days: float,
    now: datetime.datetime,
    protected: Sequence[str],
) -> tuple[dict[str, list[str]], list[str]]:
    """Which verified backups to keep (with the reasons) and which to delete. Unverified ones are never deleted."""
    verified = sorted((b for b in backups if b.state == "verified"), key=lambda b: (b.finished_at, b.backup_id), reverse=True)
    keep: dict[str, list[str]] = {}
    delete: list[str] = []
    horizon = now - datetime.timedelta(days=keep_days)
    for index, backup in enumerate(verified):
        reasons = []
        if index == 0:
            reasons.append("newest verified")
        if index < keep_last:
            reasons.append(f"among the last {keep_last}")
        try:
            finished = datetime.datetime.fromisoformat(backup.finished_at)
        except ValueError:
            finished = now  # unreadable time: treat as young, never delete by mistake
        if keep_days > 0 and finished >= horizon:
            reasons.append(f"younger than {keep_days:g} days")
        if backup.backup_id in protected:
            reasons.append("named by the in-progress migration marker")
        if reasons:
            keep[backup.backup_id] = reasons
        else:
            delete.append(backup.backup_id)
    return keep, delete


def cmd_retention(args: argparse.Namespace) -> dict[str, Any]:
    backup_dir = Path(args.backup_dir)
    if args.keep_last < 1:
        raise BackupError("keep_last must be at least 1")
    marker_id, warning = read_marker(args.marker)
    backups = list_backups(backup_dir)
    keep, delete = plan_retention(backups, args.keep_last, args.keep_days, utcnow(), [marker_id] if marker_id else [])
    if warning:  # a marker we cannot read may name any backup: delete nothing
        delete = []
    leftovers = sorted(
        p.name for p in backup_dir.iterdir() if p.is_dir() and p.name.endswith((PARTIAL_SUFFIX, DELETING_SUFFIX))
    ) if backup_dir.is_dir() else []
    result = {
        "keep": keep,
        "delete": delete,
        "unverified": [b.backup_id for b in backups if b.state != "verified"],
        "leftovers": leftovers,
        "marker_backup_id": marker_id,
        "warning": warning,
        "changed": bool(delete or leftovers),
        "dry_run": args.dry_run,
    }
    if args.dry_run or not result["changed"]:
        return result
    with directory_lock(backup_dir):  # holding the lock, every .partial is a crashed run's leftover
        for name in delete:
            doomed = backup_dir / (name + DELETING_SUFFIX)
            os.rename(backup_dir / name, doomed)
            shutil.rmtree(doomed)
        for name in leftovers:
            shutil.rmtree(backup_dir / name, ignore_errors=True)
        fsync_path(backup_dir)
    return result


# --------------------------------------------------------------------------------------------------------------
# progress


def tree_bytes(root: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files under root; files that vanish while counted (pg_dump's own
    temporary files, the rename to <id>/) are skipped. (0, 0) when root does not exist."""
    total = files = 0
    for base, _dirs, names in os.walk(root):
        for name in names:
            try:
                st = os.lstat(os.path.join(base, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                files += 1
    return total, files


def job_finished(job_file: str) -> bool:
    """Whether ansible's async job (async_wrapper's job file, written whole by a rename) has finished: the
    file says {"started": true, "finished": false} while the job runs and holds the module's result after.
    A missing or unreadable file counts as finished, so the watch stops and async_status reports it."""
    try:
        data = json.loads(Path(job_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not (isinstance(data, dict) and data.get("started") and not data.get("finished"))


def cmd_progress(args: argparse.Namespace) -> dict[str, Any]:
    backup_dir = Path(args.backup_dir)
    backup_id = check_id(args.id)
    partial = backup_dir / (backup_id + PARTIAL_SUFFIX)
    finished = job_finished(args.job_file) if args.job_file else False
    written, files = tree_bytes(partial / DUMP_DIR)
    where = "partial" if partial.is_dir() else "absent"
    if not partial.is_dir() and (backup_dir / backup_id / MANIFEST).is_file():
        written, files = tree_bytes(backup_dir / backup_id / DUMP_DIR)  # renamed: the dump is whole
        where = "complete"
    return {"changed": False, "id": backup_id, "bytes_written": written, "files": files, "where": where, "finished": finished}


# --------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pg_snapshot_backup.py", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, database: bool = True) -> None:
        p.add_argument("--backup-dir", required=True, help="directory holding the backups (<id>/ per backup)")
        if database:
            p.add_argument("--dsn", default="", help="libpq connection string of the database, no password (peer auth)")
            p.add_argument("--bin-dir", default="", help="PostgreSQL bin directory (default: newest installed)")

    bak = sub.add_parser("backup", help="take a snapshot-consistent backup")
    common(bak)
    bak.add_argument("--id", required=True)
    bak.add_argument("--jobs", type=int, default=2, help="pg_dump -j")
    bak.add_argument("--fingerprint-jobs", type=int, default=2)
    bak.add_argument("--compress", type=int, default=1, choices=range(10), help="pg_dump gzip level (0-9)")
    bak.add_argument("--lock-wait-timeout", default="60s", help="pg_dump --lock-wait-timeout")
    bak.add_argument("--release-id", default="", help="the release this backup was taken for")
    bak.add_argument("--migrations-table", default="django_migrations", help="table whose rows go into the manifest ('' = none)")

    ver = sub.add_parser("verify", help="verify a backup; record verified.json")
    common(ver)
    ver.add_argument("--id", required=True)
    ver.add_argument("--jobs", type=int, default=2, help="checksum threads and pg_restore -j")
    ver.add_argument("--fingerprint-jobs", type=int, default=2)
    ver.add_argument("--maintenance-db", default="postgres", help="database to connect to for CREATE/DROP DATABASE")
    ver.add_argument("--test-restore", action="store_true", help="restore into a scratch database and compare fingerprints")
    ver.add_argument("--checksums-only", action="store_true", help="only re-check the files against the manifest; write nothing")
    ver.add_argument("--force", action="store_true", help="verify again even if verified.json is valid")

    ret = sub.add_parser("retention", help="delete old verified backups")
    common(ret, database=False)
    ret.add_argument("--keep-last", type=int, default=3)
    ret.add_argument("--keep-days", type=float, default=0.0)
    ret.add_argument("--marker", default="", help="in-progress migration marker file naming a backup id to keep")
    ret.add_argument("--dry-run", action="store_true", help="report what would be deleted; delete nothing")

    pro = sub.add_parser("progress", help="bytes written so far by a running backup; reads only")
    common(pro, database=False)
    pro.add_argument("--id", required=True)
    pro.add_argument("--job-file", default="", help="ansible's async job file of the backup: says whether it finished")
    return parser.parse_args(argv)


COMMANDS = {
    "backup": cmd_backup,
    "verify": cmd_verify,
    "retention": cmd_retention,
    "progress": cmd_progress,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
        code = 0
    except (BackupError, db_fingerprint.FingerprintError) as exc:
        result, code = {"failed": True, "error": str(exc)}, 1
    except (psycopg.Error, OSError, subprocess.CalledProcessError) as exc:
        result, code = {"failed": True, "error": f"{type(exc).__name__}: {str(exc).strip()}"}, 1
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    if code:
        sys.stderr.write(f"pg_snapshot_backup {args.command}: {result['error']}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
