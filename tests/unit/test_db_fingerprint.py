"""scripts/db_fingerprint.py against the throwaway cluster (tests/conftest.py: pg_cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import db_fingerprint as fp  # noqa: E402

SCRIPT = REPO / "scripts" / "db_fingerprint.py"
BIG_ROWS = 1_000_000


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def query_one(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchone()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def small_db(pg_cluster: Any) -> str:
    """A database with a few small tables in two schemas."""
    dsn = pg_cluster.createdb("fp_small")
    execute(
        dsn,
        "CREATE TABLE customers (id int PRIMARY KEY, name text, note text)",
        "INSERT INTO customers SELECT g, 'customer ' || g, CASE WHEN g % 3 = 0 THEN NULL ELSE 'n' || g END"
        " FROM generate_series(1, 500) g",
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, amount numeric(10,2), placed timestamptz, f float8)",
        "INSERT INTO orders SELECT g, g % 500 + 1, g * 1.25, timestamptz '2024-01-01 00:00+00' + g * interval '1 minute',"
        " g / 7.0 FROM generate_series(1, 5000) g",
        "CREATE TABLE empty_table (id int)",
        "CREATE SCHEMA audit",
        "CREATE TABLE audit.events (id serial PRIMARY KEY, payload jsonb, raw bytea)",
        "INSERT INTO audit.events (payload, raw) SELECT jsonb_build_object('k', g), decode(md5(g::text), 'hex')"
        " FROM generate_series(1, 300) g",
        "CREATE VIEW order_view AS SELECT * FROM orders",
    )
    return dsn


@pytest.fixture(scope="module")
def big_db(pg_cluster: Any) -> Iterator[str]:
    """A database with a 1M-row table (plus a small one)."""
    dsn = pg_cluster.createdb("fp_big")
    execute(
        dsn,
        "CREATE TABLE big (id int PRIMARY KEY, label text, n numeric, created date)",
        f"INSERT INTO big SELECT g, md5(g::text), g * 3, date '2020-01-01' + g % 1000 FROM generate_series(1, {BIG_ROWS}) g",
        "CREATE TABLE small (id int PRIMARY KEY, v text)",
        "INSERT INTO small SELECT g, 'v' || g FROM generate_series(1, 100) g",
        "VACUUM ANALYZE",
    )
    yield dsn


def test_same_rows_in_different_physical_order_give_the_same_fingerprint(pg_cluster: Any) -> None:
    create = "CREATE TABLE items (id int, label text, price numeric, seen timestamptz)"
    rows = (
        "SELECT g, 'item ' || g, g * 0.5, timestamptz '2025-06-01 12:00+02' + g * interval '1 hour'"
        " FROM generate_series(1, 20000) g"
    )
    a = pg_cluster.createdb("fp_order_a")
    b = pg_cluster.createdb("fp_order_b")
    execute(a, create, f"INSERT INTO items {rows} ORDER BY 1")
    # Reverse then random order, plus dead tuples from an update/delete cycle: a different heap layout.
    execute(b, create, f"INSERT INTO items {rows} ORDER BY random()", "UPDATE items SET label = label WHERE id % 2 = 0")
    # The same session defaults must not matter: the tool pins TimeZone/DateStyle itself.
    execute(
        b, "ALTER DATABASE fp_order_b SET TimeZone = 'America/New_York'", "ALTER DATABASE fp_order_b SET DateStyle = 'SQL, DMY'"
    )
    order_a = query_one(a, "SELECT ctid::text FROM items WHERE id = 1")
    order_b = query_one(b, "SELECT ctid::text FROM items WHERE id = 1")
    assert order_a != order_b, "the two tables should have different physical layouts for this test to mean anything"

    fa, fb = fp.fingerprint(a), fp.fingerprint(b)
    assert fa["tables"] == fb["tables"]
    assert fa["tables"]["public.items"]["rows"] == 20000
    assert fa["database"] == "fp_order_a"
    assert fb["database"] == "fp_order_b"
    assert fp.compare(fa, fb) == []


def test_document_shape_and_table_selection(small_db: str) -> None:
    doc = fp.fingerprint(small_db)
    assert doc["format"] == 2
    assert doc["method"] == "columns1"
    assert doc["database"] == "fp_small"
    assert doc["server_version"].split(".")[0] in {"13", "14", "15", "16", "17"}
    assert doc["snapshot"] is None
    assert doc["taken_at"].endswith("+00:00")
    # Ordinary tables only: no views, no catalog tables, empty tables included.
    assert sorted(doc["tables"]) == ["audit.events", "public.customers", "public.empty_table", "public.orders"]
    assert doc["tables"]["public.orders"]["rows"] == 5000
    assert doc["tables"]["public.empty_table"] == {"rows": 0, "hash": "0"}
    assert int(doc["tables"]["public.orders"]["hash"]) != 0
    assert list(doc["tables"]) == sorted(doc["tables"])

    only_audit = fp.fingerprint(small_db, schemas=["audit"])
    assert list(only_audit["tables"]) == ["audit.events"]
    assert only_audit["tables"]["audit.events"] == doc["tables"]["audit.events"]
    excluded = fp.fingerprint(small_db, exclude_tables=["orders", "audit.*"])
    assert sorted(excluded["tables"]) == ["public.customers", "public.empty_table"]


def test_parallel_jobs_give_the_same_result_as_one_job(small_db: str, big_db: str) -> None:
    for dsn in (small_db, big_db):
        one = fp.fingerprint(dsn, jobs=1)
        many = fp.fingerprint(dsn, jobs=4)
        assert one["tables"] == many["tables"]
        assert len(one["tables"]) >= 2


def test_one_row_change_in_a_large_table_is_detected(big_db: str, record_property: Any) -> None:
    start = time.monotonic()
    before = fp.fingerprint(big_db)
    elapsed = time.monotonic() - start
    record_property("fingerprint_1m_rows_seconds", round(elapsed, 2))
    print(f"fingerprint of {BIG_ROWS} rows (1 job): {elapsed:.2f} s")
    assert before["tables"]["public.big"]["rows"] == BIG_ROWS

    try:
        execute(big_db, "UPDATE big SET label = label || 'x' WHERE id = 777777")
        changed = fp.fingerprint(big_db)
        assert fp.compare(before, changed) == [
            {"table": "public.big", "status": "content", "rows_a": BIG_ROWS, "rows_b": BIG_ROWS, "row_delta": 0}
        ]
    finally:
        execute(big_db, "UPDATE big SET label = md5(id::text) WHERE id = 777777")
    assert fp.fingerprint(big_db)["tables"] == before["tables"], "restoring the row must restore the fingerprint"

    try:
        execute(big_db, f"INSERT INTO big VALUES ({BIG_ROWS + 1}, 'new', 0, '2020-01-01')")
        inserted = fp.fingerprint(big_db)
        assert fp.compare(before, inserted) == [
            {"table": "public.big", "status": "rows", "rows_a": BIG_ROWS, "rows_b": BIG_ROWS + 1, "row_delta": 1}
        ]
    finally:
        execute(big_db, f"DELETE FROM big WHERE id = {BIG_ROWS + 1}")

    saved = query_one(big_db, "SELECT label, n, created FROM big WHERE id = 5")
    assert saved is not None
    try:
        execute(big_db, "DELETE FROM big WHERE id = 5")
        deleted = fp.fingerprint(big_db, jobs=2)
        assert fp.compare(before, deleted)[0]["row_delta"] == -1
        assert fp.compare(deleted, before)[0]["row_delta"] == 1
    finally:
        with psycopg.connect(big_db, autocommit=True) as conn:
            conn.execute("INSERT INTO big VALUES (5, %s, %s, %s)", saved)
    assert fp.fingerprint(big_db)["tables"] == before["tables"]


def test_added_column_and_null_changes_are_detected(pg_cluster: Any) -> None:
    dsn = pg_cluster.createdb("fp_columns")
    execute(dsn, "CREATE TABLE t (id int, a text)", "INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 1000) g")
    base = fp.fingerprint(dsn)

    execute(dsn, "ALTER TABLE t ADD COLUMN extra int")  # all NULL: only the row shape changes
    added = fp.fingerprint(dsn)
    assert [d["status"] for d in fp.compare(base, added)] == ["content"]

    execute(dsn, "UPDATE t SET a = NULL WHERE id = 10")
    nulled = fp.fingerprint(dsn)
    assert [(d["table"], d["status"]) for d in fp.compare(added, nulled)] == [("public.t", "content")]

    execute(dsn, "UPDATE t SET a = '' WHERE id = 10")  # empty string is not NULL
    emptied = fp.fingerprint(dsn)
    assert fp.compare(nulled, emptied) != []
    assert fp.compare(added, emptied) != []


def test_snapshot_mode_ignores_rows_committed_after_the_snapshot(pg_cluster: Any) -> None:
    dsn = pg_cluster.createdb("fp_snapshot")
    execute(
        dsn,
        "CREATE TABLE t1 (id int)",
        "CREATE TABLE t2 (id int)",
        "INSERT INTO t1 SELECT generate_series(1, 1000)",
        "INSERT INTO t2 SELECT generate_series(1, 1000)",
    )
    pre = fp.fingerprint(dsn)
    with psycopg.connect(dsn, autocommit=True) as holder, psycopg.connect(dsn, autocommit=True) as writer:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        row = holder.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        snapshot = row[0]
        writer.execute("INSERT INTO t1 SELECT generate_series(1001, 1500)")
        writer.execute("DELETE FROM t2 WHERE id <= 10")
        writer.execute("CREATE TABLE t3 (id int)")

        in_snapshot = fp.fingerprint(dsn, snapshot=snapshot, jobs=3)
        assert in_snapshot["snapshot"] == snapshot
        assert in_snapshot["tables"] == pre["tables"]

        # The same through the command line, as a backup helper would call it.
        cli = run_cli("fingerprint", "--dsn", dsn, "--snapshot", snapshot, "--jobs", "2")
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["tables"] == pre["tables"]
        holder.execute("COMMIT")

    now = fp.fingerprint(dsn, jobs=2)
    diffs = {d["table"]: d for d in fp.compare(pre, now)}
    assert diffs["public.t1"]["row_delta"] == 500
    assert diffs["public.t2"]["row_delta"] == -10
    assert diffs["public.t3"]["status"] == "only_in_b"


def test_unknown_snapshot_is_refused(small_db: str) -> None:
    with pytest.raises(fp.FingerprintError, match="cannot import snapshot"):
        fp.fingerprint(small_db, snapshot="00000003-0000001B-1")


def test_compare_cli_exit_codes_and_output(tmp_path: Path, small_db: str) -> None:
    a = tmp_path / "a.json"
    assert run_cli("fingerprint", "--dsn", small_db, "--output", str(a)).returncode == 0
    doc = json.loads(a.read_text())
    assert set(doc) == {"format", "method", "database", "server_version", "snapshot", "taken_at", "tables"}

    same = run_cli("compare", str(a), f"dsn:{small_db}")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "equal" in same.stdout

    changed = json.loads(a.read_text())
    changed["tables"]["public.orders"]["rows"] += 3
    changed["tables"]["public.customers"]["hash"] = "12345"
    del changed["tables"]["audit.events"]
    # A pg_backup manifest carries the fingerprint under "fingerprints".
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"database": "fp_small", "fingerprints": changed}))

    diff = run_cli("compare", str(a), str(manifest))
    assert diff.returncode == 1
    lines = {line.split()[0]: line for line in diff.stdout.splitlines() if line.strip()}
    assert "+3" in lines["public.orders"]
    assert "row count differs" in lines["public.orders"]
    assert "content differs" in lines["public.customers"]
    assert "missing in B" in lines["audit.events"]
    assert "public.empty_table" not in lines
    assert "3 differ" in diff.stdout

    as_json = run_cli("compare", "--json", str(a), str(manifest))
    assert as_json.returncode == 1
    assert {d["table"]: d["status"] for d in json.loads(as_json.stdout)} == {
        "audit.events": "only_in_a",
        "public.customers": "content",
        "public.orders": "rows",
    }

    excluded = run_cli(
        "compare", str(a), str(manifest), "--exclude-table", "orders", "--exclude-table", "customers", "--schema", "public"
    )
    assert excluded.returncode == 0, excluded.stdout

    missing = run_cli("compare", str(a), str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert "nope.json" in missing.stderr

    not_a_fingerprint = tmp_path / "other.json"
    not_a_fingerprint.write_text(json.dumps({"hello": 1}))
    wrong = run_cli("compare", str(a), str(not_a_fingerprint))
    assert wrong.returncode == 2
    assert "neither a fingerprint" in wrong.stderr


def test_bad_dsn_is_refused_with_a_clear_message(pg_cluster: Any) -> None:
    result = run_cli("fingerprint", "--dsn", f"host=127.0.0.1 port={pg_cluster.port} dbname=no_such_db password=s3cr3t")
    assert result.returncode == 2
    assert "cannot connect to" in result.stderr
    assert "no_such_db" in result.stderr
    assert "s3cr3t" not in result.stderr
    assert result.stdout == ""

    unreachable = run_cli("compare", "dsn:host=127.0.0.1 port=1 connect_timeout=3", "dsn:host=127.0.0.1 port=1")
    assert unreachable.returncode == 2
    assert "cannot connect to" in unreachable.stderr

    with pytest.raises(fp.FingerprintError, match="jobs must be at least 1"):
        fp.fingerprint(pg_cluster.dsn(), jobs=0)


def test_old_servers_are_refused_clearly() -> None:
    with pytest.raises(fp.FingerprintError, match=r"9\.6 is too old.*PostgreSQL 11"):
        fp.check_server_version(90624)
    with pytest.raises(fp.FingerprintError, match=r"server version 10 is too old"):
        fp.check_server_version(100023)
    fp.check_server_version(110000)
    fp.check_server_version(150010)


def test_connection_factory_is_accepted(small_db: str) -> None:
    opened: list[psycopg.Connection[Any]] = []

    def factory() -> psycopg.Connection[Any]:
        conn = psycopg.connect(small_db)
        opened.append(conn)
        return conn

    doc = fp.fingerprint(factory, jobs=2)
    assert doc["tables"] == fp.fingerprint(small_db)["tables"]
    assert len(opened) == 2
    assert all(conn.closed for conn in opened)


# Every kind of column a Django project has, and a few it may: the built-in types hashed by their own
# function, the rest as text (numeric, floats, dates, intervals, bytea, enums, arrays, char(n), inet).
TYPED_TABLE = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE typed (
    id bigint PRIMARY KEY, small smallint, n int, flag boolean, label text, code varchar(8),
    price numeric(10, 2), amount numeric, ratio float8, born date, seen timestamp, at timestamptz, span interval,
    ref uuid, doc jsonb, raw bytea, feeling mood, tags text[], fixed char(4), addr inet
);
INSERT INTO typed SELECT g, g % 100, g * 7, g % 2 = 0, 'label ' || g, 'c' || g % 1000, g * 1.25, g * 1.5, g / 3.0,
    date '2020-01-01' + g, timestamp '2024-01-01' + g * interval '1 minute',
    timestamptz '2024-01-01 00:00+00' + g * interval '1 second', g * interval '1 hour',
    md5(g::text)::uuid, jsonb_build_object('k', g, 'l', ARRAY[g, g + 1]), decode(md5(g::text), 'hex'),
    (ARRAY['sad', 'ok', 'happy'])[g % 3 + 1]::mood, ARRAY['a' || g, 'b'], 'x' || g % 10, ('10.0.' || g % 250 || '.1')::inet
  FROM generate_series(1, 3000) g;
INSERT INTO typed (id) VALUES (0);
"""


def test_columns_method_survives_dump_and_restore_and_sees_every_change(pg_cluster: Any, tmp_path: Path) -> None:
    """The proof of a restore: pg_dump of one database restored into another gives the same fingerprint
    (the enum's OIDs change in the restore: it is hashed by its label), and a change to any one value,
    a numeric's scale or a float's sign included, changes it."""
    src = pg_cluster.createdb("fp_typed_src")
    execute(src, *[st for st in TYPED_TABLE.split(";") if st.strip()])
    dump = tmp_path / "typed.dump"
    subprocess.run([pg_cluster.bin("pg_dump"), "-Fc", "-f", str(dump), "-d", src], env=pg_cluster.env(), check=True)
    dst = pg_cluster.createdb("fp_typed_dst")
    subprocess.run([pg_cluster.bin("pg_restore"), "-d", dst, str(dump)], env=pg_cluster.env(), check=True)
    enum_oid = "SELECT oid FROM pg_enum WHERE enumlabel = 'ok'"
    assert query_one(src, enum_oid) != query_one(dst, enum_oid), "the restore should give the enum new OIDs"
    before = fp.fingerprint(src)
    assert before["method"] == "columns1"
    assert fp.compare(before, fp.fingerprint(dst)) == []
    changes = [
        "UPDATE typed SET small = small + 1 WHERE id = 5",
        "UPDATE typed SET n = n + 1 WHERE id = 5",
        "UPDATE typed SET flag = NOT flag WHERE id = 5",
        "UPDATE typed SET label = label || ' ' WHERE id = 5",
        "UPDATE typed SET code = upper(code) WHERE id = 5",
        "UPDATE typed SET price = 6.3 WHERE id = 5",
        "UPDATE typed SET amount = 9.00 WHERE id = 6",  # 9.0 -> 9.00: the same number, another scale
        "UPDATE typed SET ratio = 0 WHERE id = 0",
        "UPDATE typed SET ratio = '-0'::float8 WHERE id = 0",
        "UPDATE typed SET born = born + 1 WHERE id = 5",
        "UPDATE typed SET seen = seen + interval '1 microsecond' WHERE id = 5",
        "UPDATE typed SET at = at + interval '1 microsecond' WHERE id = 5",
        "UPDATE typed SET span = span + interval '1 second' WHERE id = 5",
        "UPDATE typed SET ref = md5('other')::uuid WHERE id = 5",
        "UPDATE typed SET doc = doc || '{\"m\": 1}' WHERE id = 5",
        "UPDATE typed SET raw = raw || '\\x00'::bytea WHERE id = 5",
        "UPDATE typed SET feeling = 'happy' WHERE id = 4",
        "UPDATE typed SET tags = tags || 'c'::text WHERE id = 5",
        "UPDATE typed SET fixed = 'y' WHERE id = 5",
        "UPDATE typed SET addr = '10.0.0.2' WHERE id = 5",
        "UPDATE typed SET label = NULL WHERE id = 5",
        "UPDATE typed SET label = '' WHERE id = 0",
        "UPDATE typed SET small = n, n = small WHERE id = 7",  # the same values, in each other's column
    ]
    seen = before
    for change in changes:
        execute(src, change)
        now = fp.fingerprint(src)
        assert [d["status"] for d in fp.compare(seen, now)] == ["content"], change
        seen = now
    execute(src, "UPDATE typed SET price = 7.5 WHERE id = 6")  # 7.50 in a numeric(10, 2) column: stored as it was
    assert fp.compare(seen, fp.fingerprint(src)) == []
    # The text method sees the same changes: the two methods agree on what is equal.
    assert fp.compare(fp.fingerprint(dst, method="text"), fp.fingerprint(src, method="text")) != []


def test_columns_method_ignores_column_order_the_text_method_does_not(pg_cluster: Any) -> None:
    """A reversed RemoveField adds its column back at the end of the table: the same data reads back
    in another column order. The default method proves it equal; the text method (format 1) cannot."""
    a = pg_cluster.createdb("fp_colorder_a")
    b = pg_cluster.createdb("fp_colorder_b")
    execute(
        a,
        "CREATE TABLE t (id int, name text, price numeric)",
        "INSERT INTO t SELECT g, 'n' || g, g FROM generate_series(1, 500) g",
    )
    execute(
        b,
        "CREATE TABLE t (id int, price numeric, name text)",
        "INSERT INTO t SELECT g, g, 'n' || g FROM generate_series(1, 500) g",
    )
    assert fp.compare(fp.fingerprint(a), fp.fingerprint(b)) == []
    assert [d["status"] for d in fp.compare(fp.fingerprint(a, method="text"), fp.fingerprint(b, method="text"))] == ["content"]
    execute(b, "ALTER TABLE t RENAME COLUMN name TO title")  # a column's name is part of the row
    assert [d["status"] for d in fp.compare(fp.fingerprint(a), fp.fingerprint(b))] == ["content"]


def test_a_format_1_fingerprint_is_compared_by_its_own_method(tmp_path: Path, small_db: str) -> None:
    """Backups taken before the columns method carry format-1 fingerprints (the text method): a live
    side is taken by that method, and two fingerprints of different methods are never compared."""
    old = fp.fingerprint(small_db, method="text")
    legacy = {k: v for k, v in old.items() if k != "method"} | {"format": 1}
    assert fp.method_of(legacy) == "text"
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"database": "fp_small", "fingerprints": legacy}))
    same = run_cli("compare", str(manifest), f"dsn:{small_db}")
    assert same.returncode == 0, same.stdout + same.stderr
    with pytest.raises(fp.FingerprintError, match="different methods"):
        fp.compare(legacy, fp.fingerprint(small_db))
    with pytest.raises(fp.FingerprintError, match="unknown fingerprint method"):
        fp.fingerprint(small_db, method="md5")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(old | {"method": "sha9"}))
    refused = run_cli("compare", str(unknown), f"dsn:{small_db}")
    assert refused.returncode == 2
    assert "method 'sha9'" in refused.stderr


def test_columns_method_is_faster_than_text(big_db: str, record_property: Any) -> None:
    """Not a timed assertion (the machine is shared): both timings are recorded side by side."""
    t0 = time.monotonic()
    text = fp.fingerprint(big_db, method="text")
    t1 = time.monotonic()
    columns = fp.fingerprint(big_db)
    t2 = time.monotonic()
    record_property("text_seconds", round(t1 - t0, 3))
    record_property("columns1_seconds", round(t2 - t1, 3))
    assert text["tables"]["public.big"]["rows"] == columns["tables"]["public.big"]["rows"] == BIG_ROWS
