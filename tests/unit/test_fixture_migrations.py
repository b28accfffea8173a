"""ACME v1 -> v2 -> v1 on generated data: the migrations the upgrade is about, and their failure modes."""

from __future__ import annotations

import collections
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "acme"))

import harness as h  # noqa: E402

pytestmark = pytest.mark.slow

SIZE = "4MB"
V1_LEAVES = {"catalog": "0001_initial", "cms": "0001_initial", "orders": "0001_initial", "profiles": "0001_initial"}


@pytest.fixture(scope="module")
def generated(pg_cluster: h.Cluster) -> str:
    """A v1 database with generated data, used as the template of each test's own copy."""
    dsn = h.v1_database(pg_cluster, "acme_mig_generated")
    result = h.run_gen_data(dsn, SIZE, seed=11)
    assert result.returncode == 0, result.stderr
    return "acme_mig_generated"


def copy_of(pg_cluster: h.Cluster, template: str, name: str) -> tuple[str, dict[str, str]]:
    return pg_cluster.createdb(name, template=template), h.django_env(pg_cluster, name)


def expected_categories(dsn: str) -> dict[str, int]:
    """Products per category as the test itself normalizes them (whitespace collapsed, case folded)."""
    counts: collections.Counter[str] = collections.Counter()
    for raw, n in h.query(dsn, "SELECT category, count(*) FROM products GROUP BY category"):
        counts[" ".join(raw.split()).casefold()] += n
    return dict(counts)


def test_v2_forward_then_back_to_the_v1_leaves_restores_the_data(pg_cluster: h.Cluster, generated: str) -> None:
    dsn, env = copy_of(pg_cluster, generated, "acme_mig_roundtrip")
    before = h.fingerprint(dsn)
    applied_before = h.applied_migrations(dsn)
    expected = expected_categories(dsn)
    (raw_distinct,) = h.query(dsn, "SELECT count(DISTINCT category) FROM products")[0]
    assert raw_distinct > len(expected), "the generated categories should be messy"
    (n_products,) = h.query(dsn, "SELECT count(*) FROM products")[0]

    started = time.monotonic()
    h.must(h.manage("v2", env, "migrate", "--noinput"))
    forward = time.monotonic() - started

    # (b) categories normalized: one row per key, every product linked, counts equal, string column gone.
    linked = dict(
        h.query(
            dsn,
            "SELECT lower(c.name), count(*) FROM products AS p JOIN catalog_categories AS c ON c.id = p.category_id GROUP BY 1",
        )
    )
    assert linked == expected
    assert h.query(dsn, "SELECT count(*) FROM catalog_categories")[0][0] == len(expected)
    columns = dict(h.query(dsn, "SELECT column_name, is_nullable FROM information_schema.columns WHERE table_name = 'products'"))
    assert "category" not in columns and columns["category_id"] == "NO"
    assert h.query(dsn, "SELECT count(*) FROM catalog_legacy_product_categories")[0][0] == n_products
    # (a) profiles backfilled from their customer.
    assert h.query(dsn, "SELECT count(*) FROM profiles WHERE display_name IS NULL OR locale IS NULL")[0][0] == 0
    mismatched = h.query(
        dsn,
        "SELECT count(*) FROM profiles p JOIN customers c ON c.id = p.customer_id"
        " WHERE p.display_name <> btrim(c.first_name || ' ' || c.last_name)"
        " OR (c.country = 'DE' AND p.locale <> 'de-DE') OR (c.country = 'SE' AND p.locale <> 'en')",
    )[0][0]
    assert mismatched == 0
    # (c) tagging tables.
    for table in ("cms_tags", "cms_page_tags", "product_tags"):
        assert h.query(dsn, "SELECT to_regclass(%s) IS NOT NULL", [table])[0][0], table
    # (d) the orders index, built concurrently and valid.
    index = h.query(
        dsn,
        "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'orders_customer_created_idx'",
    )
    assert index and index[0][0] is True and "(customer_id, created_at)" in index[0][1]

    started = time.monotonic()
    for app, leaf in V1_LEAVES.items():
        h.must(h.manage("v2", env, "migrate", "--noinput", app, leaf))
    backward = time.monotonic() - started
    assert h.applied_migrations(dsn) == applied_before

    after = h.fingerprint(dsn)
    # Django never deletes content types/permissions on unapply: only those tables may differ here.
    stale = {t for t in before if before[t] != after.get(t)}
    assert stale <= {"django_content_type", "auth_permission"}, stale
    h.must(h.manage("v1", env, "remove_stale_contenttypes", "--noinput"))
    assert h.fingerprint(dsn) == before
    print(f"\n{SIZE}: v1->v2 migrate {forward:.1f}s, back to v1 leaves {backward:.1f}s")


def test_normalization_raises_and_rolls_back_on_inconsistent_data(pg_cluster: h.Cluster, generated: str) -> None:
    """A legacy trigger unlinks a product behind the migration's back: the validation must catch it."""
    dsn, env = copy_of(pg_cluster, generated, "acme_mig_inconsistent")
    strings_before = h.fingerprint(dsn, ("products",))
    h.query(
        dsn,
        """
        CREATE FUNCTION legacy_products_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.id % 7 = 0 THEN NEW.category_ref_id := NULL; END IF;  -- the inconsistency
          RETURN NEW;
        END $$;
        CREATE TRIGGER legacy_products_audit BEFORE UPDATE ON products
          FOR EACH ROW EXECUTE FUNCTION legacy_products_audit();
        """,
    )
    (unlinked,) = h.query(dsn, "SELECT count(*) FROM products WHERE id % 7 = 0")[0]
    assert unlinked > 0
    result = h.manage("v2", env, "migrate", "--noinput")
    assert result.returncode != 0
    assert "CategoryNormalizationError" in result.stderr
    assert f"{unlinked} products have no category" in result.stderr
    applied = h.applied_migrations(dsn)
    assert ("catalog", "0002_category") in applied and ("catalog", "0003_normalize_categories") not in applied
    # The failed migration left nothing behind: no categories, no archive, no links, strings untouched.
    assert h.query(dsn, "SELECT count(*) FROM catalog_categories")[0][0] == 0
    assert h.query(dsn, "SELECT count(*) FROM catalog_legacy_product_categories")[0][0] == 0
    assert h.query(dsn, "SELECT count(*) FROM products WHERE category_ref_id IS NOT NULL")[0][0] == 0
    h.query(dsn, "DROP TRIGGER legacy_products_audit ON products")
    h.must(h.manage("v2", env, "migrate", "--noinput", "catalog", "0001"))
    assert h.fingerprint(dsn, ("products",)) == strings_before
    # Without the trigger the same migration goes through.
    h.must(h.manage("v2", env, "migrate", "--noinput"))


def test_bad_migration_fails_after_committing_part_of_its_work(pg_cluster: h.Cluster, generated: str) -> None:
    dsn, env = copy_of(pg_cluster, generated, "acme_mig_bad")
    (total,) = h.query(dsn, "SELECT count(*) FROM payments")[0]
    result = h.manage("v2-bad-migration", env, "migrate", "--noinput")
    assert result.returncode != 0
    assert "LEGACY-POS" in result.stderr
    (rewritten,) = h.query(dsn, "SELECT count(*) FROM payments WHERE provider = upper(provider)")[0]
    assert 0 < rewritten < total, (rewritten, total)  # partial work, committed
    applied = h.applied_migrations(dsn)
    assert ("payments", "0002_reconcile_providers") not in applied
    assert ("catalog", "0005_product_tags") in applied and ("profiles", "0003_backfill_profiles") in applied
    # Re-running does not heal it: the same failure, more damage is not undone.
    again = h.manage("v2-bad-migration", env, "migrate", "--noinput")
    assert again.returncode != 0


def test_old_code_on_the_migrated_database(pg_cluster: h.Cluster, generated: str) -> None:
    """The rolling deploy serves v1 code against the v2 schema for a while.

    /healthz, profiles and pages keep working; the catalog does not, because v2 drops the v1
    category column in the same release (catalog.0004): v1's checkout fails until its node is
    switched. The deploy roles must not expect old nodes to pass a checkout after `migrate`.
    """
    dsn, env = copy_of(pg_cluster, generated, "acme_mig_rolling")
    h.must(h.manage("v2", env, "migrate", "--noinput"))
    (slug,) = h.query(dsn, "SELECT slug FROM cms_pages WHERE published ORDER BY id LIMIT 1")[0]
    with h.gunicorn("v1", env) as base:
        code, body = h.http_get(base + "/healthz")
        assert code == 200, body
        assert h.http_get(base + "/smoke/profile/1")[0] == 200
        assert h.http_get(base + f"/pages/{slug}")[0] == 200
        request = urllib.request.Request(base + "/smoke/checkout?dry_run=1", data=b"", method="POST")  # noqa: S310 - local
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(request, timeout=30)  # noqa: S310 - local test server
        assert failure.value.code == 500
    with h.gunicorn("v2", env) as base:
        request = urllib.request.Request(base + "/smoke/checkout?dry_run=1", data=b"", method="POST")  # noqa: S310 - local
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - local test server
            assert response.status == 200


def _wait_for_lock_wait(dsn: str, other_than: int, timeout: float = 60.0) -> None:
    """Until a backend of this database other than `other_than` waits for a heavyweight lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (waiting,) = h.query(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> %s"
            " AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'",
            [other_than],
        )[0]
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError("the migration never waited for a lock")


def test_a_checkout_holding_a_product_is_never_a_deadlock_victim_of_the_category_normalization(
    pg_cluster: h.Cluster, generated: str
) -> None:
    """The live checkout (both releases) locks its products FOR UPDATE, then updates their inventory.

    A data migration of the catalog that took a table lock weaker than EXCLUSIVE (SHARE ROW
    EXCLUSIVE lets FOR UPDATE holders in) would be granted while a checkout holds a product, then
    wait for that row while the checkout waits for the table: a deadlock whose victim, after
    deadlock_timeout, is whichever waited first, the checkout here (a 500 during expand, seen in
    the root scenario). Both must go through: the migration waits, the checkout commits.
    """
    dsn, env = copy_of(pg_cluster, generated, "acme_mig_deadlock")
    h.must(h.manage("v2", env, "migrate", "--noinput", "catalog", "0002_category"))  # its ALTERs take ACCESS EXCLUSIVE
    (product_id,) = h.query(dsn, "SELECT min(id) FROM products")[0]
    with psycopg.connect(dsn) as checkout:
        checkout.execute("SET statement_timeout = '20s'")
        checkout_pid = checkout.info.backend_pid
        checkout.execute("SELECT id FROM products WHERE id = %s FOR UPDATE", [product_id])
        migrate = subprocess.Popen(
            [str(h.venv_python("v2")), "manage.py", "migrate", "--noinput", "catalog", "0003_normalize_categories"],
            cwd=h.release_dir("v2"),
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for_lock_wait(dsn, other_than=checkout_pid)
            time.sleep(1.5)  # past the migration's own deadlock check (deadlock_timeout 1 s)
            checkout.execute("UPDATE products SET inventory = inventory - 1 WHERE id = %s", [product_id])
            checkout.commit()
            out, err = migrate.communicate(timeout=300)
        finally:
            if migrate.poll() is None:
                migrate.kill()
                migrate.wait()
    assert migrate.returncode == 0, out + err
    assert ("catalog", "0003_normalize_categories") in h.applied_migrations(dsn)
