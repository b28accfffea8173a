"""roles/django_release/files/migration_plan.py on real Django migrations and the throwaway PostgreSQL.

* the fixture's v1 -> v2 plan, run like on a host: v2's virtualenv, from v2's release directory, on a v1
  database with generated data (and v1 from an empty database on Django 3.2 / the oldest Python);
* small Django projects generated into tmp_path, one app per case, on Django 3.2, 4.2 and 5.2: expand,
  deferrable contract, contract that cannot be deferred, locking risks, unknown operation classes,
  irreversible data migrations, a contract migration that blocks later ones;
* the SQL recognisers on their own (no database).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "roles" / "django_release" / "files" / "migration_plan.py"
sys.path.insert(0, str(REPO / "examples" / "acme"))

import build_release  # noqa: E402 - scripts/ is on sys.path (tests/conftest.py)
import harness as h  # noqa: E402

_spec = importlib.util.spec_from_file_location("migration_plan", MODULE)
assert _spec is not None and _spec.loader is not None
mp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mp)

V2_PENDING = {
    "catalog.0002_category",
    "catalog.0003_normalize_categories",
    "catalog.0004_remove_product_category_string",
    "catalog.0005_product_tags",
    "cms.0002_tag",
    "orders.0002_order_customer_created_idx",
    "profiles.0002_profile_display_name_locale_last_login",
    "profiles.0003_backfill_profiles",
}
CATEGORY_STRING = "catalog.0004_remove_product_category_string"
# Test-only: a Django 5.x virtualenv beside the fixture's 3.2 (v1) and 4.2 (v2) ones, built once like theirs.
DJANGO5_REQUIREMENTS = b"Django==5.2.19\nasgiref==3.13.0\nsqlparse==0.6.1\npsycopg2-binary==2.9.13\n"


def run_plan(python: Path, cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), str(MODULE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def parse(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def migration(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in doc["migrations"] if m["migration"] == name)


def classes(doc: dict[str, Any], name: str) -> list[tuple[str, str]]:
    return [(o["operation"], o["class"]) for o in migration(doc, name)["operations"]]


def schema(dsn: str) -> list[tuple[Any, ...]]:
    """Columns, indexes, constraints and recorded migrations: what the analysis must never change."""
    return (
        h.query(
            dsn,
            "SELECT table_name, column_name, is_nullable, data_type, character_maximum_length"
            " FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
        )
        + h.query(dsn, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1")
        + h.query(dsn, "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint ORDER BY 1, 2")
        + h.query(dsn, "SELECT app, name FROM django_migrations ORDER BY 1, 2")
    )


# --------------------------------------------------------------------------------------------
# The fixture: v1 -> v2
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acme(pg_cluster: h.Cluster) -> Iterator[dict[str, Any]]:
    """A v1 database with generated data; the analysis run as on a host, with v2's interpreter and tree."""
    dsn = h.v1_database(pg_cluster, "acme_plan_v1")
    generated = h.run_gen_data(dsn, "1MB", seed=5)
    assert generated.returncode == 0, generated.stderr
    env = h.django_env(pg_cluster, "acme_plan_v1", DJANGO_SETTINGS_MODULE="acme.settings")
    before = (schema(dsn), h.fingerprint(dsn))

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return run_plan(h.venv_python("v2"), h.release_dir("v2"), {**env, **extra_env}, *args)

    yield {"dsn": dsn, "run": run, "doc": parse(run("--json"))}
    assert (schema(dsn), h.fingerprint(dsn)) == before, "the analysis changed the database"


@pytest.mark.slow
def test_fixture_v2_plan_splits_expand_and_contract(acme: dict[str, Any]) -> None:
    doc = acme["doc"]
    assert doc["django_version"].startswith("4.2.")
    assert set(doc["pending"]) == V2_PENDING and len(doc["pending"]) == len(V2_PENDING)
    for app in ("catalog", "cms", "customers", "orders", "payments", "profiles"):
        assert doc["leaf_nodes_before"][app] == "0001_initial"
    assert doc["leaf_nodes_before"]["auth"] != "zero"

    assert classes(doc, "profiles.0002_profile_display_name_locale_last_login") == [("AddField", "expand")] * 3
    assert classes(doc, "profiles.0003_backfill_profiles") == [("RunPython", "expand")]
    assert classes(doc, "catalog.0002_category") == [("CreateModel", "expand"), ("CreateModel", "expand"), ("AddField", "expand")]
    assert classes(doc, "catalog.0003_normalize_categories") == [("RunPython", "expand")]
    assert classes(doc, CATEGORY_STRING) == [
        ("AlterField", "expand"),  # NOT NULL -> NULL on the v1 string
        ("RunPython", "expand"),  # no-op forward, with a reverse
        ("RemoveField", "contract"),  # the v1 code selects products.category
        ("RenameField", "expand"),  # category_ref_id was created by this plan: the v1 code never saw it
        ("AlterField", "contract"),  # category_id NOT NULL: v1 INSERTs omit it
    ]
    assert classes(doc, "cms.0002_tag") == [("CreateModel", "expand"), ("AddField", "expand")]
    assert classes(doc, "orders.0002_order_customer_created_idx") == [("AddIndexConcurrently", "expand")]
    assert migration(doc, "orders.0002_order_customer_created_idx")["atomic"] is False

    # The dependency rule: catalog.0005 is expand by itself but waits for catalog.0004.
    tags = migration(doc, "catalog.0005_product_tags")
    assert (tags["class"], tags["phase"], tags["blocked_by"]) == ("expand", "contract", [CATEGORY_STRING])
    in_order = list(doc["pending"])
    assert doc["contract"] == [CATEGORY_STRING, "catalog.0005_product_tags"]
    assert doc["expand"] == [p for p in in_order if p not in doc["contract"]]
    assert doc["blocking"] == [{"migration": CATEGORY_STRING, "blocks": ["catalog.0005_product_tags"], "operations": [2, 4]}]
    strings = migration(doc, CATEGORY_STRING)
    assert strings["deferrable"] is False and "catalog.0005_product_tags" in strings["deferrable_reason"]
    assert [o["deferrable"] for o in strings["operations"]] == [None, None, True, None, True]

    assert (doc["verdict"], doc["strategy"]) == ("two_phase", "deferred_statements")
    assert doc["reversible"] is True and doc["irreversible"] == []
    assert doc["problems"] == []


@pytest.mark.slow
def test_fixture_v2_deferred_statements_keep_both_codes_working(acme: dict[str, Any]) -> None:
    doc = acme["doc"]
    deferred = {(d["migration"], d["operation"]): d for d in doc["deferred_statements"]}
    assert set(deferred) == {(CATEGORY_STRING, 2), (CATEGORY_STRING, 4)}
    drop = deferred[(CATEGORY_STRING, 2)]
    assert (drop["kind"], drop["table"], drop["column"]) == ("RemoveField", "products", "category")
    assert drop["not_null_now"] is True and drop["not_null_at_removal"] is False  # 0004 relaxes it first
    assert drop["interim_sql"] == ['ALTER TABLE "products" ALTER COLUMN "category" DROP NOT NULL;']
    assert drop["deferred_sql"] == ['ALTER TABLE "products" DROP COLUMN "category" CASCADE;']
    tighten = deferred[(CATEGORY_STRING, 4)]
    assert tighten["interim_sql"] == []
    assert tighten["deferred_sql"] == ['ALTER TABLE "products" ALTER COLUMN "category_id" SET NOT NULL;']


@pytest.mark.slow
def test_fixture_v2_sizes_and_locking_risks(acme: dict[str, Any]) -> None:
    doc, dsn = acme["doc"], acme["dsn"]
    (products,) = h.query(dsn, "SELECT count(*) FROM products")[0]
    (products_bytes,) = h.query(dsn, "SELECT pg_total_relation_size('products')")[0]
    add_fk = migration(doc, "catalog.0002_category")["operations"][2]
    assert (add_fk["table"], add_fk["rows"], add_fk["size_bytes"]) == ("products", products, products_bytes)
    assert migration(doc, "catalog.0002_category")["operations"][0]["new_table"] is True
    risks = {(r["migration"], r["operation"], r["kind"]) for r in doc["locking_risks"]}
    # The FK column's index is built without CONCURRENTLY on a table with rows; SET NOT NULL scans it.
    assert risks == {("catalog.0002_category", 2, "index_build"), (CATEGORY_STRING, 4, "set_not_null")}
    assert not any(r["large"] for r in doc["locking_risks"])
    assert doc["tables"]["products"] == {"rows": products, "size_bytes": products_bytes, "rows_source": "reltuples"}

    large = parse(acme["run"]("--json", "--large-table-rows", str(products)))
    assert large["verdict"] == "maintenance"
    assert all(r["escalates"] for r in large["locking_risks"] if r["holds"] in ("rewrite", "scan"))
    assert any("index_build on products" in r and "the table is large" in r for r in large["verdict_reasons"])
    assert any("set_not_null on products" in r for r in large["verdict_reasons"])
    # One row more than the table has: not large, the verdict is the default one.
    assert parse(acme["run"]("--json", "--large-table-rows", str(products + 1)))["verdict"] == "two_phase"


@pytest.mark.slow
def test_fixture_v2_table_output(acme: dict[str, Any]) -> None:
    result = acme["run"]("--table")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    print("\n" + text)
    header = text.splitlines()[0].split()
    assert header == ["APP", "MIGRATION", "#", "OPERATION", "CLASS", "TABLE", "ROWS", "SIZE", "FLAGS", "REASON"]
    for name in V2_PENDING:
        assert name.split(".", 1)[1] in text
    assert "verdict: two_phase (deferred_statements)" in text
    assert f"blocking: {CATEGORY_STRING} (contract, operations [2, 4]) blocks catalog.0005_product_tags" in text
    assert 'interim:  ALTER TABLE "products" ALTER COLUMN "category" DROP NOT NULL;' in text
    assert "leaf nodes before: " in text and "catalog:0001_initial" in text


@pytest.mark.slow
def test_fixture_targets_and_bad_input(acme: dict[str, Any]) -> None:
    only = parse(acme["run"]("--json", "--targets", "catalog:0005"))
    assert only["targets"] == ["catalog.0005_product_tags"]
    assert only["pending"] == [
        "cms.0002_tag",  # a dependency of catalog.0005
        "catalog.0002_category",
        "catalog.0003_normalize_categories",
        CATEGORY_STRING,
        "catalog.0005_product_tags",
    ]
    assert parse(acme["run"]("--json", "--targets", "profiles"))["verdict"] == "rolling"
    for args, message in [
        (("--targets", "nosuchapp:0001"), "has no migrations"),
        (("--targets", "catalog:9999"), "has no migration"),
        (("--targets", "catalog:000"), "more than one migration"),
        (("--targets", "catalog:zero"), "catalog.0001_initial: this analyses forward plans only"),
        (("--large-table-rows", "-1"), "must be >= 0"),
        (("--json", "--table"), "not allowed with"),
    ]:
        result = acme["run"](*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stdout == ""


@pytest.mark.slow
def test_fixture_setup_errors_exit_3(acme: dict[str, Any]) -> None:
    for extra, message in [
        ({"DJANGO_SETTINGS_MODULE": "acme.no_such_settings"}, "No module named 'acme.no_such_settings'"),
        ({"DATABASE_PORT": str(h.free_port())}, "OperationalError"),
    ]:
        result = acme["run"]("--json", **extra)
        assert result.returncode == 3, (extra, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("migration_plan: error: cannot set up Django")
        assert message in result.stderr


@pytest.mark.slow
def test_fixture_v1_from_an_empty_database_on_django_32(pg_cluster: h.Cluster) -> None:
    """The oldest supported pair (Django 3.2, the oldest Python the fixture finds): a first deploy is rolling."""
    pg_cluster.createdb("acme_plan_empty")
    env = h.django_env(pg_cluster, "acme_plan_empty", DJANGO_SETTINGS_MODULE="acme.settings")
    doc = parse(run_plan(h.venv_python("v1"), h.release_dir("v1"), env, "--json"))
    assert doc["django_version"].startswith("3.2.")
    assert set(doc["leaf_nodes_before"].values()) == {"zero"}
    assert "catalog.0001_initial" in doc["pending"] and doc["contract"] == []
    assert doc["expand"] == doc["pending"]
    assert {o["class"] for m in doc["migrations"] for o in m["operations"]} == {"expand"}
    assert doc["verdict"] == "rolling" and doc["locking_risks"] == []


# --------------------------------------------------------------------------------------------
# Generated projects: one app per case, on Django 3.2, 4.2 and 5.2
# --------------------------------------------------------------------------------------------

APPS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo")
SETTINGS = """\
import os

SECRET_KEY = "synthetic-test-only"
INSTALLED_APPS = {apps!r}
DATABASES = {{
    "default": {{
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["DATABASE_NAME"],
        "HOST": os.environ["DATABASE_HOST"],
        "PORT": os.environ["DATABASE_PORT"],
        "USER": os.environ["DATABASE_USER"],
        "PASSWORD": "",
    }}
}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
"""
MANAGE = """\
import sys

from django.core.management import execute_from_command_line

execute_from_command_line(sys.argv)
"""
ID = '("id", models.BigAutoField(primary_key=True, serialize=False))'
ROWS = {
    "alpha_item": "INSERT INTO alpha_item (name, qty) SELECT 'item ' || g, g FROM generate_series(1, 20) g",
    "bravo_account": "INSERT INTO bravo_account (email, nickname, score) SELECT 'a' || g || '@x.test', 'n' || g, g"
    " FROM generate_series(1, 20) g",
    "bravo_archive": "INSERT INTO bravo_archive (body) VALUES ('old')",
    "charlie_customer": "INSERT INTO charlie_customer (name, age) VALUES ('Ann', 40), ('Bob', NULL)",
    "delta_event": "INSERT INTO delta_event (kind, amount) SELECT 'kind' || (g % 7), g FROM generate_series(1, 500) g",
    "echo_thing": "INSERT INTO echo_thing DEFAULT VALUES",
    "foxtrot_note": "INSERT INTO foxtrot_note (body, draft) VALUES ('hello', false)",
    "golf_ticket": "INSERT INTO golf_ticket (title, old_flag) VALUES ('t1', true), ('t2', false)",
    "hotel_seat": "INSERT INTO hotel_seat (id) SELECT g FROM generate_series(1, 3) g",
}


def migration_source(dependencies: list[tuple[str, str]], operations: list[str], prelude: str = "", atomic: bool = True) -> str:
    ops = textwrap.indent(",\n".join(textwrap.dedent(o).strip() for o in operations) + ",", " " * 8)
    return (
        "import os\n\nimport django.db.models.deletion\nimport django.db.models.functions\nimport django.db.models.manager\n"
        "from django.db import migrations, models\nfrom django.db.migrations.operations.base import Operation\n\n"
        + textwrap.dedent(prelude)
        + "\n\nclass Migration(migrations.Migration):\n"
        + ("" if atomic else "    atomic = False\n")
        + f"    dependencies = {dependencies!r}\n\n    operations = [\n{ops}\n    ]\n"
    )


def initial(*models_: str) -> str:
    return migration_source([], [f"migrations.CreateModel({m})" for m in models_])


def applied_migrations() -> dict[str, str]:
    return {
        "alpha/0001_initial": initial(
            f'name="Item", fields=[{ID}, ("name", models.CharField(max_length=50)), ("qty", models.IntegerField())],'
            ' options={"indexes": [models.Index(fields=["qty"], name="alpha_qty_idx")]}',
        ),
        "bravo/0001_initial": initial(
            f'name="Account", fields=[{ID}, ("email", models.CharField(max_length=100)),'
            ' ("nickname", models.CharField(max_length=50)), ("legacy_code", models.CharField(max_length=30, null=True)),'
            ' ("score", models.IntegerField(null=True))]',
            f'name="Archive", fields=[{ID}, ("body", models.TextField())]',
        ),
        "charlie/0001_initial": initial(
            f'name="Customer", fields=[{ID}, ("name", models.CharField(max_length=100)),'
            ' ("age", models.IntegerField(null=True))]',
        ),
        "delta/0001_initial": initial(
            f'name="Event", fields=[{ID}, ("kind", models.CharField(max_length=20)), ("amount", models.IntegerField(null=True))]',
        ),
        "echo/0001_initial": initial(f'name="Thing", fields=[{ID}]'),
        "foxtrot/0001_initial": initial(
            f'name="Note", fields=[{ID}, ("body", models.TextField()), ("draft", models.BooleanField(default=False))]'
        ),
        "golf/0001_initial": initial(
            f'name="Ticket", fields=[{ID}, ("title", models.CharField(max_length=50)), ("old_flag", models.BooleanField())]',
        ),
        "hotel/0001_initial": initial(f'name="Seat", fields=[{ID}]'),
        "india/0001_initial": initial(f'name="Row", fields=[{ID}, ("body", models.TextField())]'),
        "juliet/0001_initial": initial(f'name="Log", fields=[{ID}, ("at", models.IntegerField())]'),
        "kilo/0001_initial": initial(f'name="Stock", fields=[{ID}, ("qty", models.IntegerField())]'),
    }


def pending_migrations(version: tuple[int, int]) -> dict[str, str]:
    check = "condition" if version >= (5, 1) else "check"
    alpha = [
        f"""migrations.CreateModel(name="Tag", fields=[{ID}, ("label", models.CharField(max_length=20)),
            ("item", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, to="alpha.item"))])""",
        'migrations.AddField("item", "note", models.TextField(null=True))',
        'migrations.AlterField("item", "name", models.CharField(max_length=100))',
        'migrations.AlterField("item", "qty", models.IntegerField(null=True))',
        'migrations.AddIndex("item", models.Index(fields=["name"], name="alpha_name_idx"))',
        'migrations.RemoveIndex("item", "alpha_qty_idx")',
        f'migrations.AddConstraint("item", models.CheckConstraint({check}=models.Q(qty__gte=0), name="alpha_qty_gte_0"))',
        'migrations.AlterModelOptions("item", {"ordering": ["name"]})',
        'migrations.AlterModelManagers("item", [("objects", django.db.models.manager.Manager())])',
        "migrations.RunPython(noop, noop)",
        """migrations.RunSQL("COMMENT ON TABLE alpha_item IS 'items; with a semicolon'",
            reverse_sql="COMMENT ON TABLE alpha_item IS NULL")""",
        """migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddField("item", "legacy_ref", models.IntegerField(null=True))],
            database_operations=[migrations.RunSQL("ALTER TABLE alpha_item ADD COLUMN legacy_ref integer NULL",
                reverse_sql="ALTER TABLE alpha_item DROP COLUMN legacy_ref")])""",
    ]
    if version >= (4, 1):
        alpha.append('migrations.RenameIndex("item", new_name="alpha_item_name_idx", old_name="alpha_name_idx")')
    if version >= (5, 0):
        alpha.append('migrations.AddField("item", "flag", models.BooleanField(db_default=False))')
    delta = [
        'migrations.AddIndex("event", models.Index(fields=["kind"], name="delta_kind_idx"))',
        'migrations.AlterField("event", "amount", models.BigIntegerField(null=True))',
    ]
    if version >= (5, 0):
        delta.append('migrations.AddField("event", "noise", models.FloatField(db_default=django.db.models.functions.Random()))')
    return {
        "alpha/0002_expand": migration_source([("alpha", "0001_initial")], alpha, "def noop(apps, schema_editor):\n    pass\n"),
        "bravo/0002_contract": migration_source(
            [("bravo", "0001_initial")],
            [
                'migrations.RemoveField("account", "nickname")',
                'migrations.DeleteModel("Archive")',
                'migrations.AlterField("account", "score", models.IntegerField())',
                'migrations.AlterField("account", "legacy_code", models.CharField(max_length=10, null=True))',
                'migrations.AlterUniqueTogether("account", {("email",)})',
            ],
        ),
        "charlie/0002_breaking": migration_source(
            [("charlie", "0001_initial")],
            [
                'migrations.RenameField("customer", "name", "full_name")',
                'migrations.AddField("customer", "tier", models.CharField(max_length=10, default="basic"))',
                'migrations.AlterField("customer", "age", models.CharField(max_length=3, null=True))',
            ],
        ),
        "delta/0002_risky": migration_source([("delta", "0001_initial")], delta),
        "echo/0002_custom": migration_source(
            [("echo", "0001_initial")],
            ["Backfill()", 'TrackedAddField("thing", "label", models.CharField(max_length=10, null=True))'],
            '''
            class Backfill(Operation):
                """A project's own operation: the analysis must neither run nor trust it."""

                reversible = True

                def state_forwards(self, app_label, state):
                    pass

                def database_forwards(self, app_label, schema_editor, from_state, to_state):
                    open(os.environ["MIGRATION_PLAN_TEST_MARKER"], "w").close()
                    raise RuntimeError("database_forwards ran during the analysis")

                def database_backwards(self, app_label, schema_editor, from_state, to_state):
                    pass

                def describe(self):
                    return "Backfill things"


            class TrackedAddField(migrations.AddField):
                """A subclass of a known operation may do anything in database_forwards: unknown too."""
            ''',
        ),
        "foxtrot/0002_irreversible": migration_source(
            [("foxtrot", "0001_initial")],
            ["migrations.RunPython(shout)", 'migrations.RunSQL("UPDATE foxtrot_note SET body = upper(body)")'],
            "def shout(apps, schema_editor):\n    pass\n",
        ),
        "foxtrot/0003_remove_draft": migration_source(
            [("foxtrot", "0002_irreversible")], ['migrations.RemoveField("note", "draft")']
        ),
        "golf/0002_remove_old_flag": migration_source(
            [("golf", "0001_initial")], ['migrations.RemoveField("ticket", "old_flag")']
        ),
        "golf/0003_ticket_note": migration_source(
            [("golf", "0002_remove_old_flag")], ['migrations.AddField("ticket", "note", models.TextField(null=True))']
        ),
        "hotel/0002_seat_label": migration_source(
            [("hotel", "0001_initial")], ['migrations.AddField("seat", "label", models.CharField(max_length=10, null=True))']
        ),
        "india/0002_nonatomic_backfill": migration_source(
            [("india", "0001_initial")],
            ["migrations.RunPython(backfill, migrations.RunPython.noop)"],
            "def backfill(apps, schema_editor):\n    pass\n",
            atomic=False,
        ),
        "juliet/0002_concurrent_index": migration_source(
            [("juliet", "0001_initial")],
            [
                'migrations.RunSQL("CREATE INDEX CONCURRENTLY juliet_log_at_idx ON juliet_log (at)",'
                ' reverse_sql="DROP INDEX CONCURRENTLY juliet_log_at_idx")'
            ],
            atomic=False,
        ),
        "kilo/0002_locked_backfills": migration_source(
            [("kilo", "0001_initial")],
            [
                "migrations.RunPython(weak, migrations.RunPython.noop)",
                "migrations.RunPython(strong, migrations.RunPython.noop)",
                'migrations.RunSQL("LOCK TABLE kilo_stock IN SHARE MODE; UPDATE kilo_stock SET qty = qty",'
                " reverse_sql=migrations.RunSQL.noop)",
            ],
            """
            def weak(apps, schema_editor):
                with schema_editor.connection.cursor() as cursor:
                    cursor.execute("LOCK TABLE kilo_stock IN SHARE ROW EXCLUSIVE MODE")
                    cursor.execute("UPDATE kilo_stock SET qty = qty + 1")


            def strong(apps, schema_editor):
                with schema_editor.connection.cursor() as cursor:
                    cursor.execute("LOCK TABLE kilo_stock IN EXCLUSIVE MODE")
                    cursor.execute("UPDATE kilo_stock SET qty = qty + 1")
            """,
        ),
        "hotel/0003_seat_ticket": migration_source(
            [("hotel", "0002_seat_label"), ("golf", "0003_ticket_note")],
            [
                'migrations.AddField("seat", "ticket", models.ForeignKey(null=True,'
                ' on_delete=django.db.models.deletion.SET_NULL, to="golf.ticket"))'
            ],
        ),
    }


@pytest.fixture(scope="session")
def django5_python() -> Path:
    tree = types.SimpleNamespace(release=types.SimpleNamespace(python=">=3.12"), files={"requirements.txt": DJANGO5_REQUIREMENTS})
    return build_release.ensure_venv(tree) / "bin" / "python"  # type: ignore[arg-type]


class Synthetic:
    """A generated project migrated to its 0001s, with rows, then given its pending migrations."""

    def __init__(
        self, python: Path, root: Path, env: dict[str, str], cluster: h.Cluster, dbname: str, version: tuple[int, int]
    ) -> None:
        self.python, self.root, self.env, self.version = python, root, env, version
        self.cluster, self.dbname, self.dsn = cluster, dbname, cluster.dsn(dbname)
        self._docs: dict[tuple[str, ...], dict[str, Any]] = {}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_plan(self.python, self.root, self.env, *args)

    def doc(self, *args: str) -> dict[str, Any]:
        if args not in self._docs:
            self._docs[args] = parse(self.run("--json", *args))
        return self._docs[args]


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, source in files.items():
        path = root / f"{name.split('/')[0]}/migrations/{name.split('/')[1]}.py"
        path.write_text(source)


@pytest.fixture(scope="module", params=["3.2", "4.2", "5.2"])
def synthetic(
    request: pytest.FixtureRequest, pg_cluster: h.Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Synthetic]:
    python = {"3.2": lambda: h.venv_python("v1"), "4.2": lambda: h.venv_python("v2")}.get(
        request.param, lambda: request.getfixturevalue("django5_python")
    )()
    version = tuple(int(x) for x in request.param.split("."))
    root = tmp_path_factory.mktemp(f"synthetic-django{request.param}")
    (root / "synth_settings.py").write_text(SETTINGS.format(apps=list(APPS)))
    (root / "manage.py").write_text(MANAGE)
    for app in APPS:
        (root / app / "migrations").mkdir(parents=True)
        for name in ("__init__.py", "models.py", "migrations/__init__.py"):
            (root / app / name).write_text("")
    write_files(root, applied_migrations())
    dbname = f"plan_synthetic_{request.param.replace('.', '')}"
    dsn = pg_cluster.createdb(dbname)
    marker = root / "database_forwards-ran"
    env = h.django_env(pg_cluster, dbname, DJANGO_SETTINGS_MODULE="synth_settings", MIGRATION_PLAN_TEST_MARKER=str(marker))
    migrate = subprocess.run(
        [str(python), "manage.py", "migrate", "--noinput", "-v0"], cwd=root, env=env, capture_output=True, text=True, check=False
    )
    assert migrate.returncode == 0, migrate.stderr
    # hotel_seat is never analysed (autovacuum off): its row estimate must come from a bounded count.
    h.query(dsn, "ALTER TABLE hotel_seat SET (autovacuum_enabled = false)")
    for statement in ROWS.values():
        h.query(dsn, statement)
    h.query(dsn, "ANALYZE " + ", ".join(t for t in ROWS if t != "hotel_seat"))
    write_files(root, pending_migrations(version))  # type: ignore[arg-type]
    before = schema(dsn)
    project = Synthetic(python, root, env, pg_cluster, dbname, version)  # type: ignore[arg-type]
    assert project.doc()["django_version"].startswith(request.param + ".")
    yield project
    assert schema(dsn) == before, "the analysis changed the database"
    assert not marker.exists(), "the analysis ran an unknown operation's database_forwards"


@pytest.mark.slow
def test_synthetic_expand_operations_are_rolling(synthetic: Synthetic) -> None:
    doc = synthetic.doc("--targets", "alpha")
    ops = migration(doc, "alpha.0002_expand")["operations"]
    names = [o["operation"] for o in ops]
    expected = [
        "CreateModel", "AddField", "AlterField", "AlterField", "AddIndex", "RemoveIndex", "AddConstraint",
        "AlterModelOptions", "AlterModelManagers", "RunPython", "RunSQL", "SeparateDatabaseAndState",
    ]  # fmt: skip
    expected += ["RenameIndex"] if synthetic.version >= (4, 1) else []
    expected += ["AddField"] if synthetic.version >= (5, 0) else []
    assert names == expected
    assert {o["class"] for o in ops} == {"expand"}, [(o["operation"], o["class"], o["reason"]) for o in ops]
    by_index = {o["index"]: o for o in ops}
    assert "NOT NULL -> NULL" in by_index[3]["reason"] and "widens varchar(50) -> varchar(100)" in by_index[2]["reason"]
    assert by_index[7]["sql"] == [] and by_index[8]["sql"] == []  # state only
    assert by_index[11]["database_operations"][0]["operation"] == "RunSQL"
    assert by_index[11]["sql"] == ["ALTER TABLE alpha_item ADD COLUMN legacy_ref integer NULL;"]
    if synthetic.version >= (5, 0):
        assert "db_default" in ops[-1]["reason"]
    # A CHECK validated under lock on a table with rows: a risk, but the table is small.
    risks = [r for r in doc["locking_risks"] if r["kind"] == "constraint_validation"]
    assert risks and risks[0]["table"] == "alpha_item" and not risks[0]["large"]
    assert doc["expand"] == ["alpha.0002_expand"] and doc["contract"] == []
    assert doc["verdict"] == "rolling" and doc["reversible"] is True


@pytest.mark.slow
def test_synthetic_deferrable_contract_is_two_phase(synthetic: Synthetic) -> None:
    doc = synthetic.doc("--targets", "bravo")
    ops = migration(doc, "bravo.0002_contract")["operations"]
    assert [(o["operation"], o["class"], o["deferrable"]) for o in ops] == [
        ("RemoveField", "contract", True),
        ("DeleteModel", "contract", True),
        ("AlterField", "contract", True),  # NULL -> NOT NULL
        ("AlterField", "contract", True),  # varchar(30) -> varchar(10)
        ("AlterUniqueTogether", "contract", True),
    ]
    assert "may write duplicates" in ops[4]["reason"] and "narrows varchar(30) -> varchar(10)" in ops[3]["reason"]
    assert "re-adds NOT NULL column nickname without a default" in ops[0]["reverse_warning"]
    assert migration(doc, "bravo.0002_contract")["deferrable"] is True
    assert (doc["verdict"], doc["strategy"], doc["contract"]) == ("two_phase", "migrations", ["bravo.0002_contract"])

    nickname = next(d for d in doc["deferred_statements"] if d["operation"] == 0)
    assert nickname["interim_sql"] == ['ALTER TABLE "bravo_account" ALTER COLUMN "nickname" DROP NOT NULL;']
    assert nickname["deferred_sql"] == ['ALTER TABLE "bravo_account" DROP COLUMN "nickname" CASCADE;']
    assert next(d for d in doc["deferred_statements"] if d["operation"] == 1)["deferred_sql"] == [
        'DROP TABLE "bravo_archive" CASCADE;'
    ]
    # The interim SQL does what it says: the new code's INSERT (no nickname) fails before it and works after,
    # and the old code still reads the column. On a copy: the analysed database must stay as it was.
    conninfo = synthetic.cluster.createdb(f"{synthetic.dbname}_bravo", template=synthetic.dbname)
    new_code_insert = "INSERT INTO bravo_account (email, score) VALUES ('new@x.test', 1)"
    with pytest.raises(Exception, match="nickname"):
        h.query(conninfo, new_code_insert)
    for statement in nickname["interim_sql"]:
        h.query(conninfo, statement)
    h.query(conninfo, new_code_insert)
    assert h.query(conninfo, "SELECT count(nickname), count(*) FROM bravo_account") == [(20, 21)]


@pytest.mark.slow
def test_synthetic_contract_that_cannot_be_deferred_needs_maintenance(synthetic: Synthetic) -> None:
    doc = synthetic.doc("--targets", "charlie")
    ops = migration(doc, "charlie.0002_breaking")["operations"]
    assert [(o["operation"], o["class"], o["deferrable"]) for o in ops] == [
        ("RenameField", "contract", False),
        ("AddField", "contract", False),
        ("AlterField", "contract", False),
    ]
    assert "column charlie_customer.name -> full_name" in ops[0]["reason"]
    assert "NOT NULL column tier" in ops[1]["reason"] and "old-code INSERTs omit it" in ops[1]["reason"]
    assert "changes the type integer -> varchar(3)" in ops[2]["reason"]
    assert doc["verdict"] == "maintenance" and doc["strategy"] is None
    assert sum("cannot be deferred" in r for r in doc["verdict_reasons"]) == 3
    assert doc["deferred_statements"] == []


@pytest.mark.slow
def test_synthetic_locking_risk_on_a_large_table(synthetic: Synthetic) -> None:
    small = synthetic.doc("--targets", "delta")
    assert {o["class"] for o in migration(small, "delta.0002_risky")["operations"]} == {"expand"}
    kinds = {(r["operation"], r["kind"]) for r in small["locking_risks"]}
    expected = {(0, "index_build"), (1, "rewrite")} | ({(2, "rewrite")} if synthetic.version >= (5, 0) else set())
    assert kinds == expected
    assert all(r["table"] == "delta_event" and r["rows"] == 500 and not r["large"] for r in small["locking_risks"])
    assert small["verdict"] == "rolling" and len(small["warnings"]) == len(expected)

    large = synthetic.doc("--targets", "delta", "--large-table-rows", "100")
    assert large["thresholds"]["large_table_rows"] == 100
    assert large["verdict"] == "maintenance"
    assert {(r["operation"], r["kind"]) for r in large["locking_risks"] if r["escalates"]} == expected
    assert any("rewrite on delta_event" in r and "TYPE bigint" in r for r in large["verdict_reasons"])
    # Large by bytes too: the threshold applies to pg_total_relation_size.
    by_bytes = synthetic.doc("--targets", "delta", "--large-table-bytes", "8192")
    assert by_bytes["verdict"] == "maintenance"


@pytest.mark.slow
def test_synthetic_unknown_operation_classes_need_maintenance(synthetic: Synthetic) -> None:
    doc = synthetic.doc("--targets", "echo")
    ops = migration(doc, "echo.0002_custom")["operations"]
    assert [(o["operation"], o["class"], o["description"]) for o in ops] == [
        ("Backfill", "unknown", "Backfill things"),
        ("TrackedAddField", "unknown", "Add field label to thing"),
    ]
    assert all("is not one this analysis knows" in o["reason"] and o["sql"] == [] for o in ops)
    assert doc["verdict"] == "maintenance" and len(doc["verdict_reasons"]) == 2
    assert migration(doc, "echo.0002_custom")["phase"] == "contract"


@pytest.mark.slow
def test_synthetic_irreversible_data_migration_needs_maintenance(synthetic: Synthetic) -> None:
    doc = synthetic.doc("--targets", "foxtrot")
    assert classes(doc, "foxtrot.0002_irreversible") == [("RunPython", "contract"), ("RunSQL", "contract")]
    assert doc["reversible"] is False
    assert [(i["migration"], i["operation"]) for i in doc["irreversible"]] == [
        ("foxtrot.0002_irreversible", 0),
        ("foxtrot.0002_irreversible", 1),
    ]
    assert migration(doc, "foxtrot.0003_remove_draft")["operations"][0]["deferrable"] is True
    assert doc["verdict"] == "maintenance"
    assert sum("irreversible" in r for r in doc["verdict_reasons"]) == 2
    assert migration(doc, "foxtrot.0002_irreversible")["reversible"] is False


@pytest.mark.slow
def test_synthetic_non_atomic_data_migration_needs_maintenance(synthetic: Synthetic) -> None:
    """Cut half-way, a non-atomic data migration leaves part of its work committed: only a restore undoes it."""
    doc = synthetic.doc("--targets", "india")
    assert classes(doc, "india.0002_nonatomic_backfill") == [("RunPython", "expand")]
    assert migration(doc, "india.0002_nonatomic_backfill")["atomic"] is False
    assert doc["verdict"] == "maintenance"
    assert any("india.0002_nonatomic_backfill is not atomic" in r for r in doc["verdict_reasons"]), doc["verdict_reasons"]
    # A non-atomic migration that only builds an index concurrently can still roll.
    doc = synthetic.doc("--targets", "juliet")
    assert migration(doc, "juliet.0002_concurrent_index")["atomic"] is False
    assert doc["verdict"] == "rolling", doc["verdict_reasons"]


@pytest.mark.slow
def test_synthetic_data_migration_locking_in_a_mode_that_admits_row_lockers_is_warned_about(synthetic: Synthetic) -> None:
    """SHARE / SHARE ROW EXCLUSIVE, in RunPython's source or in RunSQL: a live request can be a deadlock's victim."""
    doc = synthetic.doc("--targets", "kilo")
    ops = migration(doc, "kilo.0002_locked_backfills")["operations"]
    assert [o["class"] for o in ops] == ["expand", "expand", "expand"]
    assert "kilo_stock IN SHARE ROW EXCLUSIVE MODE" in ops[0]["lock_warning"]
    assert ops[1]["lock_warning"] is None  # EXCLUSIVE: the row holders finish first
    assert "kilo_stock IN SHARE MODE" in ops[2]["lock_warning"]
    warned = [w for w in doc["warnings"] if "admits the old code's SELECT ... FOR UPDATE" in w]
    assert [w.split(":")[0] for w in warned] == [f"kilo.0002_locked_backfills #{i}" for i in ("0 RunPython", "2 RunSQL")]
    assert doc["verdict"] == "rolling", doc["verdict_reasons"]


@pytest.mark.slow
def test_synthetic_contract_migration_blocks_later_ones(synthetic: Synthetic) -> None:
    doc = synthetic.doc("--targets", "golf", "hotel")
    assert set(doc["pending"]) == {
        "golf.0002_remove_old_flag",
        "golf.0003_ticket_note",
        "hotel.0002_seat_label",
        "hotel.0003_seat_ticket",
    }
    assert doc["expand"] == ["hotel.0002_seat_label"]
    assert doc["contract"] == [p for p in doc["pending"] if p != "hotel.0002_seat_label"]
    assert doc["contract"].index("golf.0002_remove_old_flag") < doc["contract"].index("golf.0003_ticket_note")
    assert doc["blocking"] == [
        {
            "migration": "golf.0002_remove_old_flag",
            "blocks": ["golf.0003_ticket_note", "hotel.0003_seat_ticket"],
            "operations": [0],
        }
    ]
    for name in ("golf.0003_ticket_note", "hotel.0003_seat_ticket"):
        m = migration(doc, name)
        assert (m["class"], m["phase"], m["blocked_by"]) == ("expand", "contract", ["golf.0002_remove_old_flag"])
    remove = migration(doc, "golf.0002_remove_old_flag")
    assert remove["deferrable"] is False and "hotel.0003_seat_ticket" in remove["deferrable_reason"]
    assert remove["operations"][0]["deferrable"] is True
    assert (doc["verdict"], doc["strategy"]) == ("two_phase", "deferred_statements")
    (flag,) = doc["deferred_statements"]
    assert flag["interim_sql"] == ['ALTER TABLE "golf_ticket" ALTER COLUMN "old_flag" DROP NOT NULL;']
    assert doc["tables"]["golf_ticket"] == {
        "rows": 2,
        "size_bytes": doc["tables"]["golf_ticket"]["size_bytes"],
        "rows_source": "reltuples",
    }
    assert doc["tables"]["hotel_seat"]["rows"] == 3 and doc["tables"]["hotel_seat"]["rows_source"].startswith("counted")


@pytest.mark.slow
def test_synthetic_whole_plan(synthetic: Synthetic) -> None:
    doc = synthetic.doc()
    assert doc["leaf_nodes_before"] == dict.fromkeys(APPS, "0001_initial")
    assert len(doc["pending"]) == 14
    assert doc["verdict"] == "maintenance"
    # Every case is judged the same way inside the whole plan as alone.
    for app in ("alpha", "bravo", "charlie", "delta"):
        alone = synthetic.doc("--targets", app)
        for m in alone["migrations"]:
            assert classes(doc, m["migration"]) == classes(alone, m["migration"])


# --------------------------------------------------------------------------------------------
# The SQL recognisers on their own
# --------------------------------------------------------------------------------------------


def test_split_sql_respects_quotes_dollar_quotes_and_comments() -> None:
    text = "SELECT 'a;b'; SELECT $f$x; y$f$; -- one; two\n SELECT \"odd;\"\"name\"; /* c; /* nested; */ d; */ SELECT E'\\';'"
    statements = mp.split_sql(text)
    assert [s.text for s in statements] == [
        "SELECT 'a;b';",
        "SELECT $f$x; y$f$;",
        'SELECT "odd;""name";',
        "SELECT E'\\';';",
    ]
    assert [s.masked for s in statements] == ["SELECT ''", "SELECT ''", 'SELECT "odd;""name"', "SELECT E''"]
    assert mp.split_sql("  ;\n -- nothing\n") == []


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ('CREATE INDEX "i" ON "t" ("a")', [{"action": "create_index", "table": "t", "concurrently": False}]),
        (
            "create unique index concurrently if not exists i on only public.T (a)",
            [{"action": "create_index", "table": "public.t", "concurrently": True}],
        ),
        (
            'ALTER TABLE "t" ADD CONSTRAINT "fk" FOREIGN KEY ("u_id") REFERENCES "u" ("id") DEFERRABLE INITIALLY DEFERRED',
            [
                {
                    "action": "add_constraint",
                    "kind": "FOREIGN KEY",
                    "not_valid": False,
                    "using_index": False,
                    "references": "u",
                    "table": "t",
                }
            ],
        ),
        (
            'ALTER TABLE "t" ADD CONSTRAINT "c" CHECK ("a" >= 0) NOT VALID',
            [{"action": "add_constraint", "kind": "CHECK", "not_valid": True, "using_index": False, "table": "t"}],
        ),
        (
            'ALTER TABLE "t" ALTER COLUMN "a" TYPE bigint USING "a"::bigint',
            [{"action": "alter_type", "column": "a", "type": "bigint", "using": None, "table": "t"}],
        ),
        (
            'ALTER TABLE "t" ALTER COLUMN "a" TYPE integer USING "a"::text::integer',
            [{"action": "alter_type", "column": "a", "type": "integer", "using": '"a"::text::integer', "table": "t"}],
        ),
        (
            'ALTER TABLE "t" ALTER COLUMN "a" SET NOT NULL, ALTER COLUMN "b" DROP NOT NULL',
            [{"action": "set_not_null", "column": "a", "table": "t"}, {"action": "drop_not_null", "column": "b", "table": "t"}],
        ),
        ('ALTER TABLE "t" RENAME COLUMN "a" TO "b"', [{"action": "rename_column", "column": "a", "new": "b", "table": "t"}]),
        ('ALTER TABLE "t" RENAME TO "u"', [{"action": "rename_table", "new": "u", "table": "t"}]),
        ('ALTER TABLE "t" DROP COLUMN "a" CASCADE', [{"action": "drop_column", "column": "a", "table": "t"}]),
        ('ALTER TABLE "t" DROP CONSTRAINT "c"', [{"action": "drop_constraint", "table": "t"}]),
        ("DROP TABLE IF EXISTS a, b CASCADE", [{"action": "drop_table", "table": "a"}, {"action": "drop_table", "table": "b"}]),
        ("LOCK TABLE t IN SHARE ROW EXCLUSIVE MODE", [{"action": "lock", "table": "t", "mode": "SHARE ROW EXCLUSIVE"}]),
        ("UPDATE t SET a = 1", [{"action": "dml", "verb": "UPDATE", "table": "t", "where": False}]),
        ("SET CONSTRAINTS ALL IMMEDIATE", []),
        ("COMMENT ON TABLE t IS ''", []),
    ],
)
def test_parse_statement(sql: str, expected: list[dict[str, Any]]) -> None:
    assert mp.parse_statement(mp.split_sql(sql)[0].masked) == expected


def test_add_column_defaults_and_identity() -> None:
    (volatile,) = mp.parse_statement('ALTER TABLE "t" ADD COLUMN "u" uuid DEFAULT gen_random_uuid() NOT NULL')
    assert volatile["default"] == "gen_random_uuid()" and mp.default_functions(volatile["default"]) == ["gen_random_uuid"]
    assert volatile["not_null"] and not volatile["identity"]
    (constant,) = mp.parse_statement(mp.split_sql("ALTER TABLE t ADD COLUMN c varchar(10) DEFAULT 'x' NOT NULL")[0].masked)
    assert constant["default"] == "''" and mp.default_functions(constant["default"]) == []
    (identity,) = mp.parse_statement('ALTER TABLE "t" ADD COLUMN "id2" bigint NOT NULL GENERATED BY DEFAULT AS IDENTITY')
    assert identity["identity"]
    (serial,) = mp.parse_statement('ALTER TABLE "t" ADD COLUMN "n" bigserial')
    assert serial["identity"]


@pytest.mark.parametrize(
    ("old", "new", "change", "rewrites"),
    [
        ("character varying(50)", "varchar(100)", "widen", False),
        ("character varying(100)", "varchar(50)", "narrow", True),
        ("character varying(100)", "text", "widen", False),
        ("text", "varchar(10)", "narrow", True),
        ("integer", "bigint", "widen", True),
        ("bigint", "integer", "narrow", True),
        ("numeric(10,2)", "numeric(12,2)", "widen", False),
        ("numeric(10,2)", "numeric(10,3)", "other", True),
        ("integer", "varchar(3)", "other", True),
        ("timestamp with time zone", "timestamptz", "same", False),
    ],
)
def test_type_changes(old: str, new: str, change: str, rewrites: bool) -> None:
    assert mp.type_change(old, new) == change
    assert mp.type_change_rewrites(old, new) is rewrites
