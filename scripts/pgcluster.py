"""A throwaway PostgreSQL server on this machine, for the tests (tests/conftest.py) and benchmarks.

Uses the controller's PostgreSQL server binaries (`make setup` installs postgresql-15) and listens on
127.0.0.1 and a socket in its work directory; initdb and pg_ctl run as the postgres OS user when we
are root (they refuse root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

PG_VERSIONS = ("17", "16", "15", "14", "13")


def find_bindir(override: str = "") -> Path | None:
    """`override`, else $PG_BINDIR, else the newest /usr/lib/postgresql/<version>/bin with initdb."""
    chosen = override or os.environ.get("PG_BINDIR", "")
    if chosen:
        return Path(chosen)
    for version in PG_VERSIONS:
        candidate = Path(f"/usr/lib/postgresql/{version}/bin")
        if (candidate / "initdb").exists():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def as_postgres(argv: list[str]) -> list[str]:
    """initdb and pg_ctl refuse root: run them as the postgres OS user when we are root."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser") is None:
        raise RuntimeError("running as root needs runuser (util-linux) to start PostgreSQL as 'postgres'")
    return ["runuser", "-u", "postgres", "--", *argv]


@dataclass
class Cluster:
    """A running server reachable over TCP on 127.0.0.1 as the postgres superuser (trust auth)."""

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
        return dict(os.environ, PGHOST=self.host, PGPORT=str(self.port), PGUSER=self.user)

    def psql(self, statement: str, dbname: str = "postgres") -> str:
        result = subprocess.run(
            [self.bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-c", statement],
            env=self.env(),
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip()

    def execute(self, statement: str, dbname: str = "postgres") -> Any:
        """Run one statement (autocommit) and return the first column of its first row, if any."""
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cur = conn.execute(statement)  # type: ignore[arg-type]
            row = cur.fetchone() if cur.description else None
            return row[0] if row else None

    def createdb(self, name: str, template: str = "template0") -> str:
        """Create (or re-create) database `name` and return its DSN."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
        return self.dsn(name)


def start(workdir: Path, bindir: Path, options: str = "") -> Cluster:
    """Start a server on `workdir`/pgdata (initdb first if it holds none) on a free port."""
    datadir = workdir / "pgdata"
    workdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    if not (datadir / "PG_VERSION").exists():
        subprocess.run(
            as_postgres(
                [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]
            ),
            check=True,
            capture_output=True,
        )
    port = free_port()
    server_options = f"-p {port} -c listen_addresses=127.0.0.1 -k {workdir} {options}".strip()
    subprocess.run(
        as_postgres(
            [str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(workdir / "server.log"), "-o", server_options, "-w", "start"]
        ),
        check=True,
        capture_output=True,
    )
    return Cluster(bindir=bindir, datadir=datadir, port=port)


def stop(cluster: Cluster, mode: str = "fast") -> None:
    subprocess.run(
        as_postgres([cluster.bin("pg_ctl"), "-D", str(cluster.datadir), "-m", mode, "stop"]), check=False, capture_output=True
    )
