#!/usr/bin/env python3
"""Benchmark our backup and restore against raw pg_dump / pg_restore, side by side, in one run.

On a throwaway PostgreSQL cluster on this machine (initdb under --workdir, a free port; kept between
runs together with the generated data set, so the data is made once):

    scripts/bench_backup.py [--workdir /var/tmp/djm-bench] [--size 2GB] [--jobs 2] [--compress 1]

1. data: the ACME v1 schema (manage.py migrate of the fixture app's v1) filled by scripts/gen_data.py;
2. raw  `pg_dump -Fd -j N -Z c`                           vs  our dump phase (pg_dump --snapshot inside
   the exported snapshot, timed by the program) and our whole backup: fingerprints + dump + checksums +
   manifest, then verification without and with the test restore;
3. raw  `pg_restore -j N` into a new database              vs  our restore: checksum re-verification,
   restore into <db>__restore_<ts>, fingerprint equality, ANALYZE, live comparison and the swap.

Our side runs the programs the roles ship (roles/pg_backup/files/pg_snapshot_backup.py,
roles/pg_restore/files/pg_snapshot_restore.py), exactly as the roles call them. Prints seconds, GB/min
(database size, pg_database_size, per minute), ratios against the targets, and the extrapolation to a
50 GB database; writes the figures as JSON into build/bench/backup-<time>.json and docs/benchmarks.md
again from the newest figures (scripts/bench_report.py; --no-doc leaves it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench_report  # scripts/bench_report.py: docs/benchmarks.md from the newest figures
import pgcluster  # scripts/pgcluster.py, beside this file
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
BACKUP_PROGRAM = REPO / "roles" / "pg_backup" / "files" / "pg_snapshot_backup.py"
RESTORE_PROGRAM = REPO / "roles" / "pg_restore" / "files" / "pg_snapshot_restore.py"
GEN_DATA = REPO / "scripts" / "gen_data.py"
DB = "acme"
TARGET_GB = 50.0


def log(message: str) -> None:
    sys.stderr.write(f"[{datetime.datetime.now():%H:%M:%S}] {message}\n")
    sys.stderr.flush()


Cluster = pgcluster.Cluster


def find_bindir(override: str) -> Path:
    bindir = pgcluster.find_bindir(override)
    if bindir is None:
        raise SystemExit("no PostgreSQL server binaries found (/usr/lib/postgresql/*/bin/initdb): run `make setup`")
    return bindir


def start_cluster(workdir: Path, bindir: Path) -> Cluster:
    """The benchmark's server: kept with its data set under workdir between runs, tuned for bulk work."""
    cluster = pgcluster.start(
        workdir,
        bindir,
        "-c shared_buffers=512MB -c max_wal_size=4GB -c maintenance_work_mem=256MB -c max_parallel_maintenance_workers=1",
    )
    log(f"PostgreSQL {bindir.parent.name} running on port {cluster.port} ({cluster.datadir})")
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    pgcluster.stop(cluster)


def ensure_data(cluster: Cluster, size: str, jobs: int) -> dict[str, Any]:
    """The v1 schema filled by gen_data.py, made once and reused (a marker table records the size asked)."""
    exists = cluster.execute(f"SELECT count(*) FROM pg_database WHERE datname = '{DB}'")
    if exists:
        try:
            made = cluster.execute("SELECT size FROM bench_data_made", DB)
        except psycopg.Error:
            made = None
        if made == size:
            log(f"reusing the cached {size} data set in database {DB}")
            return {"reused": True}
    sys.path.insert(0, str(REPO / "examples" / "acme"))
    import harness  # the fixture app's harness: assembles v1 and runs manage.py migrate in its venv

    log("creating the v1 schema (manage.py migrate)")
    cluster.createdb(DB)
    harness.must(harness.manage("v1", harness.django_env(cluster, DB), "migrate", "--noinput", "-v0"))
    log(f"generating {size} with gen_data.py (jobs {jobs})")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(GEN_DATA), "--dsn", cluster.dsn(DB), "--size", size, "--jobs", str(jobs), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"gen_data.py failed:\n{result.stderr}")
    with psycopg.connect(cluster.dsn(DB), autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_data_made (size text)")
        conn.execute("INSERT INTO bench_data_made VALUES (%s)", (size,))
        conn.execute("VACUUM ANALYZE")
    return {"reused": False, "seconds": round(time.monotonic() - started, 1), "report": json.loads(result.stdout)}


def timed(argv: list[str], what: str) -> tuple[float, str]:
    log(what)
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{what} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


def program(path: Path, *args: str) -> list[str]:
    return [sys.executable, str(path), *args]


def settle(cluster: Cluster) -> None:
    """The same start for every timed phase: the previous phase's dirty pages written (CHECKPOINT) and
    the page cache flushed to disk (sync), so that no phase pays for the one before it: each restore
    writes about 2 GB of WAL, and our restore is timed right after the raw one."""
    cluster.execute("CHECKPOINT")
    subprocess.run(["sync"], check=False)


def drop(cluster: Cluster, name: str) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    cluster = start_cluster(workdir, find_bindir(args.bin_dir))
    try:
        return measure(args, cluster, workdir)
    finally:
        stop_cluster(cluster)


def one_round(args: argparse.Namespace, cluster: Cluster, workdir: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Every phase once, raw and ours; returns the seconds and the details of our side."""
    jobs, compress = str(args.jobs), str(args.compress)
    runs = workdir / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    backup_dir = runs / "backups"
    backup_dir.mkdir(mode=0o700)
    dsn = cluster.dsn(DB)
    common = ["--dsn", dsn, "--bin-dir", str(cluster.bindir)]
    t: dict[str, float] = {}

    settle(cluster)
    t["raw_dump"], _ = timed(
        [cluster.bin("pg_dump"), "-Fd", "-j", jobs, "-Z", compress, "-f", str(runs / "raw"), "-d", dsn],
        f"raw pg_dump -Fd -j {jobs} -Z {compress}",
    )
    raw_size = dir_size(runs / "raw")

    settle(cluster)
    t["our_backup"], out = timed(
        program(
            BACKUP_PROGRAM,
            "backup",
            "--backup-dir",
            str(backup_dir),
            "--id",
            "bench",
            *common,
            "--jobs",
            jobs,
            "--fingerprint-jobs",
            jobs,
            "--compress",
            compress,
        ),
        "our backup (snapshot, fingerprints, pg_dump --snapshot, checksums, manifest)",
    )
    backup = json.loads(out)
    t["our_dump_phase"] = backup["timings"]["dump_s"]
    t["our_fingerprints"] = backup["timings"]["fingerprint_s"]
    t["our_checksums"] = backup["timings"]["checksum_s"]
    verify_args = ["verify", "--backup-dir", str(backup_dir), "--id", "bench", *common]
    verify_args += ["--jobs", jobs, "--fingerprint-jobs", jobs]
    t["our_verify"], out = timed(
        program(BACKUP_PROGRAM, *verify_args),
        "our verification without test restore (checksums, pg_restore --list)",
    )
    verify = json.loads(out)["verification"]["checks"]
    t["our_verify_checksums"] = verify["checksums"]["seconds"]
    t["our_verify_list"] = verify["pg_restore_list"]["seconds"]
    t["our_verify_test_restore"], out = timed(
        program(BACKUP_PROGRAM, *verify_args, "--test-restore", "--force"),
        "our verification with the test restore",
    )
    test_restore = json.loads(out)["verification"]["checks"]["test_restore"]

    drop(cluster, "acme_raw_restore")
    cluster.execute("CREATE DATABASE acme_raw_restore TEMPLATE template0")
    settle(cluster)
    t["raw_restore"], _ = timed(
        [cluster.bin("pg_restore"), "-j", jobs, "--exit-on-error", "-d", cluster.dsn("acme_raw_restore"), str(runs / "raw")],
        f"raw pg_restore -j {jobs}",
    )
    drop(cluster, "acme_raw_restore")

    restore_common = [
        "--backup-dir",
        str(backup_dir),
        "--id",
        "bench",
        *common,
        "--database",
        DB,
        "--jobs",
        jobs,
        "--fingerprint-jobs",
        jobs,
        "--writes-blocked",
        "--write-report",
    ]
    settle(cluster)
    t["our_restore_check"], _ = timed(program(RESTORE_PROGRAM, "check", *restore_common), "our restore: check (checksums)")
    t["our_restore_restore"], out = timed(
        program(RESTORE_PROGRAM, "restore", *restore_common), "our restore: pg_restore into a new database, fingerprints, ANALYZE"
    )
    restored = json.loads(out)
    t["our_restore_swap"], out = timed(
        program(RESTORE_PROGRAM, "swap", *restore_common, "--restored-db", restored["restored_db"]),
        "our restore: live comparison and swap",
    )
    swap = json.loads(out)
    # the data set stays cached: the restored database is the same data; drop the replaced one
    timed(
        program(RESTORE_PROGRAM, "failed-retention", "--dsn", dsn, "--database", DB, "--keep", "0"), "drop the replaced database"
    )
    shutil.rmtree(runs, ignore_errors=True)

    t["our_backup_total"] = t["our_backup"] + t["our_verify"]
    t["our_backup_total_with_test_restore"] = t["our_backup"] + t["our_verify_test_restore"]
    t["our_restore_total"] = t["our_restore_check"] + t["our_restore_restore"] + t["our_restore_swap"]
    t["our_overhead"] = t["our_fingerprints"] + t["our_checksums"] + t["our_verify"]
    details = {
        "raw_dump_bytes": raw_size,
        "our_dump_bytes": backup["dump_size_bytes"],
        "restore": restored["timings"],
        "test_restore": test_restore,
        "swap": {"compare_seconds": swap.get("compare_seconds"), "total": swap.get("seconds")},
    }
    return t, details


def measure(args: argparse.Namespace, cluster: Cluster, workdir: Path) -> dict[str, Any]:
    data = ensure_data(cluster, args.size, args.jobs)
    if args.prepare_only:
        return {"data": data}
    db_size = int(cluster.execute(f"SELECT pg_database_size('{DB}')"))
    load_average_before = os.getloadavg()
    rounds = []
    for number in range(1, args.repeat + 1):
        log(f"round {number} of {args.repeat}")
        rounds.append(one_round(args, cluster, workdir))
    # best of N per phase: the machine is shared, the minimum is the least disturbed measurement
    best = {key: min(r[0][key] for r in rounds) for key in rounds[0][0]}
    t = {key: statistics.median(r[0][key] for r in rounds) for key in rounds[0][0]}
    details = rounds[-1][1]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "postgresql": cluster.bindir.parent.name},
        "load_average_before": load_average_before,
        "data": data,
        "db_size_bytes": db_size,
        "raw_dump_bytes": details["raw_dump_bytes"],
        "our_dump_bytes": details["our_dump_bytes"],
        "repeat": args.repeat,
        "rounds": [{k: round(v, 2) for k, v in r[0].items()} for r in rounds],
        "jobs": args.jobs,
        "compress": args.compress,
        "seconds": {k: round(v, 2) for k, v in t.items()},
        "best_seconds": {k: round(v, 2) for k, v in best.items()},
        "breakdown": {k: details[k] for k in ("restore", "test_restore", "swap")},
        "ratios": {
            "dump_phase_throughput_vs_raw": round(t["raw_dump"] / t["our_dump_phase"], 3),
            "fingerprints_plus_verification_vs_dump": round(t["our_overhead"] / t["our_dump_phase"], 3),
            "restore_vs_raw": round(t["our_restore_total"] / t["raw_restore"], 3),
            "whole_backup_vs_raw_dump": round(t["our_backup_total"] / t["raw_dump"], 3),
            "whole_backup_with_test_restore_vs_raw_dump": round(t["our_backup_total_with_test_restore"] / t["raw_dump"], 3),
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        default="/var/tmp/djm-bench",  # noqa: S108 - a fixed, documented cache location on the controller
        help="cluster, cached data set and results (kept)",
    )
    parser.add_argument("--size", default="2GB", help="data set size for gen_data.py (default 2GB)")
    parser.add_argument("--jobs", type=int, default=2, help="-j of pg_dump/pg_restore and fingerprint connections")
    parser.add_argument("--compress", type=int, default=1, help="pg_dump gzip level, both sides (default 1, the role's)")
    parser.add_argument("--bin-dir", default="", help="PostgreSQL bin directory (default: newest installed)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each phase's best time is reported (default 3)")
    parser.add_argument("--prepare-only", action="store_true", help="only make (or find) the data set")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.prepare_only:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return 0
    stamp = f"{datetime.datetime.now():%Y%m%dT%H%M%S}"
    out = bench_report.BENCH / f"backup-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(bench_report.backup_table(result) + "\n")
    sys.stdout.write(f"\nFigures: {out}\n")
    if not args.no_doc:
        bench_report.write()
        log(f"wrote {bench_report.DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
