"""roles/django_release/files/migrate_two_phase.py on real Django migrations and the throwaway PostgreSQL.

* the fixture's v1 -> v2, run like on a host (v2's virtualenv and release directory, the plan made by
  migration_plan.py on a v1 database with generated data): expand keeps the v1 and the v2 code working
  side by side, contract finishes the schema, is idempotent, refuses the NULLs the old code wrote in
  the window and takes a backfill; lock timeouts retried, then exit 4 with the database consistent;
* a tiny generated project on Django 3.2, 4.2 and 5.2: a FK column dropped (interim: its constraint
  and NOT NULL dropped) and a new column made NOT NULL, the old code's ORM writing NULL in the window;
* the helpers on their own (no database).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "roles" / "django_release" / "files"
TOOL = FILES / "migrate_two_phase.py"
PLANNER = FILES / "migration_plan.py"
sys.path.insert(0, str(REPO / "examples" / "acme"))

import build_release  # noqa: E402 - scripts/ is on sys.path (tests/conftest.py)
import harness as h  # noqa: E402

_spec = importlib.util.spec_from_file_location("migrate_two_phase", TOOL)
assert _spec is not None and _spec.loader is not None
tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp)

CATEGORY_STRING = "catalog.0004_remove_product_category_string"
DROP_CATEGORY = 'ALTER TABLE "products" DROP COLUMN "category" CASCADE;'
CATEGORY_NOT_NULL = 'ALTER TABLE "products" ALTER COLUMN "category_id" SET NOT NULL;'
# The pins of test_migration_plan.py's Django 5 virtualenv: build_release caches venvs by their hash, so it is built once.
DJANGO5_REQUIREMENTS = b"Django==5.2.19\nasgiref==3.13.0\nsqlparse==0.6.1\npsycopg2-binary==2.9.13\n"


def run(python: Path, cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def columns(dsn: str, table: str) -> dict[str, str]:
    """{column: is_nullable} of a table."""
    rows = h.query(dsn, "SELECT column_name, is_nullable FROM information_schema.columns WHERE table_name = %s", [table])
    return dict(rows)


def recorded(dsn: str) -> list[str]:
    return [f"{a}.{n}" for a, n in h.query(dsn, "SELECT app, name FROM django_migrations ORDER BY id")]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("migrate_two_phase: error: "), result.stderr
    return result.stderr


@contextmanager
def table_locked(dsn: str, table: str) -> Iterator[psycopg.Connection[Any]]:
    """Another session holds ACCESS SHARE on `table` (a long read): DDL on it waits, reads and writes go on."""
    with psycopg.connect(dsn) as blocker:
        blocker.execute(f"LOCK TABLE {table} IN ACCESS SHARE MODE")
        yield blocker
        blocker.rollback()


# --------------------------------------------------------------------------------------------
# The fixture: v1 -> v2
# --------------------------------------------------------------------------------------------


class Acme:
    """A copy of the generated v1 database, the plan for it, and the tool run as on a host (v2)."""

    def __init__(self, cluster: h.Cluster, template: str, name: str, plan: dict[str, Any], tmp: Path) -> None:
        self.dsn = cluster.createdb(name, template=template)
        self.env = h.django_env(cluster, name, DJANGO_SETTINGS_MODULE="acme.settings")
        self.plan_doc = plan
        self.plan = tmp / "plan.json"
        self.plan.write_text(json.dumps(plan))
        self.state = tmp / "state.json"

    def tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(h.venv_python("v2"), h.release_dir("v2"), self.env, str(TOOL), *args)

    def expand(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.tool("expand", "--plan", str(self.plan), "--state", str(self.state), *args)

    def contract(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.tool("contract", "--state", str(self.state), *args)


@pytest.fixture(scope="module")
def acme_v1(pg_cluster: h.Cluster) -> tuple[str, dict[str, Any]]:
    """A v1 database with generated data (the template of each test's copy) and v2's plan for it."""
    dsn = h.v1_database(pg_cluster, "acme_2p_generated")
    generated = h.run_gen_data(dsn, "2MB", seed=7)
    assert generated.returncode == 0, generated.stderr
    env = h.django_env(pg_cluster, "acme_2p_generated", DJANGO_SETTINGS_MODULE="acme.settings")
    plan = json.loads(ok(run(h.venv_python("v2"), h.release_dir("v2"), env, str(PLANNER), "--json")).stdout)
    assert (plan["verdict"], plan["strategy"]) == ("two_phase", "deferred_statements")
    return "acme_2p_generated", plan


@pytest.fixture
def acme(request: pytest.FixtureRequest, pg_cluster: h.Cluster, acme_v1: tuple[str, dict[str, Any]], tmp_path: Path) -> Acme:
    return Acme(pg_cluster, acme_v1[0], f"acme_2p_{request.node.name[5:40]}".lower(), acme_v1[1], tmp_path)


def post(url: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=b"", method="POST")  # noqa: S310 - a local test server
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - a local test server
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"body": exc.read().decode(errors="replace")}


@pytest.mark.slow
def test_fixture_expand_serves_both_codes_then_contract_finishes(acme: Acme) -> None:
    applied_before = set(recorded(acme.dsn))
    started = time.monotonic()
    expand = ok(acme.expand())
    expand_seconds = time.monotonic() - started

    # Every v2 migration is recorded, the django_migrations snapshot in the state is the table's content.
    now_recorded = recorded(acme.dsn)
    assert set(now_recorded) == applied_before | set(acme.plan_doc["pending"])
    state = load(acme.state)
    assert state["django_migrations"] == now_recorded
    assert state["expand"]["status"] == "done" and state["expand"]["exit_code"] == 0
    assert [m["migration"] for m in state["migrations"]] == acme.plan_doc["pending"]
    assert all(m["attempts"] == 1 and m["seconds"] >= 0 for m in state["migrations"])
    assert state["plan"]["leaf_nodes_before"]["catalog"] == "0001_initial"

    # The contract SQL was skipped and recorded; the interim DROP NOT NULL ran in its place.
    deferred = [(d["migration"], d["operation"], d["table"], d["column"], d["sql"]) for d in state["deferred"]]
    assert deferred == [
        (CATEGORY_STRING, 2, "products", "category", DROP_CATEGORY),
        (CATEGORY_STRING, 4, "products", "category_id", CATEGORY_NOT_NULL),
    ]
    assert state["deferred"][1]["not_null"] == [{"table": "products", "column": "category_id"}]
    assert state["deferred"][1]["filled_by"] == ["catalog.0003_normalize_categories #0 (RunPython)"]
    assert [i["sql"] for i in state["interim"]] == ['ALTER TABLE "products" ALTER COLUMN "category" DROP NOT NULL;']
    assert f"deferred to contract: {CATEGORY_STRING} #2: {DROP_CATEGORY}" in expand.stdout
    products = columns(acme.dsn, "products")
    assert products["category"] == "YES" and products["category_id"] == "YES"
    (unlinked,) = h.query(acme.dsn, "SELECT count(*) FROM products WHERE category_id IS NULL")[0]
    assert unlinked == 0

    # The old and the new code serve the same database at the same time, each with its own checkout.
    (orders_before,) = h.query(acme.dsn, "SELECT count(*) FROM orders")[0]
    with h.gunicorn("v1", acme.env) as v1, h.gunicorn("v2", acme.env) as v2:
        for base in (v1, v2, v1, v2):
            status, body = post(base + "/smoke/checkout")
            assert status == 201, (base, body)
        assert h.http_get(v1 + "/healthz")[0] == 200 and h.http_get(v2 + "/healthz")[0] == 200
    assert h.query(acme.dsn, "SELECT count(*) FROM orders")[0][0] == orders_before + 4
    # The new code's INSERT omits the v1 string column: it works because the column is nullable now.
    h.must(
        h.manage(
            "v2",
            acme.env,
            "shell",
            "-c",
            "from catalog.models import Category, Product;"
            " Product.objects.create(sku='2P-NEW', name='v2', price=1, category=Category.objects.order_by('id').first())",
        )
    )

    # contract while another session holds a lock on products: retried, then exit 4, nothing applied.
    with table_locked(acme.dsn, "products"):
        started = time.monotonic()
        blocked = acme.contract("--lock-timeout", "200ms", "--retries", "1", "--backoff", "100ms")
        blocked_seconds = time.monotonic() - started
    assert blocked.returncode == 4, blocked.stdout + blocked.stderr
    assert f"{CATEGORY_STRING} #2: lock not available within 200ms after 2 attempt(s)" in one_line_error(blocked)
    assert blocked_seconds < 60
    assert [d["status"] for d in load(acme.state)["deferred"]] == ["pending", "pending"]
    assert load(acme.state)["contract"]["status"] == "failed"
    assert "category" in columns(acme.dsn, "products")

    ok(acme.contract())
    products = columns(acme.dsn, "products")
    assert "category" not in products and products["category_id"] == "NO"
    state = load(acme.state)
    assert [(d["status"], d["outcome"]) for d in state["deferred"]] == [("done", "applied")] * 2
    assert state["contract"]["status"] == "done"

    # A re-run is a no-op: nothing executed, the state file untouched.
    before = acme.state.read_bytes()
    again = ok(acme.contract())
    assert "nothing to do" in again.stdout
    assert acme.state.read_bytes() == before
    status = json.loads(ok(acme.tool("status", "--state", str(acme.state))).stdout)
    assert status["pending"] == [] and [d["sql"] for d in status["done"]] == [DROP_CATEGORY, CATEGORY_NOT_NULL]

    # A statement that was applied behind the state's back (the column is gone) counts as done.
    state["deferred"][0].update(status="pending", outcome=None)
    acme.state.write_text(json.dumps(state))
    assert json.loads(ok(acme.tool("status", "--state", str(acme.state))).stdout)["pending"][0]["sql"] == DROP_CATEGORY
    ok(acme.contract())
    outcome = load(acme.state)["deferred"][0]["outcome"]
    assert outcome.startswith('already applied (SQLSTATE 42703: column "category" of relation "products" does not exist')
    print(f"\nexpand (v1 -> v2, 2MB, incl. Django start-up) {expand_seconds:.1f}s")


@pytest.mark.slow
def test_fixture_old_code_rows_without_the_new_column_are_refused_then_backfilled(acme: Acme) -> None:
    """The v1 ORM creates a product between expand and the switch: it never fills category_id."""
    ok(acme.expand())
    (category_id, name) = h.query(acme.dsn, "SELECT id, name FROM catalog_categories ORDER BY id LIMIT 1")[0]
    h.must(
        h.manage(
            "v1",
            acme.env,
            "shell",
            "-c",
            "from catalog.models import Product;"
            f" Product.objects.create(sku='2P-OLD', name='v1', price=1, category={name.lower()!r})",
        )
    )
    refused = acme.contract()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    message = one_line_error(refused)
    assert "refused, nothing changed: products.category_id has 1 row(s) with NULL" in message
    assert "filled by catalog.0003_normalize_categories #0 (RunPython)" in message
    assert "--backfill products.category_id=SQL" in message
    # Nothing ran: the DROP COLUMN comes first in the order, yet the v1 strings are still there for a backfill.
    assert columns(acme.dsn, "products")["category"] == "YES"
    assert [d["status"] for d in load(acme.state)["deferred"]] == ["pending", "pending"]

    backfill = (
        "products.category_id=UPDATE products AS p SET category_id = c.id FROM catalog_categories AS c"
        " WHERE p.category_id IS NULL AND lower(btrim(p.category)) = lower(c.name)"
    )
    ok(acme.contract("--backfill", backfill))
    assert h.query(acme.dsn, "SELECT category_id FROM products WHERE sku = '2P-OLD'") == [(category_id,)]
    assert columns(acme.dsn, "products")["category_id"] == "NO"
    (done,) = load(acme.state)["contract"]["backfills"]
    assert (done["column"], done["rows"]) == ("products.category_id", 1)


@pytest.mark.slow
def test_fixture_expand_lock_timeouts_exhausted_exit_4_then_resumes(acme: Acme) -> None:
    applied_before = set(recorded(acme.dsn))
    with table_locked(acme.dsn, "products"):
        started = time.monotonic()
        result = acme.expand("--lock-timeout", "200ms", "--retries", "2", "--backoff", "100ms")
        seconds = time.monotonic() - started
    assert result.returncode == 4, result.stdout + result.stderr
    assert seconds < 60, seconds
    assert "catalog.0002_category: lock not available within 200ms after 3 attempt(s)" in one_line_error(result)
    assert result.stdout.count("lock timeout in catalog.0002_category") == 2
    # Consistent: what ran before is recorded, the migration that timed out is not and left nothing behind.
    applied = set(recorded(acme.dsn))
    assert applied == applied_before | {"cms.0002_tag"}
    assert h.query(acme.dsn, "SELECT to_regclass('catalog_categories')") == [(None,)]
    assert "category_ref_id" not in columns(acme.dsn, "products")
    state = load(acme.state)
    assert (state["expand"]["status"], state["expand"]["exit_code"]) == ("failed", 4)
    assert [m["migration"] for m in state["migrations"]] == ["cms.0002_tag"]
    assert state["django_migrations"] == recorded(acme.dsn)
    early = acme.contract()
    assert early.returncode == 2 and "expand has not completed (status 'failed'" in one_line_error(early)

    # The lock holder is gone: the same command resumes where it stopped.
    ok(acme.expand())
    state = load(acme.state)
    assert set(recorded(acme.dsn)) == applied_before | set(acme.plan_doc["pending"])
    assert [m["migration"] for m in state["migrations"]] == acme.plan_doc["pending"]
    assert state["expand"]["runs"] == 2 and len(state["deferred"]) == 2


@pytest.mark.slow
def test_fixture_expand_retries_until_the_lock_is_released(acme: Acme) -> None:
    """The lock goes away after the first timeout: the retry applies the migration in the same run."""
    waited = threading.Event()

    def release_after_a_timeout(blocker: psycopg.Connection[Any]) -> None:
        with psycopg.connect(acme.dsn, autocommit=True) as watcher:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'ALTER TABLE%products%'"
                ).fetchone()
                if waiting and waiting[0]:
                    waited.set()
                    time.sleep(0.6)  # longer than --lock-timeout: that attempt has timed out by now
                    break
                time.sleep(0.05)
        blocker.rollback()

    with psycopg.connect(acme.dsn) as blocker:
        blocker.execute("LOCK TABLE products IN ACCESS SHARE MODE")
        releaser = threading.Thread(target=release_after_a_timeout, args=(blocker,))
        releaser.start()
        result = acme.expand("--lock-timeout", "200ms", "--retries", "5", "--backoff", "300ms")
        releaser.join()
    ok(result)
    assert waited.is_set()
    category = next(m for m in load(acme.state)["migrations"] if m["migration"] == "catalog.0002_category")
    assert category["attempts"] >= 2 and category["lock_timeouts"] == category["attempts"] - 1
    assert category["seconds_total"] > category["seconds"]
    assert set(acme.plan_doc["pending"]) <= set(recorded(acme.dsn))


@pytest.mark.slow
def test_fixture_bad_input_setup_errors_and_a_stale_plan(acme: Acme, tmp_path: Path) -> None:
    maintenance = tmp_path / "maintenance.json"
    maintenance.write_text(json.dumps({**acme.plan_doc, "verdict": "maintenance", "verdict_reasons": ["x is unknown"]}))
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({**acme.plan_doc, "pending": [p for p in acme.plan_doc["pending"] if p != "cms.0002_tag"]}))
    cases = [
        (("expand", "--plan", str(maintenance)), 2, "the plan's verdict is maintenance (x is unknown)"),
        (("expand", "--plan", str(stale)), 2, "pending but not in the plan: cms.0002_tag: the plan is stale"),
        (("expand", "--plan", str(tmp_path / "missing.json")), 2, "cannot read the plan"),
        (("contract",), 2, "no state file"),
        (("expand", "--plan", str(acme.plan), "--lock-timeout", "soon"), 2, None),
    ]
    for args, code, message in cases:
        result = acme.tool(*args, "--state", str(acme.state))
        assert result.returncode == code, (args, result.stdout, result.stderr)
        if message is not None:
            assert message in one_line_error(result), (args, result.stderr)
    assert not acme.state.exists() or load(acme.state)["migrations"] == []
    broken = {**acme.env, "DJANGO_SETTINGS_MODULE": "acme.no_such_settings"}
    result = run(
        h.venv_python("v2"),
        h.release_dir("v2"),
        broken,
        str(TOOL),
        "expand",
        "--plan",
        str(acme.plan),
        "--state",
        str(acme.state),
    )
    assert result.returncode == 3
    assert "cannot set up Django: ModuleNotFoundError" in one_line_error(result)
    assert set(acme.plan_doc["pending"]).isdisjoint(recorded(acme.dsn))

    # A plan whose deferred SQL this run does not generate: Django's own DROP runs, so the migration must
    # fail before it commits, and roll back.
    drifted = json.loads(json.dumps(acme.plan_doc))
    drop = next(d for d in drifted["deferred_statements"] if d["operation"] == 2)
    drop["deferred_sql"] = ['ALTER TABLE "products" DROP COLUMN "category";']
    acme.plan.write_text(json.dumps(drifted))
    result = acme.expand()
    assert result.returncode == 1, result.stdout + result.stderr
    message = one_line_error(result)
    assert f"{CATEGORY_STRING}: PlanMismatch: {CATEGORY_STRING} #2: the plan defers" in message and "stale" in message
    assert "catalog.0003_normalize_categories" in recorded(acme.dsn) and CATEGORY_STRING not in recorded(acme.dsn)
    assert columns(acme.dsn, "products")["category"] == "NO"  # rolled back: not even 0004's own relaxation stayed
    assert load(acme.state)["deferred"] == []


# --------------------------------------------------------------------------------------------
# A tiny generated project on Django 3.2, 4.2 and 5.2
# --------------------------------------------------------------------------------------------

SETTINGS = """\
import os

SECRET_KEY = "synthetic-test-only"
INSTALLED_APPS = ["shop"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["DATABASE_NAME"],
        "HOST": os.environ["DATABASE_HOST"],
        "PORT": os.environ["DATABASE_PORT"],
        "USER": os.environ["DATABASE_USER"],
        "PASSWORD": "",
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
"""
MANAGE = "import sys\n\nfrom django.core.management import execute_from_command_line\n\nexecute_from_command_line(sys.argv)\n"
OLD_MODELS = """\
from django.db import models


class Owner(models.Model):
    name = models.CharField(max_length=50)


class Item(models.Model):
    name = models.CharField(max_length=50)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE)
"""
NEW_MODELS = """\
from django.db import models


class Owner(models.Model):
    name = models.CharField(max_length=50)


class Item(models.Model):
    name = models.CharField(max_length=50)
    code = models.CharField(max_length=20)
    note = models.TextField(null=True)
"""
ID = '("id", models.BigAutoField(primary_key=True, serialize=False))'
MIGRATIONS = {
    "0001_initial": f"""\
        import django.db.models.deletion
        from django.db import migrations, models


        class Migration(migrations.Migration):
            initial = True
            dependencies = []
            operations = [
                migrations.CreateModel(name="Owner", fields=[{ID}, ("name", models.CharField(max_length=50))]),
                migrations.CreateModel(
                    name="Item",
                    fields=[
                        {ID},
                        ("name", models.CharField(max_length=50)),
                        ("owner", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, to="shop.owner")),
                    ],
                ),
            ]
        """,
    # The new code's release: a code column filled from the name and made NOT NULL, the owner FK dropped.
    "0002_item_code": """\
        from django.db import migrations, models
        from django.db.models.functions import Upper


        def fill_codes(apps, schema_editor):
            apps.get_model("shop", "Item").objects.filter(code__isnull=True).update(code=Upper("name"))


        class Migration(migrations.Migration):
            dependencies = [("shop", "0001_initial")]
            operations = [
                migrations.AddField("item", "code", models.CharField(max_length=20, null=True)),
                migrations.RunPython(fill_codes, migrations.RunPython.noop),
                migrations.AlterField("item", "code", models.CharField(max_length=20)),
                migrations.RemoveField("item", "owner"),
            ]
        """,
    # Needed by the new code, and it depends on 0002: 0002 cannot wait for the switch as a whole.
    "0003_item_note": """\
        from django.db import migrations, models


        class Migration(migrations.Migration):
            dependencies = [("shop", "0002_item_code")]
            operations = [migrations.AddField("item", "note", models.TextField(null=True))]
        """,
}


@pytest.fixture(scope="session")
def django5_python() -> Path:
    tree = types.SimpleNamespace(release=types.SimpleNamespace(python=">=3.12"), files={"requirements.txt": DJANGO5_REQUIREMENTS})
    return build_release.ensure_venv(tree) / "bin" / "python"  # type: ignore[arg-type]


def write_project(root: Path, models: str, migrations: list[str]) -> Path:
    (root / "shop" / "migrations").mkdir(parents=True)
    (root / "synth_settings.py").write_text(SETTINGS)
    (root / "manage.py").write_text(MANAGE)
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "migrations" / "__init__.py").write_text("")
    (root / "shop" / "models.py").write_text(models)
    for name in migrations:
        (root / "shop" / "migrations" / f"{name}.py").write_text(textwrap.dedent(MIGRATIONS[name]))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.2", "4.2", "5.2"])
def test_synthetic_old_code_null_refused_on_every_django(
    request: pytest.FixtureRequest, pg_cluster: h.Cluster, tmp_path: Path, version: str
) -> None:
    python = {"3.2": lambda: h.venv_python("v1"), "4.2": lambda: h.venv_python("v2")}.get(
        version, lambda: request.getfixturevalue("django5_python")
    )()
    old = write_project(tmp_path / "old", OLD_MODELS, ["0001_initial"])
    new = write_project(tmp_path / "new", NEW_MODELS, list(MIGRATIONS))
    dbname = f"two_phase_synthetic_{version.replace('.', '')}"
    dsn = pg_cluster.createdb(dbname)
    env = h.django_env(pg_cluster, dbname, DJANGO_SETTINGS_MODULE="synth_settings")
    state = tmp_path / "state.json"

    def tool(*args: str) -> subprocess.CompletedProcess[str]:
        return run(python, new, env, str(TOOL), *args)

    def shell(root: Path, code: str) -> None:
        ok(run(python, root, env, "manage.py", "shell", "-c", code))

    ok(run(python, old, env, "manage.py", "migrate", "--noinput", "-v0"))
    h.query(dsn, "INSERT INTO shop_owner (name) VALUES ('ann')")
    h.query(dsn, "INSERT INTO shop_item (name, owner_id) SELECT 'item ' || g, 1 FROM generate_series(1, 5) g")
    plan = tmp_path / "plan.json"
    plan.write_text(ok(run(python, new, env, str(PLANNER), "--json")).stdout)
    doc = load(plan)
    assert doc["django_version"].startswith(version + ".")
    assert (doc["verdict"], doc["strategy"]) == ("two_phase", "deferred_statements")

    ok(tool("expand", "--plan", str(plan), "--state", str(state)))
    assert {"shop.0002_item_code", "shop.0003_item_note"} <= set(recorded(dsn))
    item = columns(dsn, "shop_item")
    assert item["owner_id"] == "YES" and item["code"] == "YES" and item["note"] == "YES"
    assert h.query(dsn, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'shop_item'::regclass AND contype = 'f'") == [(0,)]
    recorded_state = load(state)
    by_operation = {d["operation"]: d for d in recorded_state["deferred"]}
    assert set(by_operation) == {2, 3}
    assert by_operation[2]["sql"] == 'ALTER TABLE "shop_item" ALTER COLUMN "code" SET NOT NULL;'
    assert by_operation[2]["filled_by"] == ["shop.0002_item_code #1 (RunPython)"]
    assert by_operation[3]["sql"] == 'ALTER TABLE "shop_item" DROP COLUMN "owner_id" CASCADE;'
    interim = [i["sql"] for i in recorded_state["interim"]]
    assert (
        any("DROP CONSTRAINT" in s for s in interim)
        and 'ALTER TABLE "shop_item" ALTER COLUMN "owner_id" DROP NOT NULL;' in interim
    )
    assert len(interim) == len(set(interim))

    # Between expand and the switch both codes write: the old ORM fills owner but not code, the new one the reverse.
    shell(old, "from shop.models import Item, Owner; Item.objects.create(name='old code', owner=Owner.objects.get())")
    shell(new, "from shop.models import Item; Item.objects.create(name='new code', code='NEW')")

    refused = tool("contract", "--state", str(state))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    message = one_line_error(refused)
    assert "shop_item.code has 1 row(s) with NULL" in message and "shop.0002_item_code #1 (RunPython)" in message
    assert "owner_id" in columns(dsn, "shop_item") and columns(dsn, "shop_item")["code"] == "YES"
    assert all(d["status"] == "pending" for d in load(state)["deferred"])

    ok(
        tool(
            "contract",
            "--state",
            str(state),
            "--backfill",
            "shop_item.code=UPDATE shop_item SET code = upper(name) WHERE code IS NULL",
        )
    )
    item = columns(dsn, "shop_item")
    assert "owner_id" not in item and item["code"] == "NO"
    assert h.query(dsn, "SELECT code FROM shop_item WHERE name = 'old code'") == [("OLD CODE",)]
    assert all(d["outcome"] == "applied" for d in load(state)["deferred"])


# A data migration PostgreSQL picks as a deadlock's victim on its first attempt (a sequence counts the
# attempts: nextval() is not rolled back with the transaction), as the fixture's catalog.0003 can be
# when live checkouts hold rows of the table it locks.
FLAKY = """\
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]
    operations = [
        migrations.RunSQL(
            "UPDATE shop_item SET name = upper(name);"
            " DO $$ BEGIN IF nextval('shop_flaky_attempts') <= %d THEN"
            " RAISE EXCEPTION 'deadlock detected (simulated)'"
            " USING ERRCODE = 'deadlock_detected'; END IF; END $$;",
            migrations.RunSQL.noop,
        ),
    ]
"""


@pytest.mark.slow
def test_synthetic_deadlock_victim_is_retried_then_exit_4_when_it_keeps_losing(pg_cluster: h.Cluster, tmp_path: Path) -> None:
    python = h.venv_python("v1")
    for victims, retries in ((1, 2), (3, 2)):
        project = write_project(tmp_path / f"p{victims}", OLD_MODELS, ["0001_initial"])
        (project / "shop" / "migrations" / "0002_flaky.py").write_text(FLAKY % victims)
        dsn = pg_cluster.createdb(f"two_phase_deadlock_{victims}")
        env = h.django_env(pg_cluster, f"two_phase_deadlock_{victims}", DJANGO_SETTINGS_MODULE="synth_settings")
        ok(run(python, project, env, "manage.py", "migrate", "shop", "0001", "--noinput", "-v0"))
        h.query(dsn, "CREATE SEQUENCE shop_flaky_attempts")
        h.query(dsn, "INSERT INTO shop_owner (name) VALUES ('ann')")
        h.query(dsn, "INSERT INTO shop_item (name, owner_id) VALUES ('one', 1)")
        plan, state = tmp_path / f"plan{victims}.json", tmp_path / f"state{victims}.json"
        plan.write_text(ok(run(python, project, env, str(PLANNER), "--json")).stdout)
        result = run(python, project, env, str(TOOL), "expand", "--plan", str(plan), "--state", str(state),
                     "--retries", str(retries), "--backoff", "100ms")  # fmt: skip
        assert result.stdout.count("deadlock in shop.0002_flaky (attempt ") == min(victims, retries)
        if victims <= retries:
            ok(result)
            migration = load(state)["migrations"][-1]
            assert (migration["attempts"], migration["deadlocks"], migration["lock_timeouts"]) == (2, 1, 0)
            assert "shop.0002_flaky" in recorded(dsn)
            assert h.query(dsn, "SELECT name FROM shop_item") == [("ONE",)]  # applied once, by the attempt that won
        else:
            assert result.returncode == 4, result.stdout + result.stderr
            assert "shop.0002_flaky: chosen as a deadlock's victim after 3 attempt(s)" in one_line_error(result)
            assert "shop.0002_flaky" not in recorded(dsn)
            assert h.query(dsn, "SELECT name FROM shop_item") == [("one",)]


# --------------------------------------------------------------------------------------------
# Helpers on their own
# --------------------------------------------------------------------------------------------


def test_normalize_and_not_null_targets() -> None:
    assert tp.normalize('ALTER TABLE "t"\n   DROP COLUMN "c" CASCADE ;;') == 'ALTER TABLE "t" DROP COLUMN "c" CASCADE'
    assert tp.not_null_targets('ALTER TABLE "t" ALTER COLUMN "A b" TYPE int, ALTER COLUMN "A b" SET NOT NULL;') == [
        {"table": "t", "column": "A b", "table_sql": '"t"', "column_sql": '"A b"'}
    ]
    assert tp.not_null_targets("alter table only public.T alter c set not null")[0]["table"] == "public.t"
    assert tp.not_null_targets('ALTER TABLE "t" ALTER COLUMN "c" DROP NOT NULL') == []
    assert tp.not_null_targets('ALTER TABLE "t" DROP COLUMN "c"') == []


class FakeError(Exception):
    def __init__(self, message: str, pgcode: str) -> None:
        super().__init__(message)
        self.pgcode = pgcode


def test_already_applied_only_for_the_matching_kind_of_statement() -> None:
    gone = FakeError('column "c" does not exist', "42703")
    assert tp.already_applied('ALTER TABLE "t" DROP COLUMN "c" CASCADE;', gone).startswith("already applied (SQLSTATE 42703")
    assert tp.already_applied('ALTER TABLE "t" ALTER COLUMN "c" SET NOT NULL;', gone) is None
    assert tp.already_applied('DROP TABLE "t" CASCADE;', FakeError("no table", "42P01")) is not None
    assert tp.already_applied('CREATE INDEX "i" ON "t" ("c");', FakeError("exists", "42P07")) is not None
    assert tp.already_applied('ALTER TABLE "t" ADD CONSTRAINT "u" UNIQUE ("c");', FakeError("exists", "42710")) is not None
    assert tp.already_applied('CREATE INDEX "i" ON "t" ("c");', gone) is None


def test_lock_timeout_is_found_through_django_wrapping() -> None:
    driver = FakeError("canceling statement due to lock timeout", "55P03")
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = driver
    assert tp.is_lock_timeout(wrapped) and tp.sqlstate(wrapped) == "55P03"
    assert not tp.is_lock_timeout(FakeError("deadlock detected", "40P01"))
    assert tp.is_deadlock(FakeError("deadlock detected", "40P01")) and not tp.is_deadlock(driver)


def test_durations_and_backoff() -> None:
    assert [tp.duration_ms(t) for t in ("200ms", "5s", "0", "1.5s", "2min", "1h", "250")] == [
        200, 5000, 0, 1500, 120_000, 3_600_000, 250,
    ]  # fmt: skip
    with pytest.raises(Exception, match="not a duration"):
        tp.duration_ms("soon")
    assert [tp.backoff_delay(1.0, n) for n in (1, 2, 3, 6, 10)] == [1.0, 2.0, 4.0, 30.0, 30.0]


def test_state_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = tp.new_state()
    tp.write_state(str(path), state)
    assert load(path)["format"] == 1 and load(path)["updated_at"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left
    path.write_text("{")
    with pytest.raises(tp.BadInput, match="is not JSON"):
        tp.load_state(str(path), must_exist=True)
