"""Shared pytest fixtures.

``pg_cluster`` starts a throwaway PostgreSQL server (scripts/pgcluster.py, the controller's
PostgreSQL binaries) on a free local port for the whole test session, and removes it afterwards.
Tests never touch a system PostgreSQL service.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import pgcluster  # noqa: E402 - found through the path set just above

PgCluster = pgcluster.Cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = pgcluster.find_bindir()
    if bindir is None:
        pytest.fail("no PostgreSQL server binaries found: run `make setup` (installs postgresql-15)")
    base = Path(tempfile.mkdtemp(prefix="djm-pg-", dir=os.environ.get("DJM_PG_TMP", "/var/tmp")))
    # Durability off: a test server that dies is simply made again.
    cluster = pgcluster.start(base, bindir, "-c fsync=off -c full_page_writes=off -c synchronous_commit=off")
    try:
        yield cluster
    finally:
        pgcluster.stop(cluster, mode="immediate")
        shutil.rmtree(base, ignore_errors=True)
