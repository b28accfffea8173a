#!/usr/bin/env python3
"""Fingerprint a PostgreSQL database (row count + order-independent content hash per table) and compare fingerprints.

The hash of a table is computed in the server, one query per table, as a sum of one 64-bit hash per row,
so it does not depend on the physical order of the rows, and only two numbers per table cross the wire. A
row's hash (method ``columns1``, the default) is the XOR of one hash per column, each seeded by the
column's name: integers, text, timestamps, uuid, jsonb and booleans by their type's own hash function,
every other type by its text; so the order of the columns does not matter either. Method ``text`` (every
fingerprint of format 1) hashes the whole row as text, ``hashtextextended(t::text, 0)``: 3x slower.
All tables are read in one snapshot: the caller's (``--snapshot``, e.g. the one a backup exported) or,
with several connections, one exported by a coordinating connection.

Commands:
    db_fingerprint.py fingerprint [--dsn DSN] [--snapshot ID] [--jobs N] [--method M] [--schema S ...]
                                  [--exclude-table T ...] [--output FILE]
    db_fingerprint.py compare A B [--json]     (A, B: a fingerprint JSON, a pg_backup manifest.json, or dsn:<DSN>,
                                                 which is taken with the method of the other side)

Exit codes: 0 success / equal, 1 fingerprints differ (compare), 2 error.
Runs on Python 3.9+ with psycopg 3.  See docs/fingerprint.md.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import queue
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable, Union

try:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
except ImportError:  # pragma: no cover - exercised only on hosts without psycopg
    sys.stderr.write("db_fingerprint: psycopg 3 is required (pip install 'psycopg[binary]' or apt install python3-psycopg)\n")
    raise SystemExit(2) from None

FORMAT_VERSION = 2  # 2 records its method; 1 (no method) is method "text"
FORMATS = (1, 2)
METHODS = ("columns1", "text")
DEFAULT_METHOD = "columns1"
MIN_SERVER_VERSION_NUM = 110000  # the *extended() hash functions exist from PostgreSQL 11 on

# Session settings that change how values are rendered by t::text.  They are pinned so that two servers
# with different defaults (postgresql.conf, ALTER DATABASE/ROLE SET) hash the same data the same way.
SESSION_SETTINGS: dict[str, str] = {
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "statement_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
}

# Schemas never fingerprinted (plus pg_temp_* / pg_toast_temp_*).
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")

TABLE_QUERY = "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)::numeric), 0) FROM ONLY {table} AS t"

# Method columns1: the built-in types (fixed OIDs) hashed by their own extended hash function, which
# hashes the stored value (no text rendering: the 3x of this method). Text byte for byte (COLLATE "C":
# a nondeterministic collation would hash 'a' and 'A' alike); timestamptz as its UTC timestamp. Every
# other type is hashed as its text (numeric keeps its scale that way, a float its -0, an enum its label
# and not its OID, which a restore changes). Changing this table changes the method's name.
COLUMN_HASH: dict[int, str] = {
    16: "hashint4extended({col}::int, {seed})",  # boolean
    20: "hashint8extended({col}, {seed})",  # bigint
    21: "hashint2extended({col}, {seed})",  # smallint
    23: "hashint4extended({col}, {seed})",  # integer
    25: 'hashtextextended({col} COLLATE "C", {seed})',  # text
    1043: 'hashtextextended({col}::text COLLATE "C", {seed})',  # character varying
    1114: "timestamp_hash_extended({col}, {seed})",  # timestamp
    1184: "timestamp_hash_extended({col} AT TIME ZONE 'UTC', {seed})",  # timestamptz
    2950: "uuid_hash_extended({col}, {seed})",  # uuid
    3802: "jsonb_hash_extended({col}, {seed})",  # jsonb
}
TEXT_HASH = 'hashtextextended({col}::text COLLATE "C", {seed})'
COLUMNS_QUERY = (
    "SELECT attname, atttypid::int FROM pg_catalog.pg_attribute"
    " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
)

ConnFactory = Callable[[], "psycopg.Connection[Any]"]
ConnSource = Union[str, ConnFactory]


class FingerprintError(Exception):
    """A fingerprint could not be taken or read; the message says why."""


def redact_dsn(dsn: str) -> str:
    """Return the DSN without its password, for messages."""
    if not dsn:
        return "(libpq defaults)"
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    if "password" in params:
        params["password"] = "********"  # noqa: S105 - a mask, not a password
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def check_server_version(version_num: int) -> None:
    """Refuse servers without hashtextextended()."""
    if version_num < MIN_SERVER_VERSION_NUM:
        release = f"{version_num // 10000}.{version_num // 100 % 100}" if version_num < 100000 else str(version_num // 10000)
        raise FingerprintError(f"server version {release} is too old: hashtextextended() needs PostgreSQL 11 or later")


def _factory(source: ConnSource) -> ConnFactory:
    if callable(source):
        return source
    dsn = source

    def connect() -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(dsn, autocommit=True, application_name="db_fingerprint")
        except psycopg.Error as exc:
            raise FingerprintError(f"cannot connect to {redact_dsn(dsn)}: {str(exc).strip()}") from exc

    return connect


def _open(factory: ConnFactory, snapshot: str | None, export: bool) -> tuple[psycopg.Connection[Any], str | None]:
    """Open a connection in a REPEATABLE READ, READ ONLY transaction; import or export a snapshot."""
    try:
        conn = factory()
    except psycopg.Error as exc:
        raise FingerprintError(f"cannot connect: {str(exc).strip()}") from exc
    try:
        conn.autocommit = True
        for name, value in SESSION_SETTINGS.items():
            conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        exported = None
        if snapshot is not None:
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        elif export:
            row = conn.execute("SELECT pg_export_snapshot()").fetchone()
            exported = row[0] if row else None
        return conn, exported
    except psycopg.Error as exc:
        conn.close()
        what = f"import snapshot {snapshot!r}" if snapshot is not None else "start a repeatable-read transaction"
        raise FingerprintError(f"cannot {what}: {str(exc).strip()}") from exc


def _selected(name: str, patterns: Sequence[str]) -> bool:
    """True when schema.table ``name`` matches one of the patterns (qualified or bare table name, fnmatch)."""
    bare = name.split(".", 1)[1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(bare, p) for p in patterns)


def list_tables(
    conn: psycopg.Connection[Any], schemas: Sequence[str] | None = None, exclude_tables: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """Ordinary, permanent or unlogged tables of the chosen schemas, largest first: [(schema, table), ...]."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r'
           AND c.relpersistence <> 't'
           AND n.nspname <> ALL (%(system)s)
           AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
           AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%%'
           AND (%(schemas)s::text[] IS NULL OR n.nspname = ANY (%(schemas)s::text[]))
         ORDER BY c.relpages DESC, n.nspname, c.relname
        """,
        {"system": list(SYSTEM_SCHEMAS), "schemas": list(schemas) if schemas else None},
    ).fetchall()
    return [(s, t) for s, t in rows if not _selected(f"{s}.{t}", exclude_tables)]


def _seed(kind: str, column: str) -> int:
    """A 63-bit constant derived from the column's name: the same on every machine and run (never
    -2**63, which SQL cannot write as a bigint literal)."""
    return int.from_bytes(hashlib.sha256(f"{kind}:{column}".encode()).digest()[:8], "big") & (2**63 - 1)


def row_hash_sql(columns: Sequence[tuple[str, int]], alias: str = "t") -> sql.Composable:
    """Method columns1: the XOR of one seeded hash per column (a NULL hashes to its own constant)."""
    if not columns:
        return sql.SQL("0::bigint")
    parts = []
    for name, type_oid in columns:
        template = COLUMN_HASH.get(type_oid, TEXT_HASH)
        expr = sql.SQL(template).format(col=sql.Identifier(alias, name), seed=sql.Literal(_seed("value", name)))
        parts.append(sql.SQL("coalesce({}, {})").format(expr, sql.Literal(_seed("null", name))))
    return sql.SQL(" # ").join(parts)


def _table_query(conn: psycopg.Connection[Any], schema: str, table: str, method: str) -> sql.Composable:
    qualified = sql.Identifier(schema, table)
    if method == "text":
        return sql.SQL(TABLE_QUERY).format(table=qualified)
    columns = conn.execute(COLUMNS_QUERY, (qualified.as_string(conn),)).fetchall()
    return sql.SQL("SELECT count(*), coalesce(sum({}), 0) FROM ONLY {} AS t").format(row_hash_sql(columns), qualified)


def _hash_table(conn: psycopg.Connection[Any], schema: str, table: str, method: str = DEFAULT_METHOD) -> dict[str, Any]:
    row = conn.execute(_table_query(conn, schema, table, method)).fetchone()
    if row is None:  # pragma: no cover - an aggregate always returns one row
        raise FingerprintError(f"no result for {schema}.{table}")
    return {"rows": int(row[0]), "hash": str(row[1])}


def fingerprint(
    conn_factory_or_dsn: ConnSource = "",
    snapshot: str | None = None,
    jobs: int = 1,
    schemas: Sequence[str] | None = None,
    exclude_tables: Sequence[str] = (),
    method: str = DEFAULT_METHOD,
) -> dict[str, Any]:
    """Fingerprint every selected table, all in one snapshot, with ``jobs`` connections.

    ``conn_factory_or_dsn``: a libpq DSN ("" = libpq defaults) or a callable returning a new psycopg connection
    (each call one connection, which this function owns and closes).  ``snapshot``: an id from
    pg_export_snapshot() whose transaction the caller keeps open until this returns; without it the function
    exports its own when jobs > 1.  ``method``: "columns1" (the default) or "text"; a fingerprint that
    will be compared with another must be taken with that one's method (``method_of``).
    Returns the fingerprint document (see docs/fingerprint.md).
    """
    if jobs < 1:
        raise FingerprintError("jobs must be at least 1")
    if method not in METHODS:
        raise FingerprintError(f"unknown fingerprint method {method!r} (known: {', '.join(METHODS)})")
    factory = _factory(conn_factory_or_dsn)
    conns: list[psycopg.Connection[Any]] = []
    try:
        first, exported = _open(factory, snapshot, export=jobs > 1)
        conns.append(first)
        info = first.execute(
            "SELECT current_database(), current_setting('server_version'), current_setting('server_version_num')::int"
        ).fetchone()
        assert info is not None
        database, server_version, version_num = info
        check_server_version(version_num)
        tables = list_tables(first, schemas, exclude_tables)
        shared = snapshot if snapshot is not None else exported
        for _ in range(min(jobs, len(tables)) - 1):
            conns.append(_open(factory, shared, export=False)[0])
        taken_at = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
        results = _run(conns, tables, method)
    finally:
        for conn in conns:
            conn.close()
    return {
        "format": FORMAT_VERSION,
        "method": method,
        "database": database,
        "server_version": server_version,
        "snapshot": snapshot,
        "taken_at": taken_at,
        "tables": dict(sorted(results.items())),
    }


def _run(
    conns: Sequence[psycopg.Connection[Any]], tables: Iterable[tuple[str, str]], method: str = DEFAULT_METHOD
) -> dict[str, dict[str, Any]]:
    """Hash the tables, one worker thread per connection pulling from a queue (largest tables first)."""
    work: queue.Queue[tuple[str, str]] = queue.Queue()
    for item in tables:
        work.put(item)
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(conn: psycopg.Connection[Any]) -> None:
        while not errors:
            try:
                schema, table = work.get_nowait()
            except queue.Empty:
                return
            try:
                result = _hash_table(conn, schema, table, method)
            except psycopg.Error as exc:
                with lock:
                    errors.append(FingerprintError(f"cannot fingerprint {schema}.{table}: {str(exc).strip()}"))
                return
            except BaseException as exc:  # re-raised in the calling thread
                with lock:
                    errors.append(exc)
                return
            with lock:
                results[f"{schema}.{table}"] = result

    run_workers(worker, [(c,) for c in conns], errors)
    return results


def run_workers(worker: Callable[..., None], arguments: Sequence[tuple[Any, ...]], errors: list[BaseException]) -> None:
    """Run ``worker(*args)`` once per entry of ``arguments``, each in a thread of its own (in this one when
    there is a single entry), wait for all, then raise the first error the workers put into ``errors``."""
    if len(arguments) == 1:
        worker(*arguments[0])
    else:
        threads = [threading.Thread(target=worker, args=args, daemon=True) for args in arguments]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def method_of(doc: dict[str, Any]) -> str:
    """The method a fingerprint document was taken with (format 1 documents: "text")."""
    return str(doc.get("method", "text"))


def load(source: str, jobs: int = 1, method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """Read a fingerprint from a JSON file (fingerprint or pg_backup manifest) or take one from ``dsn:<DSN>``."""
    if source.startswith("dsn:"):
        return fingerprint(source[len("dsn:") :], jobs=jobs, method=method)
    try:
        doc = json.loads(Path(source).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FingerprintError(f"cannot read fingerprint {source}: {exc}") from exc
    if isinstance(doc, dict) and "tables" not in doc and "fingerprints" in doc:
        doc = doc["fingerprints"]
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), dict):
        raise FingerprintError(f"{source} is neither a fingerprint nor a manifest with a 'fingerprints' fingerprint")
    if doc.get("format") not in FORMATS or method_of(doc) not in METHODS:
        raise FingerprintError(
            f"{source}: unsupported fingerprint format {doc.get('format')!r}, method {method_of(doc)!r}"
            f" (known: formats {', '.join(map(str, FORMATS))}, methods {', '.join(METHODS)})"
        )
    return doc


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Tables that differ between fingerprints a and b, sorted by name; [] when equal.

    Each entry: {"table", "status", "rows_a", "rows_b", "row_delta"} where status is
    "only_in_a", "only_in_b", "rows" (row counts differ) or "content" (same count, different content);
    rows_* is None on the side where the table is missing, row_delta is rows_b - rows_a (None if missing).
    Fingerprints taken by different methods cannot be compared: FingerprintError.
    """
    if method_of(a) != method_of(b):
        raise FingerprintError(
            f"the fingerprints were taken by different methods ({method_of(a)}, {method_of(b)}): "
            "take the live one with the other's method (method_of)"
        )
    ta: dict[str, Any] = a["tables"]
    tb: dict[str, Any] = b["tables"]
    diffs: list[dict[str, Any]] = []
    for name in sorted(set(ta) | set(tb)):
        ea, eb = ta.get(name), tb.get(name)
        rows_a = ea["rows"] if ea else None
        rows_b = eb["rows"] if eb else None
        if ea is None:
            status = "only_in_b"
        elif eb is None:
            status = "only_in_a"
        elif rows_a != rows_b:
            status = "rows"
        elif str(ea["hash"]) != str(eb["hash"]):
            status = "content"
        else:
            continue
        delta = rows_b - rows_a if rows_a is not None and rows_b is not None else None
        diffs.append({"table": name, "status": status, "rows_a": rows_a, "rows_b": rows_b, "row_delta": delta})
    return diffs


STATUS_TEXT = {
    "only_in_a": "missing in B",
    "only_in_b": "missing in A",
    "rows": "row count differs",
    "content": "same row count, content differs",
}


def format_diffs(diffs: Sequence[dict[str, Any]], compared: int) -> str:
    """A plain-text table of the differences, with a summary line."""
    if not diffs:
        return f"{compared} tables compared: fingerprints are equal\n"

    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    def delta(v: Any) -> str:
        return "-" if v is None else f"{v:+d}"

    rows = [("TABLE", "ROWS A", "ROWS B", "DELTA", "DIFFERENCE")]
    rows += [(d["table"], cell(d["rows_a"]), cell(d["rows_b"]), delta(d["row_delta"]), STATUS_TEXT[d["status"]]) for d in diffs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip() for r in rows]
    lines.append(f"{compared} tables compared: {len(diffs)} differ")
    return "\n".join(lines) + "\n"


def _filter(doc: dict[str, Any], schemas: Sequence[str] | None, exclude: Sequence[str]) -> dict[str, Any]:
    tables = {
        n: v for n, v in doc["tables"].items() if (not schemas or n.split(".", 1)[0] in schemas) and not _selected(n, exclude)
    }
    return {**doc, "tables": tables}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="db_fingerprint.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fp = sub.add_parser("fingerprint", help="fingerprint a live database")
    fp.add_argument("--dsn", default="", help="libpq connection string; empty = libpq defaults (unix socket, peer auth)")
    fp.add_argument("--snapshot", help="read in this exported snapshot (pg_export_snapshot() of a transaction kept open)")
    fp.add_argument("--output", "-o", help="write the JSON here instead of stdout")
    fp.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help=f"how rows are hashed (default {DEFAULT_METHOD})")

    cmp_ = sub.add_parser("compare", help="compare two fingerprints; exit 0 equal, 1 different, 2 error")
    cmp_.add_argument("a", help="fingerprint JSON, pg_backup manifest.json, or dsn:<DSN>")
    cmp_.add_argument("b", help="fingerprint JSON, pg_backup manifest.json, or dsn:<DSN>")
    cmp_.add_argument("--json", action="store_true", help="print the differences as JSON instead of a table")

    for p in (fp, cmp_):
        p.add_argument("--jobs", "-j", type=int, default=1, help="parallel connections for live fingerprints (default 1)")
        p.add_argument("--schema", action="append", dest="schemas", metavar="S", help="only this schema (repeatable)")
        p.add_argument(
            "--exclude-table",
            action="append",
            dest="exclude_tables",
            default=[],
            metavar="T",
            help="skip schema.table or table (fnmatch patterns, repeatable)",
        )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.jobs < 1:
            raise FingerprintError("--jobs must be at least 1")
        if args.command == "fingerprint":
            doc = fingerprint(
                args.dsn,
                snapshot=args.snapshot,
                jobs=args.jobs,
                schemas=args.schemas,
                exclude_tables=args.exclude_tables,
                method=args.method,
            )
            text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
            if args.output:
                Path(args.output).write_text(text, encoding="utf-8")
            else:
                sys.stdout.write(text)
            return 0
        # A live side (dsn:) is taken with the method of a stored side, so that the two can be compared.
        stored = next((load(s) for s in (args.a, args.b) if not s.startswith("dsn:")), None)
        method = method_of(stored) if stored is not None else DEFAULT_METHOD
        a = _filter(load(args.a, args.jobs, method), args.schemas, args.exclude_tables)
        b = _filter(load(args.b, args.jobs, method), args.schemas, args.exclude_tables)
        diffs = compare(a, b)
        if args.json:
            sys.stdout.write(json.dumps(diffs, indent=2, sort_keys=True) + "\n")
        else:
            sys.stdout.write(format_diffs(diffs, len(set(a["tables"]) | set(b["tables"]))))
        return 1 if diffs else 0
    except FingerprintError as exc:
        sys.stderr.write(f"db_fingerprint: error: {exc}\n")
        return 2
    except psycopg.Error as exc:
        sys.stderr.write(f"db_fingerprint: database error: {str(exc).strip()}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
