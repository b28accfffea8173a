#!/usr/bin/env python3
"""Snapshot-consistent, verified pg_dump backups (the program behind the pg_backup role).

Runs on the database host as the PostgreSQL OS user (peer authentication; no password is ever put on a
command line). The shipped copy lives next to db_fingerprint.py, which it imports.

Commands (each prints one JSON document on stdout):
    preflight  checks before anything is written: free space, pg_dump version, target directory
    backup     export a snapshot, fingerprint every table inside it, pg_dump -Fd --snapshot from it,
               write manifest.json with sha256 of every file, rename <id>.partial/ to <id>/
    verify     checksums, pg_restore --list, optionally a full test restore whose fingerprints must
               equal the manifest's; records verified.json next to the manifest
    list       the backups of a directory with their state, newest first
    retention  delete old verified backups (keep the last N, those younger than D days, the newest,
               and the one an in-progress migration marker names)

Layout of a backup directory:
    <backup-dir>/<id>/manifest.json     what was dumped: versions, times, sizes, sha256 of every file,
                                        fingerprints, migration rows, release id
    <backup-dir>/<id>/verified.json     verification result (sha256 of the manifest it verified)
    <backup-dir>/<id>/dump/             pg_dump -Fd output
Exit codes: 0 success, 1 failure (message in the JSON "error" field and on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import db_fingerprint
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

MANIFEST = "manifest.json"
VERIFIED = "verified.json"
DUMP_DIR = "dump"
PARTIAL_SUFFIX = ".partial"
DELETING_SUFFIX = ".deleting"
LOCK_FILE = ".lock"
MANIFEST_FORMAT = 1
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
NAMEDATALEN = 63
# GUCs whose value is a list: ALTER DATABASE ... SET must get them as separate literals (as pg_dump does).
LIST_GUCS = {
    "search_path",
    "temp_tablespaces",
    "session_preload_libraries",
    "local_preload_libraries",
    "shared_preload_libraries",
}


class BackupError(Exception):
    """A check or step failed; the message says what and what to do."""


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def isotime(moment: datetime.datetime) -> str:
    return moment.replace(microsecond=0).isoformat()


def stamp(moment: datetime.datetime) -> str:
    """Compact UTC timestamp used in database names: 20260125T143000Z."""
    return moment.strftime("%Y%m%dT%H%M%SZ")


def check_id(backup_id: str) -> str:
    if not ID_PATTERN.match(backup_id) or backup_id.endswith((PARTIAL_SUFFIX, DELETING_SUFFIX)):
        raise BackupError(
            f"backup id {backup_id!r} is not usable as a directory name: use letters, digits, '.', '_' or '-' "
            f"(at most 100, not starting with a punctuation mark, not ending in {PARTIAL_SUFFIX} or {DELETING_SUFFIX})"
        )
    return backup_id


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


def version_major(text: str) -> int:
    """Major version from `pg_dump --version` output or a server_version string (9.6 -> 9, 15.4 -> 15)."""
    match = re.search(r"(\d+)(?:\.(\d+))?", text.split(")")[-1] if ")" in text else text)
    if not match:
        raise BackupError(f"cannot read a version number in {text!r}")
    return int(match.group(1))


def find_program(name: str, bin_dir: str = "") -> str:
    """The PostgreSQL client program to use: from bin_dir, else the newest /usr/lib/postgresql/*/bin, else PATH."""
    if bin_dir:
        path = Path(bin_dir) / name
        if not os.access(path, os.X_OK):
            raise BackupError(f"{path} is not an executable: fix the bin_dir variable")
        return str(path)
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")

    def major(path: str) -> float:
        try:
            return float(Path(path).parent.parent.name)
        except ValueError:
            return -1.0

    candidates.sort(key=major, reverse=True)
    if candidates:
        return candidates[0]
    found = shutil.which(name)
    if not found:
        raise BackupError(f"{name} not found: install the PostgreSQL client package or set the bin_dir variable")
    return found


def program_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    match = re.search(r"\)\s*([0-9][^\s]*)", out)
    return match.group(1) if match else out


def run_program(argv: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGAPPNAME="pg_snapshot_backup")
    result = subprocess.run(list(argv), capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise BackupError(f"{what} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


# --------------------------------------------------------------------------------------------------------------
# Files


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, doc: Any) -> None:
    """Write JSON atomically and durably (temp file, fsync, rename, fsync directory); mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(doc, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(4 * 1024 * 1024)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def dump_files(root: Path) -> list[str]:
    """Every regular file under root/dump, as paths relative to root, sorted."""
    base = root / DUMP_DIR
    return sorted(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file())


def checksum_files(root: Path, names: Sequence[str], jobs: int) -> dict[str, dict[str, Any]]:
    def one(name: str) -> tuple[str, dict[str, Any]]:
        path = root / name
        return name, {"sha256": sha256_file(path), "size": path.stat().st_size}

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(pool.map(one, names))


def verify_checksums(root: Path, manifest: dict[str, Any], jobs: int) -> dict[str, Any]:
    """Compare the files on disk with the manifest; raise BackupError naming every problem."""
    expected: dict[str, dict[str, Any]] = manifest.get("files") or {}
    if not expected:
        raise BackupError(f"{root}/{MANIFEST} lists no files: the backup is incomplete")
    problems: list[str] = []
    present = set(dump_files(root)) if (root / DUMP_DIR).is_dir() else set()
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    problems += [f"missing file {name}" for name in missing]
    problems += [f"unexpected file {name}" for name in extra]
    started = time.monotonic()
    actual = checksum_files(root, sorted(set(expected) & present), jobs)
    for name, info in sorted(actual.items()):
        if info["size"] != expected[name]["size"]:
            problems.append(f"{name}: size {info['size']} != {expected[name]['size']} in the manifest")
        elif info["sha256"] != expected[name]["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise BackupError(f"backup {root} is corrupt or incomplete: {shown}")
    return {
        "files": len(actual),
        "bytes": sum(i["size"] for i in actual.values()),
        "seconds": round(time.monotonic() - started, 3),
    }


@contextlib.contextmanager
def directory_lock(backup_dir: Path) -> Iterator[None]:
    """An exclusive lock on the backup directory: one pg_snapshot_backup run writes there at a time."""
    fd = os.open(backup_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise BackupError(f"another run holds {backup_dir / LOCK_FILE}: wait for it to finish") from exc
            raise
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------
# Backups on disk


@dataclass
class BackupInfo:
    backup_id: str
    path: Path
    state: str  # "partial", "complete" (manifest, not verified) or "verified"
    finished_at: str = ""
    manifest: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None


def manifest_sha256(root: Path) -> str:
    return sha256_file(root / MANIFEST)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read {path}: {exc}") from exc


def inspect(backup_dir: Path, backup_id: str) -> BackupInfo | None:
    """State of one backup id; None when there is nothing at all."""
    root = backup_dir / backup_id
    if not root.is_dir():
        partial = backup_dir / (backup_id + PARTIAL_SUFFIX)
        return BackupInfo(backup_id, partial, "partial") if partial.is_dir() else None
    if not (root / MANIFEST).is_file():
        return BackupInfo(backup_id, root, "incomplete")
    try:
        manifest = read_json(root / MANIFEST)
    except BackupError:
        return BackupInfo(backup_id, root, "incomplete")
    info = BackupInfo(backup_id, root, "complete", str(manifest.get("finished_at", "")), manifest)
    if (root / VERIFIED).is_file():
        try:
            verification = read_json(root / VERIFIED)
        except BackupError:
            return info
        if verification.get("verified") is True and verification.get("manifest_sha256") == manifest_sha256(root):
            info.state = "verified"
            info.verification = verification
    return info


def list_backups(backup_dir: Path) -> list[BackupInfo]:
    """Every backup in the directory (not .partial/.deleting leftovers), newest first."""
    found: list[BackupInfo] = []
    if not backup_dir.is_dir():
        return found
    for entry in backup_dir.iterdir():
        if not entry.is_dir() or entry.name.endswith((PARTIAL_SUFFIX, DELETING_SUFFIX)) or entry.name.startswith("."):
            continue
        if not ID_PATTERN.match(entry.name):
            continue
        info = inspect(backup_dir, entry.name)
        if info is not None:
            found.append(info)
    found.sort(key=lambda b: (b.finished_at, b.backup_id), reverse=True)
    return found


def newest_verified(backup_dir: Path) -> BackupInfo | None:
    return next((b for b in list_backups(backup_dir) if b.state == "verified"), None)


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


def free_bytes(path: Path) -> tuple[int, int, Path]:
    """(free bytes for an unprivileged writer, device, existing path measured) at path or its nearest existing parent."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize, os.stat(probe).st_dev, probe


def is_inside(child: Path, parent: Path) -> bool:
    child_r, parent_r = os.path.realpath(child), os.path.realpath(parent)
    return child_r == parent_r or child_r.startswith(parent_r.rstrip("/") + "/")


# --------------------------------------------------------------------------------------------------------------
# preflight


def cmd_preflight(args: argparse.Namespace) -> dict[str, Any]:
    backup_dir = Path(args.backup_dir)
    check_id(args.id)
    problems: list[str] = []
    result: dict[str, Any] = {"backup_dir": str(backup_dir), "id": args.id}
    info = inspect(backup_dir, args.id) if backup_dir.is_dir() else None
    result["state"] = info.state if info else "absent"

    pg_dump = find_program("pg_dump", args.bin_dir)
    dump_version = program_version(pg_dump)
    result.update(pg_dump=pg_dump, pg_dump_version=dump_version, pg_dump_major=version_major(dump_version))

    with connect(args.dsn) as conn:
        row = conn.execute(
            "SELECT current_database(), current_setting('server_version'), current_setting('server_version_num')::int,"
            " pg_database_size(current_database()), current_setting('data_directory')"
        ).fetchone()
        assert row is not None
        database, server_version, version_num, db_size, data_directory = row
    result.update(
        database=database,
        server_version=server_version,
        server_major=version_num // 10000 if version_num >= 100000 else version_num // 100 / 100,
        db_size_bytes=int(db_size),
        data_directory=data_directory,
    )
    if result["pg_dump_major"] < version_num // 10000:
        problems.append(
            f"pg_dump {dump_version} ({pg_dump}) is older than the server ({server_version}): install the "
            f"postgresql-client package of major version {version_num // 10000} or newer, or set bin_dir"
        )
    if is_inside(backup_dir, Path(data_directory)):
        problems.append(f"backup directory {backup_dir} is inside the data directory {data_directory}: choose another path")
    if backup_dir.exists() and not os.access(backup_dir, os.W_OK | os.X_OK):
        problems.append(f"backup directory {backup_dir} is not writable by {os.getenv('USER') or os.getuid()}: fix its owner")

    # Size estimate: database size times the dump/database ratio of the last verified backup (or the default).
    ratio, ratio_source = args.default_ratio, "default"
    previous = newest_verified(backup_dir)
    if previous and previous.manifest and previous.manifest.get("db_size_bytes"):
        ratio = previous.manifest["dump_size_bytes"] / max(1, previous.manifest["db_size_bytes"])
        ratio_source = f"backup {previous.backup_id}"
    estimated = int(db_size * ratio)
    result.update(ratio=round(ratio, 4), ratio_source=ratio_source, estimated_dump_bytes=estimated, margin=args.margin)

    needs: dict[int, dict[str, Any]] = {}
    if result["state"] != "verified":
        free, dev, measured = free_bytes(backup_dir)
        needs.setdefault(dev, {"free": free, "path": str(measured), "need": 0})["need"] += int(estimated * args.margin)
        if args.test_restore:
            free, dev, measured = free_bytes(Path(data_directory)) if os.access(data_directory, os.R_OK) else (0, -1, Path())
            if dev != -1:  # the data directory is readable: a test restore needs db size x margin there
                needs.setdefault(dev, {"free": free, "path": str(measured), "need": 0})["need"] += int(db_size * args.margin)
    result["space"] = list(needs.values())
    for need in needs.values():
        if need["free"] < need["need"]:
            problems.append(
                f"not enough free space on the filesystem of {need['path']}: {need['free'] // 2**20} MiB free, "
                f"{need['need'] // 2**20} MiB needed (estimate x margin {args.margin}): free space or lower the margin"
            )
    result["problems"] = problems
    result["ok"] = not problems
    return result


# --------------------------------------------------------------------------------------------------------------
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
            restored = db_fingerprint.fingerprint(dsn_for(args.dsn, scratch), jobs=args.fingerprint_jobs)
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
# list / retention


def describe(info: BackupInfo) -> dict[str, Any]:
    manifest = info.manifest or {}
    return {
        "id": info.backup_id,
        "path": str(info.path),
        "state": info.state,
        "finished_at": info.finished_at,
        "release_id": manifest.get("release_id"),
        "database": manifest.get("database"),
        "dump_size_bytes": manifest.get("dump_size_bytes"),
    }


def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    backups = list_backups(Path(args.backup_dir))
    newest = next((b for b in backups if b.state == "verified"), None)
    return {"backups": [describe(b) for b in backups], "newest_verified": newest.backup_id if newest else None}


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
# CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pg_snapshot_backup.py", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, database: bool = True) -> None:
        p.add_argument("--backup-dir", required=True, help="directory holding the backups (<id>/ per backup)")
        if database:
            p.add_argument("--dsn", default="", help="libpq connection string of the database, no password (peer auth)")
            p.add_argument("--bin-dir", default="", help="PostgreSQL bin directory (default: newest installed)")

    pre = sub.add_parser("preflight", help="checks before writing anything")
    common(pre)
    pre.add_argument("--id", required=True)
    pre.add_argument("--margin", type=float, default=1.5, help="free space needed = estimated size x margin")
    pre.add_argument("--default-ratio", type=float, default=1.0, help="dump/database size ratio without a previous backup")
    pre.add_argument("--test-restore", action="store_true", help="also check room for the test restore in the data directory")

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

    lst = sub.add_parser("list", help="list backups, newest first")
    common(lst, database=False)

    ret = sub.add_parser("retention", help="delete old verified backups")
    common(ret, database=False)
    ret.add_argument("--keep-last", type=int, default=3)
    ret.add_argument("--keep-days", type=float, default=0.0)
    ret.add_argument("--marker", default="", help="in-progress migration marker file naming a backup id to keep")
    ret.add_argument("--dry-run", action="store_true", help="report what would be deleted; delete nothing")
    return parser.parse_args(argv)


COMMANDS = {
    "preflight": cmd_preflight,
    "backup": cmd_backup,
    "verify": cmd_verify,
    "list": cmd_list,
    "retention": cmd_retention,
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
