#!/usr/bin/env python3
"""Restore a verified pg_snapshot_backup backup and swap it in place of the live database (pg_restore role).

Runs on the database host as the PostgreSQL OS user (peer authentication). Ships next to
pg_snapshot_backup.py, pg_backup_store.py and db_fingerprint.py, which it imports.

Commands (each prints one JSON document on stdout):
    check          pick the backup (default: newest verified), re-verify its checksums, versions, free space,
                   and whether the live database already is this backup restored by us (nothing to do)
    compare-live   fingerprint the live database, compare with the manifest, write the report; exit 3 when
                   tables changed after the backup and neither --writes-blocked nor --accept-data-loss is given
    restore        create <db>__restore_<ts> like the live database, pg_restore -j into it, and check its
                   fingerprints equal the manifest's (the scratch database is dropped if anything fails)
    swap           block connections to the live database, terminate its sessions, compare it with the
                   manifest (report; refusal as in compare-live), then in one transaction rename it to
                   <db>__failed_<ts> and the restored database to <db>; re-allow connections
    cleanup        undo an interrupted restore: drop the scratch database, re-allow connections to the live one
    failed-retention  keep the newest N <db>__failed_* databases, drop the others
Exit codes: 0 success, 1 failure, 2 usage error, 3 refused: writes after the backup would be lost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
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


def judge(diffs: Sequence[dict[str, Any]], writes_blocked: bool, accept_data_loss: bool) -> str:
    """'none' (nothing changed), 'discard' (allowed) or 'refuse'."""
    if not diffs:
        return "none"
    return "discard" if writes_blocked or accept_data_loss else "refuse"


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
        "or set pg_restore_accept_data_loss: true to discard them."
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
        live_fp = db_fingerprint.fingerprint(psb.dsn_for(args.dsn, database), jobs=args.fingerprint_jobs)
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
    live = db_fingerprint.fingerprint(conn_factory or psb.dsn_for(args.dsn, database), jobs=args.fingerprint_jobs)
    diffs = db_fingerprint.compare(info.manifest["fingerprints"], live)
    decision = judge(diffs, args.writes_blocked, args.accept_data_loss)
    compared = len(set(live["tables"]) | set(info.manifest["fingerprints"]["tables"]))
    result: dict[str, Any] = {"equal": not diffs, "changed_tables": diffs, "decision": decision,
                              "seconds": round(time.monotonic() - t0, 3)}
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
            fingerprint = db_fingerprint.fingerprint(psb.dsn_for(args.dsn, restored), jobs=args.fingerprint_jobs)
            timings["fingerprint_s"] = round(time.monotonic() - t0, 3)
            diffs = db_fingerprint.compare(manifest["fingerprints"], fingerprint)
            if diffs:
                text = db_fingerprint.format_diffs(diffs, len(fingerprint["tables"]))
                raise store.BackupError(f"the restored database {restored} does not match backup {info.backup_id}:\n{text}")
            t0 = time.monotonic()
            with psb.connect(psb.dsn_for(args.dsn, restored)) as target:  # pg_restore leaves planner statistics empty
                target.execute("ANALYZE")
            timings["analyze_s"] = round(time.monotonic() - t0, 3)
        except BaseException:
            psb.drop_database(conn, restored)
            raise
    return {"changed": True, "id": info.backup_id, "database": database, "restored_db": restored,
            "tables": len(fingerprint["tables"]), "timings": timings}


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
    cln = sub.add_parser("cleanup", help="drop the scratch database, re-allow connections")
    common(cln, backup=False)
    cln.add_argument("--restored-db", default="")
    cln.add_argument("--allow-connections", action="store_true", help="re-allow connections to the live database")
    ret = sub.add_parser("failed-retention", help="keep the newest N <db>__failed_* databases")
    common(ret, backup=False)
    ret.add_argument("--keep", type=int, default=2)
    ret.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.command in ("cleanup", "failed-retention") and not args.database:
        parser.error("--database is required")
    return args


COMMANDS = {
    "check": cmd_check,
    "compare-live": cmd_compare_live,
    "restore": cmd_restore,
    "swap": cmd_swap,
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
