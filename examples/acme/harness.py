"""Test harness for the ACME fixture app (used by tests/unit/test_fixture_*.py and test_gen_data.py).

Assembles release trees with scripts/build_release.py, builds their virtualenvs once
(~/.cache/djm/venvs/<hash>, reused across runs and checkouts), runs manage.py with the env-var contract
pointed at a throwaway PostgreSQL, and takes column-order-independent fingerprints.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import build_release  # noqa: E402

V1_APPS = ("catalog", "cms", "customers", "orders", "payments", "profiles")
DATA_TABLES = ("customers", "profiles", "products", "cms_pages", "orders", "order_items", "payments")
# A 50+ character key that `check --deploy` accepts; test-only, never used outside throwaway runs.
TEST_SECRET_KEY = "acme-test-only-" + "k3y-" * 12


class Cluster(Protocol):
    host: str
    port: int
    user: str

    def dsn(self, dbname: str = ...) -> str: ...

    def createdb(self, name: str, template: str = ...) -> str: ...


_TREE_ROOT = Path(tempfile.mkdtemp(prefix="acme-releases-"))
atexit.register(lambda: shutil.rmtree(_TREE_ROOT, ignore_errors=True))


@functools.cache
def release_dir(release_id: str) -> Path:
    """The assembled tree of a release (one per test session)."""
    return build_release.write_directory(build_release.assemble(release_id), _TREE_ROOT)


@functools.cache
def venv_python(release_id: str) -> Path:
    """The interpreter of the release's virtualenv (built once, then reused from ~/.cache/djm/venvs)."""
    return build_release.ensure_venv(build_release.assemble(release_id)) / "bin" / "python"


def django_env(cluster: Cluster, dbname: str, **extra: str) -> dict[str, str]:
    """The env-var contract, production-like but over plain HTTP (as behind HAProxy in the tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_", "PYTHON"))}
    env.update(
        DJANGO_SECRET_KEY=TEST_SECRET_KEY,
        DJANGO_ALLOWED_HOSTS="localhost,127.0.0.1",
        DJANGO_SECURE_SSL_REDIRECT="0",
        DJANGO_SECURE_HSTS_SECONDS="0",
        DJANGO_SESSION_COOKIE_SECURE="0",
        DJANGO_CSRF_COOKIE_SECURE="0",
        DATABASE_HOST=cluster.host,
        DATABASE_PORT=str(cluster.port),
        DATABASE_NAME=dbname,
        DATABASE_USER=cluster.user,
        DATABASE_PASSWORD="",
        DJANGO_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


def manage(
    release_id: str,
    env: Mapping[str, str],
    *args: str,
    python: Path | None = None,
    timeout: int = 900,
) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py <args>`` of a release in its virtualenv; never raises on a non-zero exit."""
    return subprocess.run(
        [str(python or venv_python(release_id)), "manage.py", *args],
        cwd=release_dir(release_id),
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def must(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(result.args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


_TEMPLATES: dict[tuple[int, str], str] = {}


def v1_database(cluster: Cluster, name: str) -> str:
    """A fresh database with the v1 schema migrated (cloned from a per-session template); returns its DSN."""
    key = (cluster.port, "acme_v1_template")
    if key not in _TEMPLATES:
        cluster.createdb("acme_v1_template")
        must(manage("v1", django_env(cluster, "acme_v1_template"), "migrate", "--noinput", "-v0"))
        _TEMPLATES[key] = "acme_v1_template"
    return cluster.createdb(name, template=_TEMPLATES[key])


def run_gen_data(dsn: str, size: str, seed: int = 1, jobs: int = 1, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(SCRIPTS / "gen_data.py"), "--dsn", dsn, "--size", size, "--seed", str(seed)]
    return subprocess.run(
        [*argv, "--jobs", str(jobs), *extra],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


def fingerprint(dsn: str, tables: tuple[str, ...] | None = None) -> dict[str, tuple[int, str]]:
    """{table: (rows, sum of hashes)} per table, independent of row AND column order (to_jsonb sorts keys).

    Column order matters to scripts/db_fingerprint.py (t::text); a reversed DROP COLUMN re-adds the
    column at the end, so after a v2 -> v1 round trip the same data reads back in another column order.
    """
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        if tables is None:
            tables = tuple(
                r[0]
                for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename").fetchall()
            )
        result = {}
        for table in tables:
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*), coalesce(sum(hashtextextended(to_jsonb(t)::text, 0)::numeric), 0)::text FROM {} AS t"
                ).format(sql.Identifier(table))
            ).fetchone()
            assert row is not None
            result[table] = (int(row[0]), str(row[1]))
    return result


def query(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def applied_migrations(dsn: str) -> set[tuple[str, str]]:
    return {(app, name) for app, name in query(dsn, "SELECT app, name FROM django_migrations")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a local test server
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextmanager
def gunicorn(release_id: str, env: Mapping[str, str], timeout: float = 30.0, workers: int = 1) -> Iterator[str]:
    """Run the release under gunicorn (``workers`` processes) on a free port; yields the base URL once it answers."""
    port = free_port()
    gunicorn_bin = venv_python(release_id).parent / "gunicorn"
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [str(gunicorn_bin), "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "acme.wsgi:application"],
        cwd=release_dir(release_id),
        env=dict(env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"gunicorn exited {proc.returncode}:\n{log.read()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"gunicorn did not listen on {port} within {timeout}s") from None
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
