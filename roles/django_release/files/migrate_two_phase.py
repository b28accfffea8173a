#!/usr/bin/env python3
"""Run a release's migrations in two phases: expand before the switch, contract after it.

For a plan of migration_plan.py with verdict two_phase (strategy deferred_statements or
migrations): every pending migration runs before the switch, but each contract statement the
plan lists in deferred_statements[*].deferred_sql is not executed; that operation's
interim_sql runs instead, and the skipped statements are recorded in a state file. After every
app host serves the new code, `contract` runs the recorded statements.

Copied to the app hosts and run like migration_plan.py: with the NEW release's virtualenv
interpreter, from the release directory (the one that holds manage.py), with
DJANGO_SETTINGS_MODULE and the release's environment set. Python 3.8+, Django 3.2-5.x,
PostgreSQL; stdlib and Django only; nothing here knows the project's app names.

    python migrate_two_phase.py expand --plan PLAN.json --state STATE.json
                                [--lock-timeout 5s] [--statement-timeout 0] [--retries 5]
                                [--backoff 1s] [--database ALIAS]
    python migrate_two_phase.py contract --state STATE.json [--lock-timeout 5s]
                                [--statement-timeout 0] [--retries 5] [--backoff 1s]
                                [--backfill TABLE.COLUMN=SQL ...] [--database ALIAS]
    python migrate_two_phase.py status --state STATE.json

Durations are PostgreSQL-style: 200ms, 5s, 2min, 1h (a bare number is milliseconds; 0 = off).

Exit codes: 0 done; 1 a migration or a deferred statement failed (or contract refused, below);
2 bad input (arguments, an unreadable plan or state file, a plan that does not match the
database: stale, maintenance verdict, unknown migrations; contract before a finished expand);
3 Django or the database cannot be set up; 4 lock timeouts exhausted. A failure prints one line
on stderr: `migrate_two_phase: error: <cause>`. Progress goes to stdout.

expand
  Runs Django's own `migrate` command (call_command: pre/post_migrate signals, content types,
  permissions as usual) to the plan's targets (no arguments when they are every app's leaf node,
  else once per target). Refuses (exit 2) a plan whose verdict is maintenance, and a database
  with a pending migration the plan does not list (the plan is stale: make it again). While it
  runs, three hooks are in place, removed afterwards:
  * MigrationExecutor.apply_migration is wrapped: per migration it sets the session's
    lock_timeout and statement_timeout (SET through set_config(); also on every new
    connection), applies the
    migration on a clone of the project state, records its duration, and on a lock timeout
    (SQLSTATE 55P03, psycopg2/psycopg LockNotAvailable), or when PostgreSQL chose it as a
    deadlock's victim (40P01: a data migration that locks a table its live writers hold rows of),
    sleeps (--backoff, doubled each time, at most 30 s) and applies it again, up to --retries times;
    then exit 4, naming the migration.
    An atomic migration rolls back as a whole, so a retry starts from a clean slate. A
    NON-ATOMIC migration (e.g. AddIndexConcurrently) commits each operation by itself: it is
    retried only if nothing of it had run yet (the lock timeout hit its first statement);
    otherwise exit 4 at once and the migration stays unrecorded with its earlier operations
    committed: fix the cause and run expand again (a timed-out CREATE INDEX CONCURRENTLY may
    leave an INVALID index behind that must be dropped first; the error then says it exists).
  * Each operation instance of the migration being applied gets its database_forwards wrapped,
    so the interceptor knows the operation index; statements the operation queues in the schema
    editor's deferred_sql (indexes, FKs run when the editor exits) keep their operation by
    identity.
  * connection.SchemaEditorClass is replaced (on this connection object only) by a subclass
    whose execute() renders each statement as Django runs it in this very run (params merged
    as collect_sql does), normalises whitespace and trailing semicolons, and compares it with
    the plan's deferred_sql of the same migration and operation (statements run when the editor
    exits: of the operation that queued them). A match is skipped and appended to the state; in
    its place the entry's interim_sql statements run (each once: an interim statement the
    operation itself also runs, like dropping a FK constraint, runs once, where it comes
    first). A multi-statement string (Django sends "SET CONSTRAINTS ... IMMEDIATE; ALTER TABLE ...
    DROP CONSTRAINT ..." as one) is split (sqlparse, as RunSQL does) and run part by part when
    one of its parts is a deferred or an interim statement. After each operation, and when the
    editor exits, every deferred statement the plan lists for it must have been seen; if not,
    the SQL differs from the plan's (the plan is stale) and the migration fails before it
    commits (exit 1; an atomic one rolls back).
  A plan with verdict rolling (nothing deferred) or strategy migrations works too: expand is
  then `migrate` with lock timeouts, retries and a record, resp. runs the contract migrations
  now, with their contract statements deferred all the same.
  The state file is rewritten (atomically: temporary file, fsync, rename) after each migration;
  a migration's deferred statements are recorded only once it has committed. A crash between a
  commit and that write loses the record of that migration's deferred statements only (the
  schema keeps the column/constraint: safe, but contract will not know it). At the end (also on
  failure) the state gets what django_migrations holds. Running expand again resumes: applied
  migrations are skipped, recorded statements kept.
  Known limit: a later statement of the same run that relies on a skipped one (e.g. re-adding a
  column with the name of the one whose DROP was deferred) fails; the migration rolls back
  (exit 1) and the release needs another strategy.

contract
  Runs the recorded deferred statements that are not done, in order, each in its own
  transaction with SET LOCAL lock_timeout/statement_timeout and the same retries (exit 4 when
  exhausted); marks each done in the state file as soon as it commits, so a re-run skips it and
  a re-run after everything is done changes nothing. A statement that fails because it was
  already applied counts as done, with that outcome: a DROP ... whose object is gone (SQLSTATE
  42703, 42P01, 42704) or a CREATE/ADD whose object exists (42P07, 42710). SET NOT NULL on a
  column that already is NOT NULL is a no-op in PostgreSQL anyway.
  Rows written by the OLD code between expand and the switch: the old code does not know the
  new columns, so a column the new code made NOT NULL through a deferred SET NOT NULL (a new FK
  the old code does not fill, say) can hold NULLs by then, and the SET NOT NULL would fail under
  an ACCESS EXCLUSIVE lock after scanning the table. Decision: contract checks first, before it
  runs ANY statement, `SELECT count(*) FROM t WHERE c IS NULL` for every pending SET NOT NULL,
  outside that lock. If rows violate one, it refuses (exit 1, nothing changed) with one line
  naming table.column, the row count, and the data migrations that filled the column before
  the switch (from the plan, recorded at expand: RunPython/RunSQL operations, not noops, in the
  pending ancestry of the migration), so the operator can fill the rows the same way and run
  contract again. Checking everything first matters: a later DROP COLUMN of the old column
  would remove what such a backfill needs. A project that knows its backfill can give it:
  `--backfill TABLE.COLUMN=SQL` runs SQL (its own transaction, same timeouts/retries) before the
  check, only while that column's SET NOT NULL is pending (so a re-run may run it again: let it
  touch the NULL rows only); the state records it and the rows it changed. A NULL written
  after the check fails the ALTER with not_null_violation: the same message, exit 1. Other
  violations the old code can cause in the window (duplicates against a deferred UNIQUE, too
  long values against a narrowed varchar) are not pre-checked: that statement fails in its own
  transaction (exit 1 naming it and PostgreSQL's error), the ones before it stay done, and a
  re-run after the data is fixed goes on from it.

status
  Prints {"state", "expand", "contract", "pending": [...], "done": [...]} as JSON (no Django).

State file (JSON, format 1)
  format 1; tool "migrate_two_phase"; created_at, updated_at (ISO 8601 UTC)
  plan        {path, sha256, verdict, strategy, targets, pending, leaf_nodes_before}
              (leaf_nodes_before: where `manage.py migrate <app> <name>` goes back to)
  database    {alias, name}
  expand      {status: "running" | "done" | "failed", runs, started_at, finished_at,
              exit_code, error, lock_timeout_ms, statement_timeout_ms, retries, backoff_s}
  migrations  [{migration, atomic, attempts, lock_timeouts, deadlocks, seconds (the successful attempt),
              seconds_total (with retries and backoff), applied_at}] in the order applied
  interim     [{migration, operation, sql, at}] interim statements run in place of deferred ones
  deferred    [{id, migration, operation, kind, table, column, sql (as Django generated it in
              this run), not_null: [{table, column}] (the SET NOT NULL columns of sql),
              filled_by: ["app.name #index (RunPython)", ...], status: "pending" | "done",
              outcome: null | "applied" | "already applied (SQLSTATE ...: ...)", attempts,
              seconds, done_at}] in the order Django would have run them
  django_migrations  ["app.name", ...] what the table holds at the end of the last expand
  contract    {status: null | "running" | "done" | "failed", runs, started_at, finished_at,
              exit_code, error, backfills: [{column, sql, rows, at}]}
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PROG = "migrate_two_phase"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SETUP = 3
EXIT_LOCK = 4
STATE_FORMAT = 1
MAX_BACKOFF_S = 30.0
LOCK_NOT_AVAILABLE = "55P03"
DEADLOCK_DETECTED = "40P01"
NOT_NULL_VIOLATION = "23502"
GONE = {"42703", "42P01", "42704"}  # undefined_column, undefined_table, undefined_object
EXISTS = {"42P07", "42710"}  # duplicate_table (relations, indexes), duplicate_object (constraints)


class Failure(Exception):
    """Ends the command with a one-line cause; `code` is the exit code."""

    code = EXIT_FAILED


class BadInput(Failure):
    code = EXIT_BAD_INPUT


class SetupError(Failure):
    code = EXIT_SETUP


class LockTimeouts(Failure):
    code = EXIT_LOCK


class MigrationFailed(Failure):
    """A migration raised (exit 1)."""


class ExitWith(Failure):
    """A failure recorded in the state already, with its own exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class PlanMismatch(Exception):
    """The SQL of this run is not the plan's: raised inside the migration, so that it rolls back."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def normalize(sql: str) -> str:
    """One line, single spaces, no trailing semicolons: the form statements are compared in."""
    text = " ".join(str(sql).split())
    while text.endswith(";"):
        text = text[:-1].rstrip()
    return text


def terminated(sql: str) -> str:
    text = str(sql).strip()
    return text if text.endswith(";") else text + ";"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h)?\s*$")
_UNIT_MS = {None: 1, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000}


def duration_ms(text: str) -> int:
    """'200ms', '5s', '2min', '1h', '0' -> milliseconds (argparse type)."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration (200ms, 5s, 2min, 1h): {text!r}")
    return round(float(m.group(1)) * _UNIT_MS[m.group(2)])


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def errors(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes (Django wraps the driver's error in its own)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def sqlstate(exc: BaseException) -> str | None:
    """SQLSTATE of a database error: psycopg2's pgcode or psycopg's sqlstate, anywhere in the chain."""
    for e in errors(exc):
        code = getattr(e, "pgcode", None) or getattr(e, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
        diag = getattr(e, "diag", None)
        code = getattr(diag, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
    return None


def is_lock_timeout(exc: BaseException) -> bool:
    return sqlstate(exc) == LOCK_NOT_AVAILABLE or any(type(e).__name__ == "LockNotAvailable" for e in errors(exc))


def is_deadlock(exc: BaseException) -> bool:
    """PostgreSQL chose this transaction as a deadlock's victim: it rolled back, a retry starts clean."""
    return sqlstate(exc) == DEADLOCK_DETECTED or any(type(e).__name__ == "DeadlockDetected" for e in errors(exc))


def backoff_delay(backoff_s: float, attempt: int) -> float:
    """Seconds to wait after the `attempt`-th (1-based) lock timeout."""
    return min(MAX_BACKOFF_S, backoff_s * (2 ** (attempt - 1)))


def key_text(key: tuple[str, str]) -> str:
    return f"{key[0]}.{key[1]}"


# --------------------------------------------------------------------------------------------
# SQL recognised here: SET NOT NULL (for the NULL check) and what "already applied" means
# --------------------------------------------------------------------------------------------

IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
QNAME = rf"{IDENT}(?:\s*\.\s*{IDENT})?"
_ALTER_TABLE = re.compile(rf"^\s*ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?({QNAME})", re.I)
_SET_NOT_NULL = re.compile(rf"\bALTER\s+(?:COLUMN\s+)?({IDENT})\s+SET\s+NOT\s+NULL\b", re.I)


def unquote(ident: str) -> str:
    ident = ident.strip()
    if ident.startswith('"') and ident.endswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def not_null_targets(sql: str) -> list[dict[str, str]]:
    """[{table, column, table_sql, column_sql}] of every `ALTER COLUMN c SET NOT NULL` in the statement."""
    table = _ALTER_TABLE.match(sql)
    if not table:
        return []
    table_sql = table.group(1)
    table_name = ".".join(unquote(p) for p in re.findall(IDENT, table_sql))
    return [
        {"table": table_name, "column": unquote(m.group(1)), "table_sql": table_sql, "column_sql": m.group(1)}
        for m in _SET_NOT_NULL.finditer(sql[table.end() :])
    ]


def already_applied(sql: str, exc: BaseException) -> str | None:
    """The outcome text when `sql` failed only because it had been applied before, else None."""
    code = sqlstate(exc)
    text = normalize(sql).upper()
    dropping = re.match(r"^DROP\b", text) or re.search(r"\bDROP\s+(?:COLUMN|CONSTRAINT)\b", text)
    creating = re.match(r"^CREATE\b", text) or re.search(r"\bADD\s+CONSTRAINT\b", text)
    if (code in GONE and dropping) or (code in EXISTS and creating):
        return f"already applied (SQLSTATE {code}: {first_line(exc)})"
    return None


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    except OSError as exc:
        raise BadInput(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise BadInput(f"the {what} {path} is not JSON: {first_line(exc)}") from None
    if not isinstance(doc, dict):
        raise BadInput(f"the {what} {path} is not a JSON object")
    return doc


def write_state(path: str, state: dict[str, Any]) -> None:
    """Atomically: a temporary file beside it, fsync, rename, fsync of the directory."""
    state["updated_at"] = now()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def new_state() -> dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "tool": PROG,
        "created_at": now(),
        "updated_at": None,
        "plan": None,
        "database": None,
        "expand": {"status": None, "runs": 0},
        "migrations": [],
        "interim": [],
        "deferred": [],
        "django_migrations": [],
        "contract": {"status": None, "runs": 0, "backfills": []},
    }


def load_state(path: str, must_exist: bool) -> dict[str, Any]:
    if not os.path.exists(path):
        if must_exist:
            raise BadInput(f"no state file {path}: run expand first")
        return new_state()
    state = read_json(path, "state file")
    if state.get("format") != STATE_FORMAT or state.get("tool") != PROG:
        raise BadInput(f"{path} is not a {PROG} state file of format {STATE_FORMAT}")
    for key in ("expand", "migrations", "interim", "deferred", "contract"):
        if key not in state:
            raise BadInput(f"the state file {path} has no {key!r}")
    return state


# --------------------------------------------------------------------------------------------
# Django
# --------------------------------------------------------------------------------------------


def setup_django(alias: str, lock_timeout_ms: int, statement_timeout_ms: int) -> Any:
    """django.setup() from the release directory; the connection, with the session timeouts set."""
    sys.path.insert(0, os.getcwd())
    try:
        import django

        django.setup()
        from django.conf import settings
        from django.db import connections
        from django.db.backends.signals import connection_created

        if alias not in settings.DATABASES:
            raise BadInput(f"--database {alias!r} is not in DATABASES")
        connection = connections[alias]
        if connection.vendor != "postgresql":
            raise SetupError(f"database {alias!r} is {connection.vendor}, not PostgreSQL")

        def on_connect(sender: Any, connection: Any, **kwargs: Any) -> None:
            if connection.alias == alias:
                set_timeouts(connection, lock_timeout_ms, statement_timeout_ms)

        connection_created.connect(on_connect, weak=False)
        connection.ensure_connection()
        set_timeouts(connection, lock_timeout_ms, statement_timeout_ms)
    except (BadInput, SetupError):
        raise
    except Exception as exc:  # settings, imports, the database: one line for the operator
        raise SetupError(f"cannot set up Django: {type(exc).__name__}: {first_line(exc)}") from None
    return connection


def set_timeouts(connection: Any, lock_timeout_ms: int, statement_timeout_ms: int, local: bool = False) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('lock_timeout', %s, %s), set_config('statement_timeout', %s, %s)",
            [str(lock_timeout_ms), local, str(statement_timeout_ms), local],
        )


def recorded_migrations(connection: Any) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT app, name FROM django_migrations ORDER BY id")
        return [f"{app}.{name}" for app, name in cursor.fetchall()]


# --------------------------------------------------------------------------------------------
# expand: the interceptor
# --------------------------------------------------------------------------------------------


class Entry:
    """One deferred_statements item of the plan, with this attempt's progress."""

    def __init__(self, item: dict[str, Any]) -> None:
        self.migration: str = item["migration"]
        self.operation: int = item["operation"]
        self.kind = item.get("kind")
        self.table = item.get("table")
        self.column = item.get("column")
        self.interim: list[str] = list(item.get("interim_sql") or [])
        self.deferred: list[str] = list(item.get("deferred_sql") or [])
        self.norm_interim = [normalize(s) for s in self.interim]
        self.norm_deferred = [normalize(s) for s in self.deferred]
        self.reset()

    def reset(self) -> None:
        self.consumed = [False] * len(self.deferred)
        self.interim_done = [False] * len(self.interim)


class Interceptor:
    """Knows the migration and operation being applied; skips the plan's deferred statements."""

    def __init__(self, entries: list[Entry], filled_by: Callable[[Entry], list[str]]) -> None:
        self.by_migration: dict[str, list[Entry]] = {}
        for entry in entries:
            self.by_migration.setdefault(entry.migration, []).append(entry)
        self.filled_by = filled_by
        self.migration: str | None = None
        self.entries: list[Entry] = []
        self.op: int | None = None
        self.owners: list[tuple[Any, int]] = []
        self.wrapped: list[tuple[Any, Any]] = []
        self.deferred_log: list[dict[str, Any]] = []
        self.interim_log: list[dict[str, Any]] = []
        self.statements_ok = 0
        self.operations_done = 0
        self.said = False

    # ---- one attempt at one migration
    def begin(self, migration: Any) -> None:
        self.migration = key_text((migration.app_label, migration.name))
        self.entries = self.by_migration.get(self.migration, [])
        for entry in self.entries:
            entry.reset()
        self.op, self.owners, self.deferred_log, self.interim_log = None, [], [], []
        self.statements_ok = self.operations_done = 0
        self.said = False
        for index, operation in enumerate(migration.operations):
            self.wrap(operation, index)

    def end(self) -> None:
        for operation, previous in self.wrapped:
            if previous is None:
                operation.__dict__.pop("database_forwards", None)
            else:
                operation.database_forwards = previous
        self.wrapped = []
        self.migration, self.entries, self.op = None, [], None

    def wrap(self, operation: Any, index: int) -> None:
        forwards = operation.database_forwards
        self.wrapped.append((operation, operation.__dict__.get("database_forwards")))

        def database_forwards(app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> Any:
            before = list(schema_editor.deferred_sql)
            self.op = index
            try:
                result = forwards(app_label, schema_editor, from_state, to_state)
            finally:
                self.op = None
            for statement in schema_editor.deferred_sql:
                if not any(statement is b for b in before):
                    self.owners.append((statement, index))
            if not schema_editor.collect_sql:
                self.after_operation(schema_editor, index)
            self.operations_done += 1
            return result

        operation.database_forwards = database_forwards

    # ---- the schema editor's statements
    def execute(self, editor: Any, sql: Any, params: Any) -> Any:
        if self.migration is None or editor.collect_sql or not self.entries:
            return self.run(editor, sql, params)
        op = self.op if self.op is not None else next((i for s, i in self.owners if s is sql), None)
        entries = [e for e in self.entries if op is None or e.operation == op]
        if not entries:
            return self.run(editor, sql, params)
        text = render(editor, sql, params)
        hit = self.take_deferred(entries, text)
        if hit is not None:
            self.defer(editor, hit, text)
            return None
        if ";" in normalize(text):
            parts = split_statements(text)
            if len(parts) > 1 and any(self.find_deferred(entries, p) or self.is_interim(entries, p) for p in parts):
                for part in parts:
                    hit = self.take_deferred(entries, part)
                    if hit is not None:
                        self.defer(editor, hit, part)
                    else:
                        self.run_or_dedupe(editor, entries, part, None, part)
                return None
        return self.run_or_dedupe(editor, entries, sql, params, text)

    def run(self, editor: Any, sql: Any, params: Any) -> Any:
        result = editor.execute_really(sql, params)
        self.statements_ok += 1
        return result

    def run_or_dedupe(self, editor: Any, entries: list[Entry], sql: Any, params: Any, text: str) -> Any:
        """An interim statement the operation runs itself runs once (it may have run in place of a deferred one)."""
        norm = normalize(text)
        for entry in entries:
            for i, interim in enumerate(entry.norm_interim):
                if interim == norm:
                    if entry.interim_done[i]:
                        return None
                    entry.interim_done[i] = True
                    result = self.run(editor, sql, params)
                    self.log_interim(entry, entry.interim[i])
                    return result
        return self.run(editor, sql, params)

    @staticmethod
    def is_interim(entries: list[Entry], text: str) -> bool:
        norm = normalize(text)
        return any(norm in entry.norm_interim for entry in entries)

    @staticmethod
    def find_deferred(entries: list[Entry], text: str) -> tuple[Entry, int] | None:
        norm = normalize(text)
        for entry in entries:
            for i, deferred in enumerate(entry.norm_deferred):
                if not entry.consumed[i] and deferred == norm:
                    return entry, i
        return None

    def take_deferred(self, entries: list[Entry], text: str) -> tuple[Entry, int] | None:
        hit = self.find_deferred(entries, text)
        if hit is not None:
            hit[0].consumed[hit[1]] = True
        return hit

    def defer(self, editor: Any, hit: tuple[Entry, int], text: str) -> None:
        entry, _ = hit
        self.run_interim(editor, entry)
        sql = terminated(text)
        self.deferred_log.append(
            {
                "migration": entry.migration,
                "operation": entry.operation,
                "kind": entry.kind,
                "table": entry.table,
                "column": entry.column,
                "sql": sql,
                "not_null": [{"table": t["table"], "column": t["column"]} for t in not_null_targets(sql)],
                "filled_by": self.filled_by(entry) if not_null_targets(sql) else [],
            }
        )
        self.say(f"deferred to contract: {entry.migration} #{entry.operation}: {sql}")

    def run_interim(self, editor: Any, entry: Entry) -> None:
        for i, statement in enumerate(entry.interim):
            if not entry.interim_done[i]:
                entry.interim_done[i] = True
                self.run(editor, statement, None)
                self.log_interim(entry, statement)

    def log_interim(self, entry: Entry, statement: str) -> None:
        self.interim_log.append(
            {"migration": entry.migration, "operation": entry.operation, "sql": terminated(statement), "at": now()}
        )
        self.say(f"interim: {entry.migration} #{entry.operation}: {terminated(statement)}")

    def say(self, message: str) -> None:
        """Progress inside a migration: Django's "Applying x..." line is still open for the first one."""
        print(("" if self.said else "\n") + "  " + message, flush=True)
        self.said = True

    # ---- checks: every statement the plan defers must have been seen
    def after_operation(self, editor: Any, index: int) -> None:
        # What the operation queued in deferred_sql runs when the editor exits (and a later operation of
        # the migration may still rename what it names): then finish() checks it.
        if any(i == index and any(s is q for q in editor.deferred_sql) for s, i in self.owners):
            return
        for entry in self.entries:
            if entry.operation != index:
                continue
            missing = [d for d, seen in zip(entry.deferred, entry.consumed) if not seen]
            if missing:
                raise PlanMismatch(
                    f"{entry.migration} #{index}: the plan defers {normalize(missing[0])!r}, which this run did not"
                    " generate: the plan is stale (make it again with migration_plan.py)"
                )
            if all(entry.consumed):
                self.run_interim(editor, entry)

    def finish(self, editor: Any) -> None:
        for entry in self.entries:
            missing = [d for d, seen in zip(entry.deferred, entry.consumed) if not seen]
            if missing:
                raise PlanMismatch(
                    f"{entry.migration} #{entry.operation}: the plan defers {normalize(missing[0])!r}, which this run"
                    " did not generate: the plan is stale (make it again with migration_plan.py)"
                )
            self.run_interim(editor, entry)


def split_statements(text: str) -> list[str]:
    """Statements of a string, by sqlparse (Django's own dependency, used by RunSQL): quotes respected."""
    import sqlparse

    return [p for p in (sqlparse.format(s, strip_comments=True).strip() for s in sqlparse.split(text)) if normalize(p)]


def render(editor: Any, sql: Any, params: Any) -> str:
    """The statement as Django sends it: params merged client-side as collect_sql/PostgreSQL do."""
    text = str(sql)
    if not params:
        return text
    try:
        compose = getattr(editor.connection.ops, "compose_sql", None)
        if compose is not None:
            return str(compose(text, params))
        return text % tuple(map(editor.quote_value, params))
    except Exception:  # a statement we cannot render simply does not match
        return text


def intercepting_editor(base: type, interceptor: Interceptor) -> type:
    """A subclass of the backend's schema editor whose statements go through the interceptor.

    Django's own __exit__ runs the editor's deferred_sql (through execute, so intercepted) and then
    leaves the migration's atomic block; the check that every planned statement was seen must run
    between the two, so the atomic block is wrapped for that one call. A statement that fails in
    deferred_sql would leave Django's atomic block open: it is rolled back here, so a retry starts clean.
    """

    class AtomicExit:
        def __init__(self, editor: Any, atomic: Any) -> None:
            self.editor, self.atomic, self.exited = editor, atomic, False

        def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> Any:
            self.exited = True
            if exc_type is None:
                try:
                    interceptor.finish(self.editor)
                except BaseException as exc:
                    self.atomic.__exit__(type(exc), exc, exc.__traceback__)
                    raise
            return self.atomic.__exit__(exc_type, exc_value, traceback)

    class TwoPhaseSchemaEditor(base):  # type: ignore[misc, valid-type]
        def execute(self, sql: Any, params: Any = ()) -> Any:
            return interceptor.execute(self, sql, params)

        def execute_really(self, sql: Any, params: Any = ()) -> Any:
            return super().execute(sql, params)

        def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> Any:
            if self.collect_sql or interceptor.migration is None:
                return super().__exit__(exc_type, exc_value, traceback)
            guard = AtomicExit(self, self.atomic) if self.atomic_migration else None
            if guard is not None:
                self.atomic = guard
            try:
                result = super().__exit__(exc_type, exc_value, traceback)
            except BaseException as exc:
                if guard is not None and not guard.exited:  # deferred_sql failed before the atomic block was left
                    guard.atomic.__exit__(type(exc), exc, exc.__traceback__)
                raise
            if guard is None and exc_type is None:
                interceptor.finish(self)
            return result

    TwoPhaseSchemaEditor.__name__ = TwoPhaseSchemaEditor.__qualname__ = f"TwoPhase{base.__name__}"
    return TwoPhaseSchemaEditor


@contextmanager
def hooks(
    connection: Any, interceptor: Interceptor, args: argparse.Namespace, state: dict[str, Any], path: str
) -> Iterator[None]:
    """Wrap MigrationExecutor.apply_migration and the connection's schema editor for the duration."""
    from django.db.migrations.executor import MigrationExecutor

    original_apply = MigrationExecutor.apply_migration
    had_editor = "SchemaEditorClass" in connection.__dict__
    previous_editor = connection.__dict__.get("SchemaEditorClass")
    connection.SchemaEditorClass = intercepting_editor(type(connection).SchemaEditorClass, interceptor)

    def apply_migration(executor: Any, project_state: Any, migration: Any, fake: bool = False, fake_initial: bool = False) -> Any:
        if fake or executor.connection.alias != connection.alias:
            return original_apply(executor, project_state, migration, fake=fake, fake_initial=fake_initial)
        name = key_text((migration.app_label, migration.name))
        atomic = bool(getattr(migration, "atomic", True))
        started = time.monotonic()
        attempt = 0
        deadlocks = 0
        while True:
            attempt += 1
            attempt_started = time.monotonic()
            interceptor.begin(migration)
            try:
                set_timeouts(executor.connection, args.lock_timeout, args.statement_timeout)
                result = original_apply(executor, project_state.clone(), migration, fake=fake, fake_initial=fake_initial)
            except Exception as exc:
                clean = atomic or (interceptor.operations_done == 0 and interceptor.statements_ok == 0)
                interceptor.end()
                print(flush=True)  # ends Django's "Applying x..." line
                deadlock = is_deadlock(exc)
                if not (deadlock or is_lock_timeout(exc)):
                    raise MigrationFailed(f"{name}: {type(exc).__name__}: {first_line(exc)}") from exc
                deadlocks += deadlock
                if attempt <= args.retries and clean:
                    delay = backoff_delay(args.backoff, attempt)
                    tries = f"attempt {attempt}/{args.retries + 1}"
                    what = (
                        f"deadlock in {name} ({tries})"
                        if deadlock
                        else f"lock timeout in {name} ({tries}, lock_timeout {args.lock_timeout}ms)"
                    )
                    print(f"  {what}: {first_line(exc)}; retrying in {delay:g}s", flush=True)
                    time.sleep(delay)
                    continue
                how = (
                    f"after {attempt} attempt(s)"
                    if clean
                    else "in a non-atomic migration after part of it had committed (not retried)"
                )
                cause = "chosen as a deadlock's victim" if deadlock else f"lock not available within {args.lock_timeout}ms"
                raise LockTimeouts(
                    f"{name}: {cause} {how}: {first_line(exc)}"
                    " (the migration is not recorded; run expand again when the lock holder is gone)"
                ) from exc
            deferred, interim = interceptor.deferred_log, interceptor.interim_log
            interceptor.end()
            break
        finished = time.monotonic()
        known = {(d["migration"], d["operation"], normalize(d["sql"])) for d in state["deferred"]}
        for item in deferred:
            if (item["migration"], item["operation"], normalize(item["sql"])) not in known:
                record = {"id": len(state["deferred"]) + 1, **item}
                record.update(status="pending", outcome=None, attempts=0, seconds=None, done_at=None)
                state["deferred"].append(record)
        state["interim"].extend(interim)
        state["migrations"].append(
            {
                "migration": name,
                "atomic": atomic,
                "attempts": attempt,
                "lock_timeouts": attempt - 1 - deadlocks,
                "deadlocks": deadlocks,
                "seconds": round(finished - attempt_started, 3),
                "seconds_total": round(finished - started, 3),
                "applied_at": now(),
            }
        )
        write_state(path, state)
        return result

    MigrationExecutor.apply_migration = apply_migration  # type: ignore[method-assign]
    try:
        yield
    finally:
        MigrationExecutor.apply_migration = original_apply  # type: ignore[method-assign]
        if had_editor:
            connection.SchemaEditorClass = previous_editor
        else:
            del connection.SchemaEditorClass


# --------------------------------------------------------------------------------------------
# expand
# --------------------------------------------------------------------------------------------


def load_plan(path: str) -> tuple[dict[str, Any], str]:
    plan = read_json(path, "plan")
    if plan.get("format") != 1:
        raise BadInput(f"{path}: not a migration_plan.py document of format 1")
    for key, kind in (("pending", list), ("targets", list), ("deferred_statements", list), ("verdict", str)):
        if not isinstance(plan.get(key), kind):
            raise BadInput(f"{path}: {key!r} is missing or not a {kind.__name__}")
    if plan["verdict"] == "maintenance":
        raise BadInput(
            f"{path}: the plan's verdict is maintenance ({'; '.join(plan.get('verdict_reasons') or [])}):"
            " the two-phase strategy does not apply"
        )
    for item in plan["deferred_statements"]:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("migration"), str)
            and isinstance(item.get("operation"), int)
            and isinstance(item.get("deferred_sql"), list)
            and isinstance(item.get("interim_sql", []), list)
        ):
            raise BadInput(f"{path}: a deferred_statements item lacks migration, operation or deferred_sql: {item!r}")
        if item["migration"] not in plan["pending"]:
            raise BadInput(f"{path}: deferred statement of {item['migration']}, which the plan does not list as pending")
    with open(path, "rb") as handle:
        sha256 = hashlib.sha256(handle.read()).hexdigest()
    return plan, sha256


def parse_key(text: str) -> tuple[str, str]:
    app, _, name = text.partition(".")
    if not app or not name:
        raise BadInput(f"not app.name: {text!r}")
    return app, name


def data_migrations(loader: Any, pending: set[tuple[str, str]], key: tuple[str, str], before_op: int) -> list[str]:
    """RunPython/RunSQL operations (not noops) in the pending ancestry of `key`: what filled new columns."""
    from django.db import migrations

    ancestry: list[tuple[str, str]] = []
    todo = [key]
    while todo:
        node = todo.pop()
        if node in ancestry or node not in pending:
            continue
        ancestry.append(node)
        todo.extend(p.key for p in loader.graph.node_map[node].parents)
    order = loader.graph.forwards_plan(key)
    found = []
    for node in sorted(ancestry, key=lambda n: (n[0] != key[0], order.index(n))):
        for index, op in enumerate(loader.graph.nodes[node].operations):
            if node == key and index >= before_op:
                break
            if isinstance(op, migrations.RunPython) and op.code is not migrations.RunPython.noop:
                found.append(f"{key_text(node)} #{index} (RunPython)")
            elif isinstance(op, migrations.RunSQL) and op.sql not in ("", [], ()):
                found.append(f"{key_text(node)} #{index} (RunSQL)")
    return found


def cmd_expand(args: argparse.Namespace) -> int:
    plan, sha256 = load_plan(args.plan)
    state = load_state(args.state, must_exist=False)
    connection = setup_django(args.database, args.lock_timeout, args.statement_timeout)
    from django.core.management import call_command
    from django.core.management.base import CommandError
    from django.db.migrations.executor import MigrationExecutor

    try:
        executor = MigrationExecutor(connection)
    except Exception as exc:
        raise SetupError(f"cannot load the migrations: {type(exc).__name__}: {first_line(exc)}") from None
    loader = executor.loader
    targets = [parse_key(t) for t in plan["targets"]]
    unknown = [key_text(t) for t in targets if t not in loader.graph.nodes]
    if unknown:
        raise BadInput(f"the plan's targets {', '.join(unknown)} are not migrations of this release: the plan is stale")
    steps = executor.migration_plan(targets)
    backwards = [key_text((m.app_label, m.name)) for m, back in steps if back]
    if backwards:
        raise BadInput(f"migrating to the plan's targets would unapply {', '.join(backwards)}: the plan is stale")
    pending_now = [key_text((m.app_label, m.name)) for m, _ in steps]
    unplanned = [p for p in pending_now if p not in plan["pending"]]
    if unplanned:
        raise BadInput(f"pending but not in the plan: {', '.join(unplanned)}: the plan is stale (make it again)")
    if pending_now and any(d["status"] == "done" for d in state["deferred"]):
        raise BadInput(f"{args.state} belongs to a cycle whose contract has run: use a new state file")
    recorded = {d["migration"] for d in state["deferred"]}
    for item in plan["deferred_statements"]:
        if item["migration"] not in pending_now and item["migration"] not in recorded:
            print(
                f"  warning: {item['migration']} is applied already without a record of its deferred statements"
                " (migrated outside this tool?): nothing to defer for it",
                flush=True,
            )

    pending_keys = {parse_key(p) for p in plan["pending"]}
    entries = [Entry(item) for item in plan["deferred_statements"] if item["migration"] in pending_now]

    def filled_by(entry: Entry) -> list[str]:
        return data_migrations(loader, pending_keys, parse_key(entry.migration), entry.operation)

    interceptor = Interceptor(entries, filled_by)
    state["plan"] = {
        "path": os.path.abspath(args.plan),
        "sha256": sha256,
        "verdict": plan["verdict"],
        "strategy": plan.get("strategy"),
        "targets": plan["targets"],
        "pending": plan["pending"],
        "leaf_nodes_before": (state["plan"] or {}).get("leaf_nodes_before") or plan.get("leaf_nodes_before"),
    }
    state["database"] = {"alias": args.database, "name": connection.settings_dict.get("NAME")}
    state["expand"].update(
        status="running",
        runs=state["expand"].get("runs", 0) + 1,
        started_at=now(),
        finished_at=None,
        exit_code=None,
        error=None,
        lock_timeout_ms=args.lock_timeout,
        statement_timeout_ms=args.statement_timeout,
        retries=args.retries,
        backoff_s=args.backoff,
    )
    write_state(args.state, state)
    print(
        f"expand: {len(pending_now)} pending migration(s), {sum(len(e.deferred) for e in entries)} statement(s) to defer"
        f" (verdict {plan['verdict']}, strategy {plan.get('strategy')})",
        flush=True,
    )
    code, error = EXIT_OK, None
    try:
        with hooks(connection, interceptor, args, state, args.state):
            if pending_now and set(targets) == set(loader.graph.leaf_nodes()):
                call_command("migrate", database=args.database, interactive=False, verbosity=1, stdout=sys.stdout)
            elif pending_now:  # the plan was made for some targets only: `migrate APP NAME` for each of them
                for app, name in targets:
                    call_command("migrate", app, name, database=args.database, interactive=False, verbosity=1, stdout=sys.stdout)
    except Failure as exc:
        code, error = exc.code, str(exc)
    except CommandError as exc:
        code, error = EXIT_FAILED, f"migrate: {first_line(exc)}"
    except Exception as exc:
        code = EXIT_LOCK if is_lock_timeout(exc) else EXIT_FAILED
        error = f"migrate: {type(exc).__name__}: {first_line(exc)}"
    try:
        state["django_migrations"] = recorded_migrations(connection)
    except Exception as exc:
        print(f"  warning: cannot read django_migrations: {first_line(exc)}", flush=True)
    state["expand"].update(status="done" if code == EXIT_OK else "failed", finished_at=now(), exit_code=code, error=error)
    write_state(args.state, state)
    if error is not None:
        raise ExitWith(code, error)
    deferred = [d for d in state["deferred"] if d["status"] != "done"]
    print(f"expand: done; {len(deferred)} statement(s) wait for contract (state: {args.state})", flush=True)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# contract
# --------------------------------------------------------------------------------------------


def in_transaction(connection: Any, args: argparse.Namespace, what: str, work: Callable[[Any], Any]) -> Any:
    """work(cursor) in its own transaction with SET LOCAL timeouts; lock timeouts retried with backoff."""
    from django.db import transaction

    attempt = 0
    while True:
        attempt += 1
        try:
            with transaction.atomic(using=connection.alias):
                set_timeouts(connection, args.lock_timeout, args.statement_timeout, local=True)
                with connection.cursor() as cursor:
                    return work(cursor), attempt
        except Exception as exc:
            deadlock = is_deadlock(exc)
            if not (deadlock or is_lock_timeout(exc)):
                raise
            cause = "chosen as a deadlock's victim" if deadlock else f"lock not available within {args.lock_timeout}ms"
            if attempt > args.retries:
                raise LockTimeouts(
                    f"{what}: {cause} after {attempt} attempt(s): {first_line(exc)} (nothing of it applied; run contract again)"
                ) from exc
            delay = backoff_delay(args.backoff, attempt)
            kind = "deadlock" if deadlock else "lock timeout"
            print(f"  {kind} ({what}, attempt {attempt}/{args.retries + 1}); retrying in {delay:g}s", flush=True)
            time.sleep(delay)


def null_refusal(item: dict[str, Any], target: dict[str, str], rows: int) -> str:
    filled = item.get("filled_by") or []
    source = (
        f"before the switch it was filled by {', '.join(filled)}: fill these rows the same way"
        if filled
        else "no data migration of the plan fills it: fill these rows"
    )
    return (
        f"{target['table']}.{target['column']} has {rows} row(s) with NULL, so the deferred"
        f" {normalize(item['sql'])!r} ({item['migration']} #{item['operation']}) would fail: rows written by the old code"
        f" between expand and the switch? {source} (or pass --backfill {target['table']}.{target['column']}=SQL),"
        " then run contract again"
    )


def parse_backfills(texts: list[str], pending: list[dict[str, Any]]) -> dict[str, str]:
    columns = {f"{t['table']}.{t['column']}" for d in pending for t in d.get("not_null") or []}
    backfills: dict[str, str] = {}
    for text in texts:
        column, sep, sql = text.partition("=")
        column = column.strip()
        if not sep or column.count(".") < 1 or not sql.strip():
            raise BadInput(f"--backfill {text!r}: expected TABLE.COLUMN=SQL")
        backfills[column] = sql.strip()
    for column in sorted(set(backfills) - columns):
        print(f"  backfill {column} ignored: no pending SET NOT NULL on it", flush=True)
    return {c: s for c, s in backfills.items() if c in columns}


def count_nulls(connection: Any, args: argparse.Namespace, target: dict[str, str]) -> int:
    query = f"SELECT count(*) FROM {target['table_sql']} WHERE {target['column_sql']} IS NULL"
    (rows,), _ = in_transaction(connection, args, f"NULL check of {target['table']}.{target['column']}", lambda c: _one(c, query))
    return int(rows)


def _one(cursor: Any, query: str) -> tuple[Any, ...]:
    cursor.execute(query)
    return tuple(cursor.fetchone())


def cmd_contract(args: argparse.Namespace) -> int:
    state = load_state(args.state, must_exist=True)
    if state["expand"].get("status") != "done":
        raise BadInput(f"expand has not completed (status {state['expand'].get('status')!r} in {args.state}): run it first")
    pending = [d for d in state["deferred"] if d.get("status") != "done"]
    backfills = parse_backfills(args.backfill or [], pending)
    if not pending:
        print(f"contract: nothing to do, all {len(state['deferred'])} deferred statement(s) are done", flush=True)
        return EXIT_OK
    connection = setup_django(args.database, args.lock_timeout, args.statement_timeout)
    contract = state["contract"]
    contract.setdefault("backfills", [])
    contract.update(status="running", runs=contract.get("runs", 0) + 1, started_at=now(), finished_at=None, exit_code=None)
    contract["error"] = None
    write_state(args.state, state)
    try:
        run_contract(connection, args, state, pending, backfills)
    except Failure as exc:
        contract.update(status="failed", finished_at=now(), exit_code=exc.code, error=str(exc))
        write_state(args.state, state)
        raise
    except Exception as exc:
        message = f"{type(exc).__name__}: {first_line(exc)}"
        contract.update(status="failed", finished_at=now(), exit_code=EXIT_FAILED, error=message)
        write_state(args.state, state)
        raise Failure(message) from exc
    contract.update(status="done", finished_at=now(), exit_code=EXIT_OK)
    write_state(args.state, state)
    print(f"contract: done, {len(pending)} statement(s) run", flush=True)
    return EXIT_OK


def run_contract(
    connection: Any, args: argparse.Namespace, state: dict[str, Any], pending: list[dict[str, Any]], backfills: dict[str, str]
) -> None:
    print(f"contract: {len(pending)} deferred statement(s) pending", flush=True)
    # 1. the project's backfills, for columns whose SET NOT NULL is still pending
    for column, sql in backfills.items():

        def backfill(cursor: Any, sql: str = sql) -> int:
            cursor.execute(sql)
            return max(cursor.rowcount, 0)

        rows, _ = in_transaction(connection, args, f"backfill of {column}", backfill)
        state["contract"]["backfills"].append({"column": column, "sql": sql, "rows": rows, "at": now()})
        write_state(args.state, state)
        print(f"  backfill {column}: {rows} row(s)", flush=True)
    # 2. every pending SET NOT NULL checked before anything runs (a later DROP may remove what a backfill needs)
    refusals = []
    for item in pending:
        for target in not_null_targets(item["sql"]):
            try:
                rows = count_nulls(connection, args, target)
            except LockTimeouts:
                raise
            except Exception as exc:
                if sqlstate(exc) in GONE:  # the column is not there (any more): the statement itself will say
                    continue
                raise
            if rows:
                refusals.append(null_refusal(item, target, rows))
    if refusals:
        raise Failure("refused, nothing changed: " + "; ".join(refusals))
    # 3. the statements, in order, one transaction each
    for item in pending:
        started = time.monotonic()

        def run(cursor: Any, sql: str = item["sql"]) -> None:
            cursor.execute(sql)

        try:
            _, attempts = in_transaction(connection, args, f"{item['migration']} #{item['operation']}", run)
            outcome = "applied"
        except LockTimeouts:
            raise
        except Exception as exc:
            if sqlstate(exc) == NOT_NULL_VIOLATION:
                targets = not_null_targets(item["sql"])
                counts = [(t, count_nulls(connection, args, t)) for t in targets]
                reasons = "; ".join(null_refusal(item, t, n) for t, n in counts if n)
                raise Failure(f"refused: {reasons or first_line(exc)}") from exc
            done = already_applied(item["sql"], exc)
            if done is None:
                raise Failure(
                    f"{item['migration']} #{item['operation']}: {normalize(item['sql'])!r} failed:"
                    f" {type(exc).__name__}: {first_line(exc)}"
                ) from exc
            attempts, outcome = 1, done
        item.update(
            status="done", outcome=outcome, attempts=attempts, seconds=round(time.monotonic() - started, 3), done_at=now()
        )
        write_state(args.state, state)
        print(f"  {outcome}: {item['migration']} #{item['operation']}: {item['sql']}", flush=True)


# --------------------------------------------------------------------------------------------
# status, arguments, main
# --------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    state = load_state(args.state, must_exist=True)
    fields = ("id", "migration", "operation", "kind", "table", "column", "sql", "outcome", "done_at")
    doc = {
        "state": os.path.abspath(args.state),
        "expand": state["expand"].get("status"),
        "contract": state["contract"].get("status"),
        "pending": [{k: d.get(k) for k in fields} for d in state["deferred"] if d.get("status") != "done"],
        "done": [{k: d.get(k) for k in fields} for d in state["deferred"] if d.get("status") == "done"],
    }
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Two-phase Django migrations: expand before the switch, contract after."
    )
    commands = parser.add_subparsers(dest="command", metavar="{expand,contract,status}")
    commands.required = True

    def timeouts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state", required=True, help="the state file (JSON), written atomically")
        p.add_argument("--lock-timeout", type=duration_ms, default=5000, metavar="DURATION", help="default 5s")
        p.add_argument("--statement-timeout", type=duration_ms, default=0, metavar="DURATION", help="default 0 (off)")
        p.add_argument("--retries", type=non_negative, default=5, metavar="N", help="retries after a lock timeout (default 5)")
        p.add_argument(
            "--backoff",
            type=lambda t: duration_ms(t) / 1000.0,
            default=1.0,
            metavar="DURATION",
            help="first wait after a lock timeout, doubled each time, at most 30s (default 1s)",
        )
        p.add_argument("--database", default="default", help="the DATABASES alias (default: default)")

    expand = commands.add_parser("expand", help="run every pending migration, deferring the plan's contract statements")
    expand.add_argument("--plan", required=True, help="migration_plan.py --json output for this release and database")
    timeouts(expand)
    contract = commands.add_parser("contract", help="run the deferred statements (after every host serves the new code)")
    timeouts(contract)
    contract.add_argument(
        "--backfill",
        action="append",
        metavar="TABLE.COLUMN=SQL",
        help="SQL that fills NULLs of a column before its deferred SET NOT NULL (repeatable)",
    )
    status = commands.add_parser("status", help="print pending and done deferred statements as JSON")
    status.add_argument("--state", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = {"expand": cmd_expand, "contract": cmd_contract, "status": cmd_status}[args.command]
    try:
        return command(args)
    except Failure as exc:
        sys.stdout.flush()
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
