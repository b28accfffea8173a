"""What the pg_backup scenario left on each instance (prepare: old-1..3, converge: rel-1, side effect: rel-bad)."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from typing import Any

import pytest

BACKUPS = "/var/backups/postgresql"
DB = "molecule_app"


def psql(host: Any, query: str, db: str = "postgres") -> str:
    result = host.run("runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -d %s -c %s", db, query)
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def manifest(host: Any, path: str) -> dict[str, Any]:
    return json.loads(host.file(f"{path}/manifest.json").content_string)


def sha256_of_files(host: Any, root: str) -> dict[str, str]:
    """sha256 of every file under root/dump, computed on the instance in one command."""
    out = host.check_output(f"cd {root} && find dump -type f -exec sha256sum {{}} +")
    return {name: digest for digest, name in (line.split(None, 1) for line in out.splitlines())}


def other(host: Any) -> str:
    name = host.backend.get_hostname()
    return "pgbackup-debian12" if name == "pgbackup-debian11" else "pgbackup-debian11"


def test_backup_directory_is_private_to_postgres(host: Any) -> None:
    top = host.file(BACKUPS)
    assert top.is_directory and top.user == "postgres" and top.mode == 0o700


def test_every_file_and_directory_of_the_backup_is_0600_or_0700_owned_by_postgres(host: Any) -> None:
    out = host.check_output(f"find {BACKUPS}/rel-1 -printf '%y %m %u %p\\n'")
    entries = [line.split(" ", 3) for line in out.splitlines()]
    assert len(entries) > 5
    for kind, mode, user, path in entries:
        assert user == "postgres", path
        assert mode == ("700" if kind == "d" else "600"), f"{path} has mode {mode}"


def test_manifest_checksums_match_the_files_on_disk(host: Any) -> None:
    doc = manifest(host, f"{BACKUPS}/rel-1")
    on_disk = sha256_of_files(host, f"{BACKUPS}/rel-1")
    assert set(doc["files"]) == set(on_disk) and "dump/toc.dat" in on_disk
    assert {name: entry["sha256"] for name, entry in doc["files"].items()} == on_disk
    assert doc["dump_size_bytes"] == sum(e["size"] for e in doc["files"].values())


def test_manifest_describes_the_database(host: Any) -> None:
    doc = manifest(host, f"{BACKUPS}/rel-1")
    assert doc["backup_id"] == "rel-1" and doc["release_id"] == "2026.01.31-1" and doc["database"] == DB
    server_major = int(psql(host, "SHOW server_version_num")) // 10000
    assert doc["server_version_num"] // 10000 == server_major
    assert doc["pg_dump_major"] >= server_major
    assert doc["compression"] == 1 and doc["dump_format"] == "directory"
    tables = doc["fingerprints"]["tables"]
    assert set(tables) == {"public.customers", "public.orders", "public.order_notes", "public.django_migrations"}
    assert tables["public.orders"]["rows"] == 150000 and tables["public.customers"]["rows"] == 5000
    assert [(r["app"], r["name"]) for r in doc["migrations"]["rows"]] == [
        ("contenttypes", "0001_initial"),
        ("shop", "0001_initial"),
        ("shop", "0002_orders"),
    ]
    assert doc["database_properties"]["owner"] == "molecule_app"


def test_fingerprints_in_the_manifest_equal_the_live_database(host: Any) -> None:
    result = host.run(
        f"runuser -u postgres -- /opt/pg-tools/venv/bin/python /opt/pg-tools/venv/bin/db_fingerprint.py "
        f"compare {BACKUPS}/rel-1/manifest.json dsn:dbname={DB}"
    )
    assert result.rc == 0, result.stdout + result.stderr


def test_backup_was_verified_with_a_test_restore_and_the_scratch_database_dropped(host: Any) -> None:
    verified = json.loads(host.file(f"{BACKUPS}/rel-1/verified.json").content_string)
    assert verified["verified"] is True
    assert verified["manifest_sha256"] == host.file(f"{BACKUPS}/rel-1/manifest.json").sha256sum
    assert verified["checks"]["test_restore"]["equal"] is True
    assert verified["checks"]["test_restore"]["rows"] == 150000 + 5000 + 20000 + 3
    assert verified["checks"]["pg_restore_list"]["entries"] > 10
    assert psql(host, f"SELECT count(*) FROM pg_database WHERE datname LIKE '{DB}\\_\\_%'") == "0"


def test_crashed_partial_was_cleaned_and_redone(host: Any) -> None:
    assert not host.file(f"{BACKUPS}/rel-1.partial").exists
    assert "dump/junk.dat" not in manifest(host, f"{BACKUPS}/rel-1")["files"]


def test_retention_kept_the_marked_and_last_two_and_deleted_the_rest(host: Any) -> None:
    assert host.file(f"{BACKUPS}/old-1/verified.json").exists  # named by the migration marker
    assert not host.file(f"{BACKUPS}/old-2").exists
    assert host.file(f"{BACKUPS}/old-3/verified.json").exists
    assert host.file(f"{BACKUPS}/rel-1/verified.json").exists


def test_copy_on_the_other_instance_matches_its_manifest(host: Any) -> None:
    # this instance holds the copy the other one sent
    copy = f"/var/backups/pg-copy/{other(host)}/rel-1"
    assert host.file(copy).mode == 0o700 and host.file(copy).user == "postgres"
    doc = manifest(host, copy)
    assert {name: entry["sha256"] for name, entry in doc["files"].items()} == sha256_of_files(host, copy)
    modes = set(host.check_output(f"find {copy} -type f -printf '%m %u\\n'").splitlines())
    assert modes == {"600 postgres"}
    assert json.loads(host.file(f"{copy}/verified.json").content_string)["verified"] is True


def test_check_mode_run_wrote_nothing(host: Any) -> None:
    assert not host.file(f"{BACKUPS}/rel-check").exists
    assert not host.file(f"{BACKUPS}/rel-check.partial").exists


def test_a_failed_dump_left_no_backup_no_partial_and_no_async_job_file(host: Any) -> None:
    assert not host.file(f"{BACKUPS}/rel-dumpfail").exists
    assert not host.file(f"{BACKUPS}/rel-dumpfail.partial").exists
    # Every dump of prepare, converge, idempotence and the side effect ran as an async job of the
    # postgres user: each one's status file was removed once its result was read, the failed one too.
    assert host.file("/var/lib/postgresql/.ansible_async").is_directory
    assert host.check_output("find /var/lib/postgresql/.ansible_async -mindepth 1 -printf '%f\\n'") == ""


def test_corrupted_backup_stayed_unverified(host: Any) -> None:
    assert host.file(f"{BACKUPS}/rel-bad/manifest.json").exists
    assert not host.file(f"{BACKUPS}/rel-bad/verified.json").exists


@pytest.mark.parametrize("module", ["psycopg"])
def test_tool_virtualenv_has_psycopg(host: Any, module: str) -> None:
    out = host.check_output(f"/opt/pg-tools/venv/bin/python -c 'import {module}; print({module}.__version__)'")
    assert out.startswith("3.2.")


def test_metrics_describe_the_verified_backup_and_pass_promtool(host: Any) -> None:
    """djm_backup_<db>.prom: rel-1 (the corrupted rel-bad failed verification and wrote none); promtool on the controller."""
    prom = host.file(f"/var/lib/prometheus/node-exporter/djm_backup_{DB}.prom")
    assert prom.is_file and prom.mode == 0o644 and prom.user == "root"
    assert host.file("/var/lib/prometheus/node-exporter").mode == 0o755
    text = prom.content_string
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run make setup"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    rel1 = manifest(host, f"{BACKUPS}/rel-1")
    started, finished = (datetime.datetime.fromisoformat(rel1[k]).timestamp() for k in ("started_at", "finished_at"))
    label = f'{{database="{DB}"}}'
    assert float(samples[f"djm_backup_last_verified_timestamp_seconds{label}"]) == finished
    assert int(samples[f"djm_backup_last_verified_size_bytes{label}"]) == rel1["dump_size_bytes"]
    assert int(samples[f"djm_backup_last_verified_database_size_bytes{label}"]) == rel1["db_size_bytes"]
    assert float(samples[f"djm_backup_last_verified_duration_seconds{label}"]) == finished - started
    info = f'djm_backup_last_verified_info{{backup_id="rel-1",database="{DB}",release="2026.01.31-1"}}'
    assert samples[info] == "1"
