#!/usr/bin/env python3
"""The backup directory of pg_snapshot_backup: layout, states, checksums, and the preflight checks.

Standard library only (the server is queried with psql), so that the pg_backup role can run the preflight
with the host's python3 before it installs or writes anything, in check mode too. pg_snapshot_backup.py
and pg_snapshot_restore.py import it.

Commands (each prints one JSON document on stdout):
    preflight  before anything is written: free space >= estimated size x margin (database size x the
               dump/database ratio of the last verified backup), pg_dump major >= server major, backup
               directory writable and not inside the data directory, state of the backup id
    list       the backups of a directory with their state, newest first
Exit codes: 0 success (preflight: problems are listed in "problems"), 1 failure, 2 usage error.
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
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
VERIFIED = "verified.json"
DUMP_DIR = "dump"
PARTIAL_SUFFIX = ".partial"
DELETING_SUFFIX = ".deleting"
LOCK_FILE = ".lock"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
NAMEDATALEN = 63


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


SERVER_FACTS = (
    "SELECT json_build_object('database', current_database(), 'server_version', current_setting('server_version'),"
    " 'server_version_num', current_setting('server_version_num')::int, 'db_size', pg_database_size(current_database()),"
    " 'data_directory', current_setting('data_directory'))"
)


def server_facts(psql: str, dsn: str) -> dict[str, Any]:
    """Version, size and data directory of the database, read with psql (no driver needed)."""
    argv = [psql, "-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-c", SERVER_FACTS]
    if dsn:
        argv += ["-d", dsn]
    out = run_program(argv, "psql (reading the server's version, database size and data directory)").stdout
    try:
        return dict(json.loads(out))
    except ValueError as exc:
        raise BackupError(f"unexpected psql output: {out[:200]!r}") from exc


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

    facts = server_facts(find_program("psql", args.bin_dir), args.dsn)
    database, server_version, version_num = facts["database"], facts["server_version"], facts["server_version_num"]
    db_size, data_directory = int(facts["db_size"]), facts["data_directory"]
    result.update(
        database=database,
        server_version=server_version,
        server_major=version_num // 10000,
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pg_backup_store.py", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("preflight", help="checks before writing anything")
    pre.add_argument("--backup-dir", required=True, help="directory holding the backups (<id>/ per backup)")
    pre.add_argument("--dsn", default="", help="libpq connection string of the database, no password (peer auth)")
    pre.add_argument("--bin-dir", default="", help="PostgreSQL bin directory (default: newest installed)")
    pre.add_argument("--id", required=True)
    pre.add_argument("--margin", type=float, default=1.5, help="free space needed = estimated size x margin")
    pre.add_argument("--default-ratio", type=float, default=1.0, help="dump/database size ratio without a previous backup")
    pre.add_argument("--test-restore", action="store_true", help="also check room for the test restore in the data directory")
    lst = sub.add_parser("list", help="list backups, newest first")
    lst.add_argument("--backup-dir", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = cmd_preflight(args) if args.command == "preflight" else cmd_list(args)
        code = 0
    except (BackupError, OSError, subprocess.CalledProcessError) as exc:
        result, code = {"failed": True, "error": str(exc)}, 1
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    if code:
        sys.stderr.write(f"pg_backup_store {args.command}: {result['error']}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
