"""The programs behind the pg_backup and pg_restore roles, run as the roles run them, on the throwaway cluster."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgsql import execute, scalar

REPO = Path(__file__).resolve().parents[2]
BACKUP_PROGRAM = REPO / "roles" / "pg_backup" / "files" / "pg_snapshot_backup.py"
STORE_PROGRAM = REPO / "roles" / "pg_backup" / "files" / "pg_backup_store.py"
RESTORE_PROGRAM = REPO / "roles" / "pg_restore" / "files" / "pg_snapshot_restore.py"
sys.path.insert(0, str(BACKUP_PROGRAM.parent))

import db_fingerprint as fp  # noqa: E402
import pg_backup_store as store  # noqa: E402
import pg_snapshot_backup as psb  # noqa: E402

DB = "bk_app"
BIG_ROWS = 120_000


def run(program: Path, *args: str, expect: int = 0) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(program), *args], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def app_db(pg_cluster: Any) -> Iterator[str]:
    """A database owned by an application role, with grants, settings, a big table and django_migrations."""
    admin = pg_cluster.dsn("postgres")
    execute(
        admin,
        f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)',
        "DROP ROLE IF EXISTS bk_owner",
        "DROP ROLE IF EXISTS bk_reader",
        "CREATE ROLE bk_owner LOGIN",
        "CREATE ROLE bk_reader LOGIN",
        f'CREATE DATABASE "{DB}" OWNER bk_owner TEMPLATE template0',
        f'REVOKE ALL ON DATABASE "{DB}" FROM PUBLIC',
        f'GRANT CONNECT ON DATABASE "{DB}" TO bk_reader',
        f'ALTER DATABASE "{DB}" SET search_path TO app, public',
        f"COMMENT ON DATABASE \"{DB}\" IS 'backup test database'",
    )
    dsn = pg_cluster.dsn(DB)
    execute(
        dsn,
        "SET ROLE bk_owner",
        "CREATE SCHEMA app",
        "CREATE TABLE app.customers (id int PRIMARY KEY, name text NOT NULL, email text)",
        "INSERT INTO app.customers SELECT g, 'customer ' || g, CASE WHEN g % 5 = 0 THEN NULL ELSE 'c' || g || '@x.test' END"
        " FROM generate_series(1, 2000) g",
        "CREATE TABLE app.orders (id bigserial PRIMARY KEY, customer_id int REFERENCES app.customers, amount numeric(12,2),"
        " placed timestamptz, payload jsonb)",
        f"INSERT INTO app.orders (customer_id, amount, placed, payload) SELECT g % 2000 + 1, g * 0.37,"
        f" timestamptz '2025-01-01 00:00+00' + g * interval '1 minute', jsonb_build_object('n', g)"
        f" FROM generate_series(1, {BIG_ROWS}) g",
        "CREATE INDEX ON app.orders (customer_id)",
        "CREATE TABLE public.django_migrations (id serial PRIMARY KEY, app varchar(255), name varchar(255), applied timestamptz)",
        "INSERT INTO public.django_migrations (app, name, applied) VALUES ('shop', '0001_initial', '2025-01-01'),"
        " ('shop', '0002_orders', '2025-02-01')",
        "GRANT USAGE ON SCHEMA app TO bk_reader",
        "GRANT SELECT ON app.orders TO bk_reader",
        "RESET ROLE",
    )
    yield dsn


@pytest.fixture(scope="module")
def backup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("backups") / "pg"
    path.mkdir(mode=0o700)
    return path


def backup_args(pg_cluster: Any, backup_dir: Path, backup_id: str) -> list[str]:
    return ["--backup-dir", str(backup_dir), "--dsn", pg_cluster.dsn(DB), "--bin-dir", str(pg_cluster.bindir), "--id", backup_id]


def restore_args(pg_cluster: Any, backup_dir: Path, *extra: str) -> list[str]:
    return [
        "--backup-dir",
        str(backup_dir),
        "--dsn",
        pg_cluster.dsn(DB),
        "--bin-dir",
        str(pg_cluster.bindir),
        "--database",
        DB,
        "--write-report",
        *extra,
    ]


def manifest_of(backup_dir: Path, backup_id: str) -> dict[str, Any]:
    return json.loads((backup_dir / backup_id / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------------ pure functions


def info(backup_id: str, days_ago: float, state: str = "verified") -> store.BackupInfo:
    now = datetime.datetime(2026, 1, 31, 12, 0, tzinfo=datetime.timezone.utc)
    finished = store.isotime(now - datetime.timedelta(days=days_ago))
    return store.BackupInfo(backup_id, Path("/nonexistent") / backup_id, state, finished)


NOW = datetime.datetime(2026, 1, 31, 12, 0, tzinfo=datetime.timezone.utc)


def test_retention_keeps_last_n_and_deletes_the_rest() -> None:
    backups = [info(f"b{i}", days_ago=10 - i) for i in range(6)]
    keep, delete = psb.plan_retention(backups, keep_last=2, keep_days=0, now=NOW, protected=[])
    assert sorted(keep) == ["b4", "b5"]
    assert sorted(delete) == ["b0", "b1", "b2", "b3"]
    assert "newest verified" in keep["b5"]


def test_retention_keeps_young_marked_and_unverified_backups() -> None:
    backups = [
        info("old-marked", 30),
        info("old", 20),
        info("young", 1.5),
        info("newest", 0.5),
        info("broken", 40, state="complete"),
    ]
    keep, delete = psb.plan_retention(backups, keep_last=1, keep_days=2, now=NOW, protected=["old-marked"])
    assert delete == ["old"]
    assert keep["old-marked"] == ["named by the in-progress migration marker"]
    assert keep["young"] == ["younger than 2 days"]
    assert "broken" not in keep and "broken" not in delete  # unverified backups are never deleted


def test_retention_never_deletes_the_newest_verified_one_even_with_zero_kept() -> None:
    keep, delete = psb.plan_retention([info("a", 5), info("b", 3)], keep_last=0, keep_days=0, now=NOW, protected=[])
    assert list(keep) == ["b"] and delete == ["a"]


def test_marker_formats(tmp_path: Path) -> None:
    marker = tmp_path / "migration-in-progress"
    assert psb.read_marker(str(marker)) == (None, None)
    marker.write_text('{"backup_id": "rel-7", "started_at": "2026-01-01T00:00:00+00:00"}')
    assert psb.read_marker(str(marker)) == ("rel-7", None)
    marker.write_text("rel-8\nmore text\n")
    assert psb.read_marker(str(marker)) == ("rel-8", None)
    marker.write_text("{}")
    backup_id, warning = psb.read_marker(str(marker))
    assert backup_id is None and warning and "names no backup id" in warning


def test_backup_ids_that_are_not_directory_names_are_refused() -> None:
    for bad in ("", "../x", "a/b", ".hidden", "x.partial", "x" * 101):
        with pytest.raises(store.BackupError):
            store.check_id(bad)
    assert store.check_id("release-2026.01.31_1") == "release-2026.01.31_1"


def test_a_password_in_the_connection_string_is_refused() -> None:
    with pytest.raises(store.BackupError, match="password"):
        psb.check_dsn("dbname=x password=secret")


# ------------------------------------------------------------------------------------------------ backup


def test_preflight_reports_versions_size_and_refuses_a_dir_inside_pgdata(pg_cluster: Any, app_db: str, backup_dir: Path) -> None:
    result = run(STORE_PROGRAM, "preflight", *backup_args(pg_cluster, backup_dir, "pre"), "--test-restore")
    assert result["ok"], result["problems"]
    assert result["state"] == "absent" and result["db_size_bytes"] > 10_000_000
    assert result["pg_dump_major"] >= result["server_major"] == 15
    inside = run(
        STORE_PROGRAM,
        "preflight",
        "--backup-dir",
        str(pg_cluster.datadir / "backups"),
        "--dsn",
        app_db,
        "--bin-dir",
        str(pg_cluster.bindir),
        "--id",
        "pre",
    )
    assert not inside["ok"] and any("inside the data directory" in p for p in inside["problems"])
    huge = run(STORE_PROGRAM, "preflight", *backup_args(pg_cluster, backup_dir, "pre"), "--margin", "1000000")
    assert any("not enough free space" in p for p in huge["problems"])


def test_backup_while_the_app_writes_is_snapshot_consistent_and_verified(pg_cluster: Any, app_db: str, backup_dir: Path) -> None:
    stop = threading.Event()
    written = []

    def writer() -> None:
        with psycopg.connect(app_db, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO app.orders (customer_id, amount) VALUES (1, 1)")
                conn.execute("UPDATE app.customers SET name = name || '.' WHERE id = 7")
                written.append(1)
                time.sleep(0.005)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        result = run(BACKUP_PROGRAM, "backup", *backup_args(pg_cluster, backup_dir, "rel-1"), "--release-id", "R1")
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert result["changed"] and result["state"] == "complete"
    assert len(written) > 20  # the writer really ran during the backup
    manifest = manifest_of(backup_dir, "rel-1")
    rows = manifest["fingerprints"]["tables"]["app.orders"]["rows"]
    assert BIG_ROWS < rows < scalar(app_db, "SELECT count(*) FROM app.orders")
    assert manifest["release_id"] == "R1" and manifest["database"] == DB
    assert [r["name"] for r in manifest["migrations"]["rows"]] == ["0001_initial", "0002_orders"]
    assert manifest["database_properties"]["owner"] == "bk_owner"
    # the test restore proves the dump holds exactly what the fingerprints describe
    verified = run(BACKUP_PROGRAM, "verify", *backup_args(pg_cluster, backup_dir, "rel-1"), "--test-restore")
    checks = verified["verification"]["checks"]
    assert verified["changed"] and checks["test_restore"]["equal"] and checks["pg_restore_list"]["entries"] > 5
    assert scalar(pg_cluster.dsn("postgres"), f"SELECT count(*) FROM pg_database WHERE datname LIKE '{DB}\\_\\_verify%'") == 0


def test_backup_files_modes_and_checksums(backup_dir: Path) -> None:
    root = backup_dir / "rel-1"
    manifest = manifest_of(backup_dir, "rel-1")
    on_disk = {str(p.relative_to(root)) for p in (root / "dump").rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) and "dump/toc.dat" in on_disk
    for name, entry in manifest["files"].items():
        assert store.sha256_file(root / name) == entry["sha256"]
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} has mode {oct(mode)}"
    assert not (backup_dir / "rel-1.partial").exists()


def test_second_run_with_the_same_id_changes_nothing(pg_cluster: Any, backup_dir: Path) -> None:
    before = (backup_dir / "rel-1" / "manifest.json").stat().st_mtime_ns
    assert run(BACKUP_PROGRAM, "backup", *backup_args(pg_cluster, backup_dir, "rel-1"))["changed"] is False
    assert run(BACKUP_PROGRAM, "verify", *backup_args(pg_cluster, backup_dir, "rel-1"))["changed"] is False
    assert (backup_dir / "rel-1" / "manifest.json").stat().st_mtime_ns == before


def test_stale_partial_is_cleaned_and_redone(pg_cluster: Any, backup_dir: Path) -> None:
    stale = backup_dir / "rel-2.partial"
    (stale / "dump").mkdir(parents=True)
    (stale / "dump" / "junk.dat").write_text("left by a crashed run")
    result = run(BACKUP_PROGRAM, "backup", *backup_args(pg_cluster, backup_dir, "rel-2"))
    assert result["changed"] and result["cleaned_partial"]
    assert not stale.exists() and "dump/junk.dat" not in manifest_of(backup_dir, "rel-2")["files"]
    assert run(BACKUP_PROGRAM, "verify", *backup_args(pg_cluster, backup_dir, "rel-2"))["verified"]


def test_corrupted_file_fails_verification(pg_cluster: Any, backup_dir: Path) -> None:
    copy = backup_dir / "rel-corrupt"
    shutil.copytree(backup_dir / "rel-2", copy)
    victim = max((copy / "dump").glob("*.dat.gz"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = run(BACKUP_PROGRAM, "verify", *backup_args(pg_cluster, backup_dir, "rel-corrupt"), "--checksums-only", expect=1)
    assert "corrupt or incomplete" in result["error"] and victim.name in result["error"]
    (copy / "dump" / "extra.dat").write_text("x")
    result = run(BACKUP_PROGRAM, "verify", *backup_args(pg_cluster, backup_dir, "rel-corrupt"), "--checksums-only", expect=1)
    assert "unexpected file dump/extra.dat" in result["error"]
    shutil.rmtree(copy)


def test_retention_command_honours_the_marker(backup_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("rel-1\n")
    plan = run(
        BACKUP_PROGRAM, "retention", "--backup-dir", str(backup_dir), "--keep-last", "1", "--marker", str(marker), "--dry-run"
    )
    assert plan["delete"] == [] and "rel-1" in plan["keep"] and "rel-2" in plan["keep"]
    assert (backup_dir / "rel-1").is_dir()
    listing = run(STORE_PROGRAM, "list", "--backup-dir", str(backup_dir))
    assert listing["newest_verified"] == "rel-2"


# ------------------------------------------------------------------------------------------------ restore


def test_restore_refuses_to_discard_writes_made_after_the_backup(pg_cluster: Any, app_db: str, backup_dir: Path) -> None:
    execute(app_db, "INSERT INTO app.customers (id, name) VALUES (900001, 'late')")
    result = run(RESTORE_PROGRAM, "compare-live", *restore_args(pg_cluster, backup_dir, "--id", "rel-2"), expect=3)
    assert result["refused"] and "app.customers" in result["error"] and "+1" in result["error"]
    reports = sorted((backup_dir / "rel-2").glob("restore-report-*-precheck.json"))
    report = json.loads(reports[-1].read_text())
    assert report["decision"] == "refuse"
    assert {t["table"]: t["row_delta"] for t in report["changed_tables"]}["app.customers"] >= 1


def test_restore_with_accepted_loss_swaps_and_keeps_the_failed_db(pg_cluster: Any, app_db: str, backup_dir: Path) -> None:
    admin = pg_cluster.dsn("postgres")
    live_oid = scalar(admin, f"SELECT oid FROM pg_database WHERE datname = '{DB}'")
    check = run(RESTORE_PROGRAM, "check", *restore_args(pg_cluster, backup_dir, "--id", "rel-2"))
    assert check["ok"] and not check["already_restored"] and check["checksums"]["files"] > 2
    restored = run(RESTORE_PROGRAM, "restore", *restore_args(pg_cluster, backup_dir, "--id", "rel-2"))
    assert restored["restored_db"].startswith(f"{DB}__restore_")
    # the live database is untouched until the swap
    assert scalar(admin, f"SELECT oid FROM pg_database WHERE datname = '{DB}'") == live_oid
    refused = run(
        RESTORE_PROGRAM,
        "swap",
        *restore_args(pg_cluster, backup_dir, "--id", "rel-2"),
        "--restored-db",
        restored["restored_db"],
        expect=3,
    )
    assert refused["refused"]
    assert scalar(admin, f"SELECT datallowconn FROM pg_database WHERE datname = '{DB}'") is True
    assert scalar(admin, f"SELECT oid FROM pg_database WHERE datname = '{DB}'") == live_oid
    swapped = run(
        RESTORE_PROGRAM,
        "swap",
        *restore_args(pg_cluster, backup_dir, "--id", "rel-2", "--accept-data-loss"),
        "--restored-db",
        restored["restored_db"],
    )
    failed = swapped["failed_db"]
    assert swapped["decision"] == "discard" and failed.startswith(f"{DB}__failed_")
    assert scalar(admin, f"SELECT oid FROM pg_database WHERE datname = '{failed}'") == live_oid
    assert scalar(pg_cluster.dsn(failed), "SELECT count(*) FROM app.customers WHERE id = 900001") == 1
    assert scalar(app_db, "SELECT count(*) FROM app.customers WHERE id = 900001") == 0
    compare = subprocess.run(
        [
            sys.executable,
            str(BACKUP_PROGRAM.parent / "db_fingerprint.py"),
            "compare",
            str(backup_dir / "rel-2" / "manifest.json"),
            f"dsn:{app_db}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    # owner, grants, settings and comment came along
    assert scalar(admin, f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{DB}'") == "bk_owner"
    assert scalar(admin, f"SELECT has_database_privilege('bk_reader', '{DB}', 'CONNECT')") is True
    assert scalar(admin, f"SELECT has_database_privilege('public', '{DB}', 'CONNECT')") is False
    assert scalar(app_db, "SELECT current_setting('search_path')") == "app, public"
    assert scalar(app_db, "SELECT has_table_privilege('bk_reader', 'app.orders', 'SELECT')") is True
    assert scalar(admin, f"SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = '{DB}'") == (
        "backup test database"
    )
    again = run(RESTORE_PROGRAM, "check", *restore_args(pg_cluster, backup_dir, "--id", "rel-2"))
    assert again["already_restored"] is True
    kept = run(RESTORE_PROGRAM, "failed-retention", "--dsn", app_db, "--database", DB, "--keep", "0", "--dry-run")
    assert kept["drop"] == [failed]
    dropped = run(RESTORE_PROGRAM, "failed-retention", "--dsn", app_db, "--database", DB, "--keep", "0")
    assert dropped["changed"] and scalar(admin, f"SELECT count(*) FROM pg_database WHERE datname = '{failed}'") == 0


def test_restore_refuses_a_corrupted_backup_and_touches_nothing(pg_cluster: Any, app_db: str, backup_dir: Path) -> None:
    copy = backup_dir / "rel-bad"
    shutil.copytree(backup_dir / "rel-2", copy)
    for report in copy.glob("restore-report-*"):
        report.unlink()
    victim = next((copy / "dump").glob("*.dat.gz"))
    victim.write_bytes(victim.read_bytes()[:-10])
    admin = pg_cluster.dsn("postgres")
    databases = scalar(admin, "SELECT array_agg(datname ORDER BY datname) FROM pg_database")
    result = run(RESTORE_PROGRAM, "check", *restore_args(pg_cluster, backup_dir, "--id", "rel-bad"), expect=1)
    assert "corrupt or incomplete" in result["error"]
    result = run(RESTORE_PROGRAM, "restore", *restore_args(pg_cluster, backup_dir, "--id", "rel-bad"), expect=1)
    assert scalar(admin, "SELECT array_agg(datname ORDER BY datname) FROM pg_database") == databases
    shutil.rmtree(copy)
    assert os.path.isdir(backup_dir / "rel-2")


# ------------------------------------------------------------------------------------------------ progress (read only)


def job_file(tmp_path: Path, content: str | None) -> str:
    """An ansible async job file as async_wrapper writes it (None: not there)."""
    path = tmp_path / "j1.42"
    if content is not None:
        path.write_text(content)
    return str(path)


def test_progress_counts_the_bytes_of_the_partial_dump_while_the_job_runs(tmp_path: Path) -> None:
    dump = tmp_path / "rel-9.partial" / "dump"
    dump.mkdir(parents=True)
    (dump / "toc.dat").write_bytes(b"x" * 1000)
    (dump / "3001.dat.gz").write_bytes(b"y" * 4096)
    (dump / "link").symlink_to(dump / "toc.dat")  # not a file of the dump: not counted twice
    running = job_file(tmp_path, json.dumps({"started": True, "finished": False, "ansible_job_id": "j1.42"}))
    result = run(BACKUP_PROGRAM, "progress", "--backup-dir", str(tmp_path), "--id", "rel-9", "--job-file", running)
    assert result == {"changed": False, "id": "rel-9", "bytes_written": 5096, "files": 2, "where": "partial", "finished": False}
    # ansible-core before 2.19 wrote 1/0
    assert psb.job_finished(job_file(tmp_path, json.dumps({"started": 1, "finished": 0}))) is False


def test_progress_says_finished_on_the_modules_result_and_on_a_missing_or_unreadable_job_file(tmp_path: Path) -> None:
    # The module's result replaces the job file when the dump ends, whether it succeeded or failed.
    assert psb.job_finished(job_file(tmp_path, json.dumps({"rc": 1, "stdout": "{}", "failed": True}))) is True
    assert psb.job_finished(job_file(tmp_path, json.dumps({"msg": "Timeout exceeded", "failed": True}))) is True
    # Nothing to watch: the watch stops and async_status, which reads the same file, says why.
    assert psb.job_finished(str(tmp_path / "missing")) is True
    assert psb.job_finished(job_file(tmp_path, "{not json")) is True
    (tmp_path / "rel-9").mkdir()
    result = run(BACKUP_PROGRAM, "progress", "--backup-dir", str(tmp_path), "--id", "rel-9", "--job-file", str(tmp_path / "x"))
    # <id>/ without a manifest is not a finished backup, and there is no partial: nothing written
    assert result == {"changed": False, "id": "rel-9", "bytes_written": 0, "files": 0, "where": "absent", "finished": True}
    (tmp_path / "rel-9" / "dump").mkdir()
    (tmp_path / "rel-9" / "dump" / "toc.dat").write_bytes(b"z" * 300)
    (tmp_path / "rel-9" / "manifest.json").write_text("{}")
    result = run(BACKUP_PROGRAM, "progress", "--backup-dir", str(tmp_path), "--id", "rel-9")
    assert (result["bytes_written"], result["where"], result["finished"]) == (300, "complete", False)
    run(BACKUP_PROGRAM, "progress", "--backup-dir", str(tmp_path), "--id", "../x", expect=1)  # ids are still checked


def test_a_backup_taken_with_the_text_fingerprints_is_verified_and_restored(
    pg_cluster: Any, app_db: str, backup_dir: Path
) -> None:
    """Backups on disk from before the columns method carry format-1 fingerprints (the whole row as
    text). A rollback after an upgrade of the tool restores such a backup: the test restore, the
    restore and the swap each fingerprint by the manifest's method, and prove it equal."""
    old = backup_dir / "rel-old"
    shutil.copytree(backup_dir / "rel-2", old)
    for report in old.glob("restore-report-*"):
        report.unlink()
    manifest = manifest_of(backup_dir, "rel-old")
    assert manifest["fingerprints"]["method"] == "columns1"
    text = fp.fingerprint(app_db, method="text")  # app_db holds rel-2's data again (the swap above)
    manifest["fingerprints"] = {k: v for k, v in text.items() if k != "method"} | {"format": 1}
    manifest["backup_id"] = "rel-old"
    (old / "manifest.json").write_text(json.dumps(manifest))
    verified = run(BACKUP_PROGRAM, "verify", *backup_args(pg_cluster, backup_dir, "rel-old"), "--test-restore", "--force")
    assert verified["changed"] and verified["verification"]["checks"]["test_restore"], verified
    restored = run(RESTORE_PROGRAM, "restore", *restore_args(pg_cluster, backup_dir, "--id", "rel-old"))
    swapped = run(
        RESTORE_PROGRAM,
        "swap",
        *restore_args(pg_cluster, backup_dir, "--id", "rel-old"),
        "--restored-db",
        restored["restored_db"],
    )
    assert swapped["decision"] != "refuse" and swapped["changed_tables"] == [], swapped
    assert run(RESTORE_PROGRAM, "check", *restore_args(pg_cluster, backup_dir, "--id", "rel-old"))["already_restored"] is True
    run(RESTORE_PROGRAM, "failed-retention", "--dsn", app_db, "--database", DB, "--keep", "0")
    shutil.rmtree(old)


def test_the_restored_database_has_planner_statistics_for_every_relation(pg_cluster: Any, tmp_path: Path) -> None:
    """pg_restore leaves planner statistics empty: the restore ANALYZEs, on --jobs connections, every
    relation a database-wide ANALYZE would: tables, a partitioned table and its partitions, materialized
    views (one never populated)."""
    name = "bk_stats"
    admin = pg_cluster.dsn("postgres")
    execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    execute(
        pg_cluster.dsn(name),
        "CREATE TABLE plain (id int PRIMARY KEY, v text)",
        "INSERT INTO plain SELECT g, 'v' || g FROM generate_series(1, 5000) g",
        "CREATE TABLE parted (id int, day date) PARTITION BY RANGE (day)",
        "CREATE TABLE parted_2025 PARTITION OF parted FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
        "CREATE TABLE parted_2026 PARTITION OF parted FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
        "INSERT INTO parted SELECT g, date '2025-01-01' + g % 700 FROM generate_series(1, 5000) g",
        "CREATE MATERIALIZED VIEW totals AS SELECT id % 10 AS k, count(*) AS n FROM plain GROUP BY 1",
        "CREATE MATERIALIZED VIEW later AS SELECT id FROM plain WITH NO DATA",
    )
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700)
    common = ["--backup-dir", str(backups), "--dsn", pg_cluster.dsn(name), "--bin-dir", str(pg_cluster.bindir)]
    run(BACKUP_PROGRAM, "backup", *common, "--id", "stats-1")
    run(BACKUP_PROGRAM, "verify", *common, "--id", "stats-1")
    restored = run(RESTORE_PROGRAM, "restore", *common, "--database", name, "--id", "stats-1", "--jobs", "2")
    scratch = pg_cluster.dsn(restored["restored_db"])
    try:
        assert restored["timings"]["analyzed_relations"] >= 6
        not_analyzed = scalar(
            scratch,
            "SELECT coalesce(array_agg(relname ORDER BY relname), '{}') FROM pg_stat_user_tables"
            " WHERE last_analyze IS NULL AND relname IN ('plain', 'parted_2025', 'parted_2026', 'totals')",
        )
        assert not_analyzed == [], not_analyzed
        # A partitioned table has no row of its own in pg_stat_user_tables: its statistics are in pg_stats.
        assert scalar(scratch, "SELECT count(*) FROM pg_stats WHERE tablename = 'parted' AND attname = 'day'") == 1
        assert scalar(scratch, "SELECT count(*) FROM pg_stats WHERE tablename = 'totals'") >= 1
    finally:
        execute(admin, f'DROP DATABASE IF EXISTS "{restored["restored_db"]}" WITH (FORCE)')
        execute(admin, f'DROP DATABASE "{name}" WITH (FORCE)')
