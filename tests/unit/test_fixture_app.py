"""The ACME fixture app in its real virtualenvs against the throwaway PostgreSQL (pg_cluster).

v1 runs on the oldest interpreter that satisfies it (Python 3.8 where pyenv has it), v2 on 3.11.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "acme"))

import harness as h  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("release", ["v1", "v2"])
def test_django_test_suite(pg_cluster: h.Cluster, release: str) -> None:
    """The app's own tests (health, smoke endpoints, auth backend; v2: categories, profile sync)."""
    pg_cluster.createdb(f"acme_suite_{release.replace('-', '_')}")
    env = h.django_env(pg_cluster, f"acme_suite_{release.replace('-', '_')}")
    result = h.manage(release, env, "test", "--noinput", "-v", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    ran = [line for line in output.splitlines() if line.startswith("Ran ")]
    assert ran and int(ran[0].split()[1]) >= 19, output
    assert "test_legacy_login_upgrades_the_hash_once" in output
    if release == "v2":
        assert "test_login_records_last_login_and_display_name" in output


@pytest.mark.parametrize("release", ["v1", "v2"])
def test_makemigrations_has_nothing_to_add(pg_cluster: h.Cluster, release: str) -> None:
    env = h.django_env(pg_cluster, "postgres")
    result = h.manage(release, env, "makemigrations", "--check", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No changes detected" in result.stdout


@pytest.mark.parametrize("release", ["v1", "v2"])
def test_deploy_checks_pass_with_production_env(pg_cluster: h.Cluster, release: str) -> None:
    secure = h.django_env(pg_cluster, "postgres")
    # Secure defaults: nothing may be silenced.
    for knob in ("SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE"):
        del secure["DJANGO_" + knob]
    result = h.manage(release, secure, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 silenced" in result.stdout
    plain_http = h.manage(release, h.django_env(pg_cluster, "postgres"), "check", "--deploy", "--fail-level", "WARNING")
    assert plain_http.returncode == 0, plain_http.stdout + plain_http.stderr
    assert "4 silenced" in plain_http.stdout


@pytest.mark.parametrize(
    ("extra", "outcome"),
    [
        ({"DJANGO_DEBUG": "1"}, "security.W018"),  # DEBUG is never silenced
        ({"DJANGO_SECRET_KEY": "short"}, "security.W009"),  # nor a weak key
        ({"DJANGO_SECURE_SSL_REDIRECT": "1"}, "3 silenced"),  # back on: one check fewer silenced
        ({"DJANGO_SECURE_HSTS_SECONDS": "3600"}, "3 silenced"),  # HSTS on: W004 no longer silenced
        ({"DJANGO_SECURE_HSTS_SECONDS": "3600", "DJANGO_SECURE_HSTS_PRELOAD": "0"}, "4 silenced"),  # W021 instead
        ({"DJANGO_SECURE_HSTS_SECONDS": "3600", "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS": "0"}, "4 silenced"),  # W005
    ],
)
def test_only_explicitly_disabled_checks_are_silenced(pg_cluster: h.Cluster, extra: dict[str, str], outcome: str) -> None:
    env = h.django_env(pg_cluster, "postgres", **extra)
    result = h.manage("v1", env, "check", "--deploy", "--fail-level", "WARNING")
    if outcome.startswith("security."):
        assert result.returncode != 0
        assert outcome in result.stderr + result.stdout
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert outcome in result.stdout


def test_secret_key_is_required_outside_debug(pg_cluster: h.Cluster) -> None:
    env = h.django_env(pg_cluster, "postgres")
    del env["DJANGO_SECRET_KEY"]
    result = h.manage("v1", env, "check")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is not set" in result.stderr
    debug = h.manage("v1", {**env, "DJANGO_DEBUG": "1"}, "check")
    assert debug.returncode == 0, debug.stderr


def test_bad_boolean_is_rejected_with_the_variable_name(pg_cluster: h.Cluster) -> None:
    result = h.manage("v1", h.django_env(pg_cluster, "postgres", DJANGO_DEBUG="maybe"), "check")
    assert result.returncode != 0
    assert "DJANGO_DEBUG must be 0 or 1" in result.stderr


def test_v2_refuses_an_old_interpreter(pg_cluster: h.Cluster) -> None:
    """v2's tree on v1's interpreter (3.8 or whatever is oldest): a clear ImproperlyConfigured."""
    old_python = h.venv_python("v1")
    version = h.build_release.interpreter_version(str(old_python))
    if version is None or version >= (3, 11, 0):
        pytest.skip(f"no interpreter older than 3.11 on this machine (v1 venv runs {version})")
    result = h.manage("v2", h.django_env(pg_cluster, "postgres"), "check", python=old_python)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "needs Python >= 3.11" in result.stderr


def test_collectstatic_fills_static_root(pg_cluster: h.Cluster, tmp_path: Path) -> None:
    env = h.django_env(pg_cluster, "postgres", STATIC_ROOT=str(tmp_path / "static"))
    result = h.manage("v2", env, "collectstatic", "--noinput")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "static" / "acme" / "site.css").is_file()
    assert (tmp_path / "static" / "admin" / "css" / "base.css").is_file()


def test_release_id_from_env_overrides_the_release_file(pg_cluster: h.Cluster) -> None:
    env = h.django_env(pg_cluster, "postgres", APP_RELEASE_ID="20240101-abc")
    code = "from django.conf import settings; print(settings.RELEASE_ID, settings.STATIC_ROOT)"
    result = h.manage("v1", {**env, "STATIC_ROOT": "/srv/static"}, "shell", "-c", code)
    assert result.stdout.split() == ["20240101-abc", "/srv/static"], result.stderr
    from_file = h.manage("v1", h.django_env(pg_cluster, "postgres"), "shell", "-c", code)
    assert from_file.stdout.split()[0] == "v1", from_file.stderr


@pytest.mark.parametrize(("release", "status"), [("v1", 200), ("v2", 200), ("v2-bad-health", 503)])
def test_gunicorn_serves_healthz(pg_cluster: h.Cluster, release: str, status: int) -> None:
    dbname = "acme_http_" + release.replace("-", "_")
    pg_cluster.createdb(dbname)
    env = h.django_env(pg_cluster, dbname)
    h.must(h.manage(release, env, "migrate", "--noinput", "-v0"))
    check = h.manage(release, env, "check", "--deploy", "--fail-level", "WARNING")
    assert check.returncode == 0, check.stdout + check.stderr  # even the bad one passes `check`
    with h.gunicorn(release, env) as base:
        code, body = h.http_get(base + "/healthz")
        health = json.loads(body)
        assert code == status, health
        assert health["release"] == release
        assert health["database"] is True and health["unapplied_migrations"] == 0
        assert health["status"] == ("ok" if status == 200 else "fail")
        assert health["django"] == ("3.2.25" if release == "v1" else "4.2.30")
        if status == 503:
            assert "TemplateDoesNotExist" in health["checks"]["templates"]


def test_healthz_reports_unapplied_migrations_without_failing(pg_cluster: h.Cluster) -> None:
    """Old code against a migrated DB is fine; new code against an old DB reports the gap."""
    dsn = h.v1_database(pg_cluster, "acme_http_gap")
    env = h.django_env(pg_cluster, "acme_http_gap")
    with h.gunicorn("v2", env) as base:
        code, body = h.http_get(base + "/healthz")
    health = json.loads(body)
    assert code == 200, health
    assert health["unapplied_migrations"] == 8
    assert ("catalog", "0003_normalize_categories") not in h.applied_migrations(dsn)


def test_healthz_fails_when_the_database_is_down(pg_cluster: h.Cluster) -> None:
    env = h.django_env(pg_cluster, "acme_no_such_db")
    with h.gunicorn("v1", env) as base:
        code, body = h.http_get(base + "/healthz")
    health = json.loads(body)
    assert code == 503
    assert health["database"] is False and health["unapplied_migrations"] is None
    assert "acme_no_such_db" in health["checks"]["database"]


def test_smoke_endpoints_over_http_on_generated_data(pg_cluster: h.Cluster) -> None:
    dsn = h.v1_database(pg_cluster, "acme_http_smoke")
    assert h.run_gen_data(dsn, "2MB", seed=3).returncode == 0
    env = h.django_env(pg_cluster, "acme_http_smoke")
    (slug,) = h.query(dsn, "SELECT slug FROM cms_pages WHERE published ORDER BY id LIMIT 1")[0]
    with h.gunicorn("v1", env) as base:
        code, body = h.http_get(base + "/smoke/profile/1")
        assert code == 200
        assert json.loads(body)["customer_id"] == 1
        code, body = h.http_get(base + f"/pages/{slug}")
        assert code == 200 and b"release v1" in body
        request = urllib.request.Request(base + "/smoke/checkout", data=b"", method="POST")  # noqa: S310 - local
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - local test server
            checkout = json.loads(response.read())
            assert response.status == 201
    ((orders, payments),) = h.query(
        dsn, "SELECT count(*), (SELECT count(*) FROM payments WHERE order_id = %s) FROM orders WHERE id = %s",
        [checkout["order_id"], checkout["order_id"]],
    )  # fmt: skip
    assert (orders, payments) == (1, 1)
