"""The shared throwaway-PostgreSQL fixture works: other unit tests build on it."""

from __future__ import annotations


def test_pg_cluster_serves_queries(pg_cluster) -> None:
    dsn = pg_cluster.createdb("fixture_check")
    assert "dbname=fixture_check" in dsn
    pg_cluster.psql("CREATE TABLE t (id int)", dbname="fixture_check")
    pg_cluster.psql("INSERT INTO t SELECT generate_series(1, 10)", dbname="fixture_check")
    assert pg_cluster.psql("SELECT sum(id) FROM t", dbname="fixture_check") == "55"
    assert int(pg_cluster.psql("SHOW server_version_num")) >= 130000
