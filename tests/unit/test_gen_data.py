"""scripts/gen_data.py on the throwaway cluster: determinism, shape, consistency, refusals."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "acme"))
sys.path.insert(0, str(REPO / "scripts"))

import db_fingerprint  # noqa: E402
import gen_data  # noqa: E402
import harness as h  # noqa: E402

SIZE = "3MB"


@pytest.mark.parametrize(("text", "expected"), [("50MB", 50 * 2**20), ("2GB", 2 * 2**30), ("1.5 MiB", int(1.5 * 2**20))])
def test_parse_size(text: str, expected: int) -> None:
    assert gen_data.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "fifty", "10kB", "5 parsecs"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        gen_data.parse_size(text)


def test_plan_scales_with_size() -> None:
    small, big = gen_data.Plan.for_size(50 * 2**20, 1), gen_data.Plan.for_size(2 * 2**30, 1)
    assert big.orders > 40 * small.orders
    assert big.customers == big.orders // gen_data.ORDERS_PER_CUSTOMER
    assert gen_data.build_orders(small, 0, 1, 11) == gen_data.build_orders(small, 0, 1, 11)
    assert gen_data.build_orders(small, 0, 1, 11) != gen_data.build_orders(gen_data.Plan.for_size(50 * 2**20, 2), 0, 1, 11)


@pytest.fixture(scope="module")
def loaded(pg_cluster: h.Cluster) -> tuple[str, dict[str, object]]:
    dsn = h.v1_database(pg_cluster, "acme_gen_a")
    result = h.run_gen_data(dsn, SIZE, 5, 1, "--json")
    assert result.returncode == 0, result.stderr
    return dsn, json.loads(result.stdout)


def data_fingerprint(dsn: str) -> dict[str, object]:
    doc = db_fingerprint.fingerprint(dsn)
    return {name: value for name, value in doc["tables"].items() if name.split(".")[1] in h.DATA_TABLES}


@pytest.mark.slow
def test_same_seed_same_data_whatever_the_jobs(pg_cluster: h.Cluster, loaded: tuple[str, dict[str, object]]) -> None:
    dsn_a, _ = loaded
    dsn_b = h.v1_database(pg_cluster, "acme_gen_b")
    result = h.run_gen_data(dsn_b, SIZE, 5, 2)
    assert result.returncode == 0, result.stderr
    a, b = data_fingerprint(dsn_a), data_fingerprint(dsn_b)
    assert len(a) == len(h.DATA_TABLES)
    assert db_fingerprint.compare({"tables": a}, {"tables": b}) == []


@pytest.mark.slow
def test_other_seed_other_data(pg_cluster: h.Cluster, loaded: tuple[str, dict[str, object]]) -> None:
    dsn_c = h.v1_database(pg_cluster, "acme_gen_c")
    assert h.run_gen_data(dsn_c, SIZE, 6).returncode == 0
    a, c = data_fingerprint(loaded[0]), data_fingerprint(dsn_c)
    assert all(a[t]["hash"] != c[t]["hash"] for t in a)


@pytest.mark.slow
def test_size_and_orders_share(loaded: tuple[str, dict[str, object]]) -> None:
    dsn, report = loaded
    # What an autovacuum would do after the report (make the visibility and free space maps) must
    # not change the size the report gave: gen_data vacuums before it measures.
    h.query(dsn, "VACUUM " + ", ".join(h.DATA_TABLES))
    sizes = dict(
        h.query(dsn, "SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname = ANY(%s)", [list(h.DATA_TABLES)])
    )
    total = sum(sizes.values())
    assert report["total_bytes"] == total
    assert 0.25 <= sizes["orders"] / total <= 0.35, sizes
    assert 0.75 * 3 * 2**20 <= total <= 1.25 * 3 * 2**20, total
    assert report["tables"]["orders"]["rows"] == h.query(dsn, "SELECT count(*) FROM orders")[0][0]  # type: ignore[index]
    assert report["mb_per_s"] > 0


@pytest.mark.slow
def test_categories_are_messy_free_text(loaded: tuple[str, dict[str, object]]) -> None:
    dsn, _ = loaded
    raws = [r[0] for r in h.query(dsn, "SELECT DISTINCT category FROM products")]
    keys = {" ".join(r.split()).casefold() for r in raws}
    assert len(raws) > len(keys) + 5
    assert any(r != r.strip() for r in raws), "no leading/trailing whitespace variant"
    assert any(r.islower() for r in raws) and any(r.isupper() for r in raws)
    assert any("  " in r.strip() or "\u00a0" in r for r in raws), "no inner-whitespace variant"


@pytest.mark.slow
def test_rows_are_consistent(loaded: tuple[str, dict[str, object]]) -> None:
    dsn, _ = loaded
    orphans = h.query(
        dsn,
        "SELECT (SELECT count(*) FROM order_items i LEFT JOIN orders o ON o.id = i.order_id WHERE o.id IS NULL),"
        " (SELECT count(*) FROM order_items i LEFT JOIN products p ON p.id = i.product_id WHERE p.id IS NULL),"
        " (SELECT count(*) FROM payments y LEFT JOIN orders o ON o.id = y.order_id WHERE o.id IS NULL),"
        " (SELECT count(*) FROM orders o LEFT JOIN customers c ON c.id = o.customer_id WHERE c.id IS NULL),"
        " (SELECT count(*) FROM profiles f LEFT JOIN customers c ON c.id = f.customer_id WHERE c.id IS NULL)",
    )[0]
    assert orphans == (0, 0, 0, 0, 0)
    wrong_totals = h.query(
        dsn,
        "SELECT count(*) FROM orders o JOIN (SELECT order_id, sum(quantity * unit_price) AS s FROM order_items GROUP BY 1) i"
        " ON i.order_id = o.id WHERE i.s <> o.total",
    )[0][0]
    assert wrong_totals == 0
    empty = h.query(dsn, "SELECT count(*) FROM orders WHERE NOT EXISTS (SELECT 1 FROM order_items WHERE order_id = orders.id)")
    assert empty[0][0] == 0
    for table in h.DATA_TABLES:
        nxt, top = h.query(dsn, f"SELECT nextval(pg_get_serial_sequence('{table}', 'id')), (SELECT max(id) FROM {table})")[0]
        assert nxt > top, table
    stats = h.query(dsn, "SELECT count(*) FROM pg_stat_user_tables WHERE relname = ANY(%s) AND last_analyze IS NOT NULL",
                    [list(h.DATA_TABLES)])  # fmt: skip
    assert stats[0][0] == len(h.DATA_TABLES), "ANALYZE did not run"


@pytest.mark.slow
def test_generated_customers_have_working_legacy_passwords(loaded: tuple[str, dict[str, object]]) -> None:
    dsn, _ = loaded
    for cid, encoded in h.query(dsn, "SELECT id, legacy_password FROM customers WHERE id IN (1, 7, 42)"):
        algorithm, salt, digest = encoded.split("$")
        assert algorithm == "sha1"
        assert hashlib.sha1(f"{salt}acme-{cid}".encode()).hexdigest() == digest  # noqa: S324 - the legacy format


@pytest.mark.slow
def test_refuses_a_filled_database_unless_truncating(loaded: tuple[str, dict[str, object]]) -> None:
    dsn, _ = loaded
    before = data_fingerprint(dsn)
    again = h.run_gen_data(dsn, SIZE, 5)
    assert again.returncode != 0 and "is not empty" in again.stderr + again.stdout
    assert data_fingerprint(dsn) == before
    truncated = h.run_gen_data(dsn, SIZE, 5, 1, "--truncate")
    assert truncated.returncode == 0, truncated.stderr
    assert data_fingerprint(dsn) == before


@pytest.mark.slow
def test_refuses_a_database_without_the_v1_schema(pg_cluster: h.Cluster) -> None:
    dsn = pg_cluster.createdb("acme_gen_empty")
    result = h.run_gen_data(dsn, SIZE, 5)
    assert result.returncode != 0
    assert "not the ACME v1 schema" in result.stderr + result.stdout


@pytest.mark.slow
def test_non_superuser_owner_gets_the_same_data(pg_cluster: h.Cluster, loaded: tuple[str, dict[str, object]]) -> None:
    """As the app's own (non-superuser) role FK triggers stay on and parents load first: same rows."""
    h.query(pg_cluster.dsn(), "DROP DATABASE IF EXISTS acme_gen_owned")
    h.query(pg_cluster.dsn(), "DROP ROLE IF EXISTS acme_gen_app")
    h.query(pg_cluster.dsn(), "CREATE ROLE acme_gen_app LOGIN")
    h.query(pg_cluster.dsn(), "CREATE DATABASE acme_gen_owned OWNER acme_gen_app")
    env = h.django_env(pg_cluster, "acme_gen_owned", DATABASE_USER="acme_gen_app")
    h.must(h.manage("v1", env, "migrate", "--noinput", "-v0"))
    dsn = pg_cluster.dsn("acme_gen_owned").replace("user=postgres", "user=acme_gen_app")
    assert h.query(dsn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == [(False,)]
    result = h.run_gen_data(dsn, SIZE, 5)
    assert result.returncode == 0, result.stderr
    assert db_fingerprint.compare({"tables": data_fingerprint(loaded[0])}, {"tables": data_fingerprint(dsn)}) == []
    analyzed = h.query(
        dsn,
        "SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL AND relname = ANY(%s)",
        [list(h.DATA_TABLES)],
    )
    assert analyzed == [(len(h.DATA_TABLES),)]
