"""Shared pytest fixtures.

``pg_cluster`` starts a throwaway PostgreSQL server (the controller's PostgreSQL 15 binaries) on a
free local port for the whole test session, and removes it afterwards. Tests never touch a system
PostgreSQL service.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PG_VERSIONS = ("17", "16", "15", "14", "13")


def find_pg_bindir() -> Path | None:
    """Return the newest PostgreSQL server bin directory on this machine, or None."""
    override = os.environ.get("PG_BINDIR")
    if override:
        return Path(override)
    for version in PG_VERSIONS:
        candidate = Path(f"/usr/lib/postgresql/{version}/bin")
        if (candidate / "initdb").exists():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgCluster:
    """A running throwaway PostgreSQL server reachable over TCP on 127.0.0.1."""

    bindir: Path
    datadir: Path
    port: int
    host: str = "127.0.0.1"
    user: str = "postgres"

    def bin(self, name: str) -> str:
        return str(self.bindir / name)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def env(self) -> dict[str, str]:
        """Environment for libpq command-line tools (pg_dump, psql...) aimed at this server."""
        env = dict(os.environ)
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=self.user)
        return env

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        result = subprocess.run(
            [self.bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-c", sql],
            env=self.env(),
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip()

    def createdb(self, name: str, template: str = "template0") -> str:
        """Create (or re-create) database ``name`` and return its DSN."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.dsn(name)


def _run_as_postgres_if_root(argv: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: drop to the postgres OS user when needed."""
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("running as root needs runuser (util-linux) to start PostgreSQL as 'postgres'")
    return [runuser, "-u", "postgres", "--", *argv]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = find_pg_bindir()
    if bindir is None:
        pytest.fail("no PostgreSQL server binaries found: run `make setup` (installs postgresql-15)")
    base = Path(tempfile.mkdtemp(prefix="djm-pg-", dir=os.environ.get("DJM_PG_TMP", "/var/tmp")))
    datadir = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    subprocess.run(
        _run_as_postgres_if_root(
            [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {base} -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
    subprocess.run(
        _run_as_postgres_if_root(
            [str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(base / "server.log"), "-o", options, "-w", "start"]
        ),
        check=True,
        capture_output=True,
    )
    cluster = PgCluster(bindir=bindir, datadir=datadir, port=port)
    try:
        yield cluster
    finally:
        subprocess.run(
            _run_as_postgres_if_root([str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)
