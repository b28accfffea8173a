"""Small helpers of the unit tests that talk to the throwaway PostgreSQL cluster (tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import psycopg


def execute(dsn: str, *statements: str) -> None:
    """Each statement in autocommit, in order."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def scalar(dsn: str, query: str) -> Any:
    """The first column of the first row (None when there is none)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None
