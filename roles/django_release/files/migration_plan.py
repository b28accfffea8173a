#!/usr/bin/env python3
"""Analyse a release's pending Django migrations: what can run while the old code still serves.

Copied to the app hosts and run with the NEW release's virtualenv interpreter, from the release
directory (the one that holds manage.py), with DJANGO_SETTINGS_MODULE and the release's
environment set:

    python migration_plan.py [--json | --table] [--large-table-rows N] [--large-table-bytes N]
                             [--database ALIAS] [--targets APP[:NAME] ...]

--json (the default) prints one JSON document on stdout, --table a human table. --targets
analyses the plan to those nodes instead of every app's leaf node (NAME may be a unique
prefix; APP alone means that app's leaf); a target that would unapply migrations is refused.
A table is *large* when its estimated rows reach --large-table-rows (default 1000000) or its
total size reaches --large-table-bytes (default 1 GiB; 0 turns the byte test off).

It changes nothing. It reads the migration files (MigrationLoader), the recorded migrations
of the live database (MigrationExecutor's plan), collects each operation's SQL with
`connection.schema_editor(collect_sql=True)` as `manage.py sqlmigrate` does (RunPython code
and operations of unknown classes are never called), and reads the catalog (pg_class.reltuples,
pg_total_relation_size, pg_attribute, pg_proc). The session is put in READ ONLY mode first.
Only Python 3.8+ stdlib and Django 3.2-5.x; nothing here knows the project's app names.

Exit codes: 0 analysis printed (whatever the verdict); 2 bad input (arguments, unknown or
ambiguous target, a target that would unapply migrations); 3 Django, the database or the
migration files cannot be loaded (one line on stderr).

JSON document (keys)
  format                 1
  django_version, database {alias, vendor, name, server_version}
  thresholds             {large_table_rows, large_table_bytes}
  targets                ["app.name", ...] the plan's targets
  leaf_nodes_before      {app: name | "zero"} the applied leaf of every app with migrations before
                         the run: what `manage.py migrate <app> <name>` goes back to
  pending                ["app.name", ...] pending migrations in plan order
  expand                 pending migrations that can run while the old code serves (plan order;
                         a migration is expand only if it and all its pending dependencies are)
  contract               the others, in plan order
  reversible             every pending operation can be reversed (RunPython/RunSQL have a reverse
                         and Django's `reversible` holds)
  irreversible           [{migration, operation, description, reason}]
  verdict                "rolling" | "two_phase" | "maintenance"
  strategy               two_phase only: "migrations" (the contract migrations run as a whole after
                         the switch) or "deferred_statements" (a contract migration blocks one the new
                         code needs: run everything before the switch with each contract operation's
                         interim_sql instead of its SQL, and its deferred_sql after the switch)
  verdict_reasons        [text] why this verdict
  warnings               [text] risks that do not change the verdict
  blocking               [{migration, blocks: [...], operations: [index, ...]}] contract migrations that
                         expand migrations (needed by the new code) depend on, transitively
  deferred_statements    [{migration, operation, kind, table, column, not_null_now, not_null_at_removal,
                         interim_sql, deferred_sql, caveats}] every deferrable contract operation
  locking_risks          [{migration, operation, kind, table, lock, holds, rows, size_bytes, large,
                         escalates, statement, detail}]
  tables                 {table: {rows, size_bytes, rows_source}} live tables the plan touches
  problems               [text] what `migrate` itself would refuse (conflicts, inconsistent history), and
                         apps with several applied leaf nodes
  migrations             [{migration, app, name, atomic, dependencies, pending_dependencies, class,
                         phase, reversible, deferrable (contract migrations: can run as a whole after the
                         switch), deferrable_reason, blocks, blocked_by (the contract migrations it waits for),
                         operations: [{index, operation, description, class, reason, table, column,
                         rows, size_bytes, new_table, reversible, reverse_warning, lock_warning, sql, locks,
                         locking_risk, deferrable, deferral: {interim_sql, deferred_sql, caveats[, not_null_now,
                         not_null_at_removal]} | null,
                         database_operations (SeparateDatabaseAndState only)}]}]

Classes of an operation, judged against the OLD code's schema (the project state at the applied
nodes, followed through renames made in the plan): "expand" if the old code keeps working after
it, "contract" if the old code breaks on it (or it cannot be undone), "unknown" otherwise.
  expand    CreateModel; AddField nullable, with a Django 5 db_default, generated, many-to-many,
            or on a table the old code does not use; AddIndex(Concurrently), RemoveIndex(Concurrently),
            RenameIndex (the code never names indexes), AddConstraint(NotValid), ValidateConstraint,
            RemoveConstraint, AlterIndexTogether, AlterModelTableComment, CreateExtension,
            Create/RemoveCollation; AlterModelOptions, AlterModelManagers, AlterConstraint and any
            known operation that emits no SQL (state only); RunPython/RunSQL with a reverse (RunSQL
            only without destructive statements on what the old code uses); AlterField that only
            relaxes (NOT NULL -> NULL, longer varchar, wider integer/numeric, drops uniqueness or a
            FK constraint, adds an index or a db_default); RemoveField, DeleteModel, RenameField,
            RenameModel, AlterField on columns/tables created in this plan (the old code never saw
            them); SeparateDatabaseAndState by its database_operations.
  contract  RemoveField, DeleteModel of what the old code uses (deferrable); RenameField, RenameModel,
            AlterModelTable of what the old code uses (not deferrable: each code version needs its own
            name); AddField NOT NULL without a DB default on a table the old code writes (Django < 5
            adds the column with DEFAULT and drops the default; old-code INSERTs then fail; not
            deferrable: the new code needs the column); AlterField that tightens: NULL -> NOT NULL,
            shorter varchar, adds uniqueness or a FK constraint, drops a db_default (deferrable), or
            changes the type otherwise, the column name, primary key, FK target, collation (not
            deferrable); AlterUniqueTogether adding uniqueness (deferrable); AlterOrderWithRespectTo
            adding (not deferrable) or removing (deferrable) the _order column; RunPython/RunSQL
            without a reverse (not deferrable: the new code may need their effect and undoing them
            needs a restore); RunSQL that drops, renames, retypes or tightens what the old code uses.
  unknown   any operation class not listed above (subclasses included): it is not executed here
            and its database effect cannot be judged; also a known operation whose SQL could not
            be collected.
A deferrable contract operation can run after the switch: the new code does not need it. Its
`deferral` gives interim_sql (run before the switch instead of it, e.g. DROP NOT NULL so the new
code's INSERTs, which omit a column the old code still reads, succeed; DROP CONSTRAINT of a FK the
new code does not know) and deferred_sql (run after the switch, e.g. DROP COLUMN).

Locking risks, from the collected SQL (regexes over the statements, literals masked):
  rewrite  ALTER COLUMN TYPE that is not binary-coercible (checked against the live column type),
           ADD COLUMN with a volatile DEFAULT, an identity/serial or a stored generated column,
           SET TABLESPACE/LOGGED/UNLOGGED, CLUSTER, VACUUM FULL: ACCESS EXCLUSIVE for a full rewrite
  scan     SET NOT NULL (ACCESS EXCLUSIVE, full scan), CREATE INDEX without CONCURRENTLY (SHARE: writes
           wait), ADD CONSTRAINT FOREIGN KEY / CHECK without NOT VALID (validation under lock),
           ADD UNIQUE/PRIMARY KEY/EXCLUDE (index built under ACCESS EXCLUSIVE), REINDEX, LOCK TABLE
  brief    any other ACCESS EXCLUSIVE statement (DROP TABLE/COLUMN, RENAME, ...): short, but it queues
           behind running queries and everything queues behind it
  rows     UPDATE/DELETE: row locks until the migration commits
  deadlock RunPython code (its source) or RunSQL that locks a table IN SHARE or SHARE ROW EXCLUSIVE
           MODE: a warning. Those modes admit the old code's SELECT ... FOR UPDATE, so a live
           transaction can hold a row the migration then writes while it waits to write under the
           migration's lock: PostgreSQL kills one of them, maybe the request (lock EXCLUSIVE instead)
rewrite/scan risks are reported on every non-empty live table, brief/rows ones on large tables
only; a rewrite/scan risk on a large table *escalates* the verdict. Tables created earlier in
the plan are empty.

Verdict
  maintenance  if any operation is unknown, any contract operation is not deferrable (this covers
               every irreversible operation: going back then needs the backup restored, which is
               lossless only while writes are blocked), any rewrite/scan lock hits a large table,
               or `migrate` would refuse the plan (conflicting leaves, inconsistent history);
  two_phase    otherwise, if any operation is contract (all of them deferrable); strategy
               "migrations" when every contract migration is deferrable as a whole (only
               deferrable contract operations and state-only ones, and no expand migration depends
               on it), else "deferred_statements";
  rolling      otherwise: every pending operation is expand.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_SETUP = 3
PROG = "migration_plan"

CLASS_RANK = {"expand": 0, "contract": 1, "unknown": 2}

CONCURRENT_INDEX = re.compile(r"^\s*(CREATE\s+(UNIQUE\s+)?|DROP\s+)INDEX\s+CONCURRENTLY\b", re.IGNORECASE)


class BadInput(Exception):
    """The arguments cannot be analysed (exit 2)."""


class SetupError(Exception):
    """Django, the database or the migrations cannot be loaded (exit 3)."""


# --------------------------------------------------------------------------------------------
# SQL: split into statements, mask literals, recognise what locks what (no database needed)
# --------------------------------------------------------------------------------------------

IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
QNAME = rf"{IDENT}(?:\s*\.\s*{IDENT})?"
_SPECIAL = re.compile(r"[-/'\"$;]")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_$]")


def _tokens(text: str) -> Iterator[tuple[str, str]]:
    """(kind, text) with kind code | string | ident | dollar | comment | ';'."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            yield "comment", text[i:j]
            i = j
        elif c == "/" and text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            yield "comment", text[i:j]
            i = j
        elif c == "'":
            escapes = i > 0 and text[i - 1] in "eE" and (i < 2 or not _IDENT_CHAR.match(text[i - 2]))
            j = i + 1
            while j < n:
                if escapes and text[j] == "\\":
                    j += 2
                    continue
                if text[j] == "'":
                    if j + 1 < n and text[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            yield "string", text[i : j + 1]
            i = j + 1
        elif c == '"':
            j = i + 1
            while j < n:
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        j += 2
                        continue
                    break
                j += 1
            yield "ident", text[i : j + 1]
            i = j + 1
        elif c == "$" and (i == 0 or not _IDENT_CHAR.match(text[i - 1])) and _DOLLAR_TAG.match(text, i):
            tag = _DOLLAR_TAG.match(text, i).group(0)  # type: ignore[union-attr]
            end = text.find(tag, i + len(tag))
            j = n if end < 0 else end + len(tag)
            yield "dollar", text[i:j]
            i = j
        elif c == ";":
            yield ";", c
            i += 1
        else:
            m = _SPECIAL.search(text, i + 1)
            j = n if m is None else m.start()
            yield "code", text[i:j]
            i = j


class Statement:
    """One SQL statement: its text (comments removed) and a masked, one-line form for regexes."""

    def __init__(self, text: str, masked: str) -> None:
        self.text = text
        self.masked = masked


def split_sql(text: str) -> list[Statement]:
    """Split SQL into statements at top-level semicolons (quotes, dollar quotes, comments respected)."""
    statements: list[Statement] = []
    raw: list[str] = []
    masked: list[str] = []

    def flush() -> None:
        body = "".join(raw).strip()
        if body:
            statements.append(Statement(body + ";", re.sub(r"\s+", " ", "".join(masked)).strip()))
        raw.clear()
        masked.clear()

    for kind, chunk in _tokens(text):
        if kind == ";":
            flush()
        elif kind == "comment":
            raw.append(" ")
            masked.append(" ")
        elif kind in ("string", "dollar"):
            raw.append(chunk)
            masked.append("''")
        else:
            raw.append(chunk)
            masked.append(chunk)
    flush()
    return statements


def unquote(ident: str) -> str:
    ident = ident.strip()
    if ident.startswith('"') and ident.endswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def parse_qname(text: str) -> str | None:
    """'"public"."products"' -> 'public.products', '"products"' -> 'products' (None if not a name)."""
    m = re.fullmatch(rf"\s*({IDENT})(?:\s*\.\s*({IDENT}))?\s*", text)
    if not m:
        return None
    if m.group(2):
        return f"{unquote(m.group(1))}.{unquote(m.group(2))}"
    return unquote(m.group(1))


def _names(text: str) -> list[str]:
    names = []
    for part in _split_top(text, ","):
        part = re.sub(r"^\s*ONLY\s+", "", part, flags=re.I).strip().rstrip("*").strip()
        name = parse_qname(part)
        if name:
            names.append(name)
    return names


def _split_top(text: str, sep: str) -> list[str]:
    """Split at `sep` outside parentheses (literals are already masked)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


_F = re.I | re.S
RE_CREATE_INDEX = re.compile(
    rf"^CREATE\s+(UNIQUE\s+)?INDEX\s+(CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(?:{QNAME}\s+)?ON\s+(?:ONLY\s+)?({QNAME})", _F
)
RE_CREATE_TABLE = re.compile(
    rf"^CREATE\s+(?:(?:GLOBAL\s+|LOCAL\s+)?(TEMPORARY|TEMP)\s+|UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?({QNAME})", _F
)
RE_ALTER_TABLE = re.compile(rf"^ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?({QNAME})\s*\*?\s+(.*)$", _F)
RE_DROP_TABLE = re.compile(r"^DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?(.+?)(?:\s+(?:CASCADE|RESTRICT))?$", _F)
RE_DROP_INDEX = re.compile(r"^DROP\s+INDEX\s+(CONCURRENTLY\s+)?(?:IF\s+EXISTS\s+)?(.+?)(?:\s+(?:CASCADE|RESTRICT))?$", _F)
RE_TRUNCATE = re.compile(
    r"^TRUNCATE\s+(?:TABLE\s+)?(.+?)(?:\s+(?:RESTART|CONTINUE)\s+IDENTITY)?(?:\s+(?:CASCADE|RESTRICT))?$", _F
)
RE_LOCK = re.compile(r"^LOCK\s+(?:TABLE\s+)?(.+?)(?:\s+IN\s+([A-Z ]+?)\s+MODE)?(?:\s+NOWAIT)?$", _F)
RE_UPDATE = re.compile(rf"^UPDATE\s+(?:ONLY\s+)?({QNAME})", _F)
RE_DELETE = re.compile(rf"^DELETE\s+FROM\s+(?:ONLY\s+)?({QNAME})", _F)
RE_REINDEX = re.compile(rf"^REINDEX\s+(?:\([^)]*\)\s+)?(INDEX|TABLE)\s+(CONCURRENTLY\s+)?({QNAME})", _F)
RE_CLUSTER = re.compile(rf"^CLUSTER\s+(?:VERBOSE\s+)?({QNAME})", _F)
RE_VACUUM_FULL = re.compile(rf"^VACUUM\s+(?:\([^)]*\bFULL\b[^)]*\)|FULL)\s+(?:\w+\s+)*?({QNAME})\s*$", _F)

A_ADD_CONSTRAINT = re.compile(
    rf"^ADD\s+(?:CONSTRAINT\s+({IDENT})\s+)?(FOREIGN\s+KEY|CHECK|UNIQUE|PRIMARY\s+KEY|EXCLUDE)\b(.*)$", _F
)
A_ADD_COLUMN = re.compile(rf"^ADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?({IDENT})\s+(.*)$", _F)
A_ALTER_TYPE = re.compile(rf"^ALTER\s+(?:COLUMN\s+)?({IDENT})\s+(?:SET\s+DATA\s+)?TYPE\s+(.*)$", _F)
A_SET_NOT_NULL = re.compile(rf"^ALTER\s+(?:COLUMN\s+)?({IDENT})\s+SET\s+NOT\s+NULL$", _F)
A_DROP_NOT_NULL = re.compile(rf"^ALTER\s+(?:COLUMN\s+)?({IDENT})\s+DROP\s+NOT\s+NULL$", _F)
A_DROP_CONSTRAINT = re.compile(r"^DROP\s+CONSTRAINT\b", _F)
A_DROP_COLUMN = re.compile(rf"^DROP\s+(?:COLUMN\s+)?(?:IF\s+EXISTS\s+)?({IDENT})", _F)
A_RENAME_TO = re.compile(rf"^RENAME\s+TO\s+({IDENT})$", _F)
A_RENAME_CONSTRAINT = re.compile(r"^RENAME\s+CONSTRAINT\b", _F)
A_RENAME_COLUMN = re.compile(rf"^RENAME\s+(?:COLUMN\s+)?({IDENT})\s+TO\s+({IDENT})$", _F)
A_VALIDATE = re.compile(r"^VALIDATE\s+CONSTRAINT\b", _F)
A_REWRITE = re.compile(r"^SET\s+(LOGGED|UNLOGGED|TABLESPACE|WITHOUT\s+OIDS|ACCESS\s+METHOD)\b", _F)
A_SHARE_UPDATE = re.compile(
    rf"^(?:SET\s+STATISTICS|ALTER\s+(?:COLUMN\s+)?{IDENT}\s+SET\s+STATISTICS|SET\s*\(|RESET\s*\(|CLUSTER\s+ON|"
    rf"SET\s+WITHOUT\s+CLUSTER|ALTER\s+CONSTRAINT)",
    _F,
)
A_TRIGGER = re.compile(r"^(?:ENABLE|DISABLE)\s+(?:ALWAYS\s+|REPLICA\s+)?TRIGGER\b", _F)
_DEFAULT = re.compile(
    r"\bDEFAULT\s+(.+?)(?=\s+(?:NOT\s+NULL|NULL|CONSTRAINT|CHECK|UNIQUE|PRIMARY\s+KEY|REFERENCES|GENERATED|COLLATE|"
    r"DEFERRABLE|NOT\s+DEFERRABLE|INITIALLY)\b|$)",
    _F,
)
_FUNC_CALL = re.compile(rf"({IDENT})\s*\(", _F)
_NOT_CALLS = {"and", "or", "not", "in", "is", "array", "row", "values", "case", "when", "then", "else", "cast", "any", "all"}


def default_functions(expr: str) -> list[str]:
    """Function names called in a DEFAULT expression (lower-cased unless quoted)."""
    found = []
    for m in _FUNC_CALL.finditer(expr):
        name = unquote(m.group(1).split(".")[-1])
        if name.lower() not in _NOT_CALLS:
            found.append(name)
    return found


def parse_statement(masked: str) -> list[dict[str, Any]]:
    """What one statement does, as actions: [{'action': ..., 'table': ..., ...}] (empty: nothing of interest)."""
    s = masked.strip().rstrip(";").strip()
    m = RE_CREATE_INDEX.match(s)
    if m:
        return [{"action": "create_index", "table": parse_qname(m.group(3)), "concurrently": bool(m.group(2))}]
    m = RE_CREATE_TABLE.match(s)
    if m:
        return [{"action": "create_table", "table": parse_qname(m.group(2)), "temporary": bool(m.group(1))}]
    m = RE_ALTER_TABLE.match(s)
    if m:
        table = parse_qname(m.group(1))
        return [dict(_alter_action(a), table=table) for a in _split_top(m.group(2), ",")]
    m = RE_DROP_TABLE.match(s)
    if m:
        return [{"action": "drop_table", "table": t} for t in _names(m.group(1))]
    m = RE_DROP_INDEX.match(s)
    if m:
        return [{"action": "drop_index", "index": i, "concurrently": bool(m.group(1))} for i in _names(m.group(2))]
    m = RE_TRUNCATE.match(s)
    if m:
        return [{"action": "truncate", "table": t} for t in _names(m.group(1))]
    m = RE_LOCK.match(s)
    if m:
        mode = " ".join((m.group(2) or "ACCESS EXCLUSIVE").upper().split())
        return [{"action": "lock", "table": t, "mode": mode} for t in _names(m.group(1))]
    m = RE_UPDATE.match(s)
    if m:
        return [
            {"action": "dml", "verb": "UPDATE", "table": parse_qname(m.group(1)), "where": bool(re.search(r"\bWHERE\b", s, _F))}
        ]
    m = RE_DELETE.match(s)
    if m:
        return [
            {"action": "dml", "verb": "DELETE", "table": parse_qname(m.group(1)), "where": bool(re.search(r"\bWHERE\b", s, _F))}
        ]
    m = RE_REINDEX.match(s)
    if m and not m.group(2):
        key = "table" if m.group(1).upper() == "TABLE" else "index"
        return [{"action": "reindex", key: parse_qname(m.group(3))}]
    m = RE_CLUSTER.match(s) or RE_VACUUM_FULL.match(s)
    if m:
        return [{"action": "rewrite_table", "table": parse_qname(m.group(1)), "what": s.split()[0].upper()}]
    return []


def _alter_action(a: str) -> dict[str, Any]:
    m = A_ADD_CONSTRAINT.match(a)
    if m:
        kind = " ".join(m.group(2).upper().split())
        rest = m.group(3)
        action: dict[str, Any] = {
            "action": "add_constraint",
            "kind": kind,
            "not_valid": bool(re.search(r"\bNOT\s+VALID\s*$", rest, _F)),
            "using_index": bool(re.search(r"\bUSING\s+INDEX\b", rest, _F)),
        }
        ref = re.search(rf"\bREFERENCES\s+({QNAME})", rest, _F)
        if ref:
            action["references"] = parse_qname(ref.group(1))
        return action
    if re.match(r"^ADD\b", a, _F) and not re.match(r"^ADD\s+(?:CONSTRAINT|FOREIGN|CHECK|UNIQUE|PRIMARY|EXCLUDE)\b", a, _F):
        m = A_ADD_COLUMN.match(a)
        if m:
            return _add_column(unquote(m.group(1)), m.group(2))
    m = A_SET_NOT_NULL.match(a)
    if m:
        return {"action": "set_not_null", "column": unquote(m.group(1))}
    m = A_DROP_NOT_NULL.match(a)
    if m:
        return {"action": "drop_not_null", "column": unquote(m.group(1))}
    m = A_ALTER_TYPE.match(a)
    if m:
        column = unquote(m.group(1))
        t = re.match(rf"^(.+?)(?:\s+COLLATE\s+({QNAME}))?(?:\s+USING\s+(.+))?$", m.group(2), _F)
        new_type, using = (t.group(1).strip(), t.group(3)) if t else (m.group(2).strip(), None)
        if using:
            cast = re.fullmatch(rf"\s*\(?\s*({IDENT})\s*\)?\s*::\s*(.+?)\s*", using, _F)
            if cast and unquote(cast.group(1)) == column and normalize_type(cast.group(2)) == normalize_type(new_type):
                using = None  # a plain cast of the column: the same as no USING
        return {"action": "alter_type", "column": column, "type": new_type, "using": using}
    if A_SHARE_UPDATE.match(a) or A_VALIDATE.match(a):
        return {"action": "alter_other", "lock": "SHARE UPDATE EXCLUSIVE"}
    if A_TRIGGER.match(a):
        return {"action": "alter_other", "lock": "SHARE ROW EXCLUSIVE"}
    if A_DROP_CONSTRAINT.match(a):
        return {"action": "drop_constraint"}
    m = A_DROP_COLUMN.match(a)
    if m and re.match(r"^DROP\b", a, _F):
        return {"action": "drop_column", "column": unquote(m.group(1))}
    m = A_RENAME_TO.match(a)
    if m:
        return {"action": "rename_table", "new": unquote(m.group(1))}
    if A_RENAME_CONSTRAINT.match(a):
        return {"action": "alter_other", "lock": "ACCESS EXCLUSIVE"}
    m = A_RENAME_COLUMN.match(a)
    if m:
        return {"action": "rename_column", "column": unquote(m.group(1)), "new": unquote(m.group(2))}
    m = A_REWRITE.match(a)
    if m:
        return {"action": "rewrite_table", "what": "SET " + " ".join(m.group(1).upper().split())}
    return {"action": "alter_other", "lock": "ACCESS EXCLUSIVE"}


def _add_column(column: str, definition: str) -> dict[str, Any]:
    type_text = definition.split()[0].lower() if definition.split() else ""
    default = _DEFAULT.search(definition)
    return {
        "action": "add_column",
        "column": column,
        "not_null": bool(re.search(r"\bNOT\s+NULL\b", definition, _F)),
        "default": default.group(1).strip() if default else None,
        "identity": bool(re.search(r"\bGENERATED\s+(?:ALWAYS|BY\s+DEFAULT)\s+AS\s+IDENTITY\b", definition, _F))
        or bool(re.match(r"^(?:small|big)?serial[248]?$", type_text)),
        "generated_stored": bool(re.search(r"\bGENERATED\s+ALWAYS\s+AS\s*\(.*\)\s*STORED\b", definition, _F)),
        "inline_index": bool(re.search(r"\b(?:UNIQUE|PRIMARY\s+KEY)\b", definition, _F)),
        "inline_check": bool(re.search(r"\bCHECK\s*\(", definition, _F)),
    }


_TYPE_ALIASES = {
    "character varying": "varchar",
    "int": "integer",
    "int4": "integer",
    "int8": "bigint",
    "int2": "smallint",
    "serial": "integer",
    "serial4": "integer",
    "bigserial": "bigint",
    "serial8": "bigint",
    "smallserial": "smallint",
    "serial2": "smallint",
    "decimal": "numeric",
    "bool": "boolean",
    "float8": "double precision",
    "float4": "real",
    "timestamptz": "timestamp with time zone",
    "timestamp": "timestamp without time zone",
    "timetz": "time with time zone",
    "time": "time without time zone",
    "character": "char",
    "bpchar": "char",
    "varbit": "bit varying",
}
_INT_WIDTH = {"smallint": 2, "integer": 4, "bigint": 8}


def normalize_type(text: str) -> tuple[str, tuple[int, ...], bool]:
    """('varchar', (100,), False) from 'character varying(100)'; unknown shapes keep their text."""
    t = " ".join(text.strip().strip('"').lower().split())
    array = t.endswith("[]")
    t = t[:-2].strip() if array else t
    m = re.fullmatch(r"([a-z_][a-z0-9_ ]*?)\s*(?:\(\s*([0-9][0-9 ,]*)\s*\))?", t)
    if not m:
        return t, (), array
    base = _TYPE_ALIASES.get(m.group(1).strip(), m.group(1).strip())
    mods = tuple(int(x) for x in m.group(2).replace(" ", "").split(",")) if m.group(2) else ()
    return base, mods, array


def type_change(old: str, new: str) -> str:
    """'same', 'widen' (every old value fits), 'narrow' (same kind, smaller) or 'other'."""
    (ob, om, oa), (nb, nm, na) = normalize_type(old), normalize_type(new)
    if (ob, om, oa) == (nb, nm, na):
        return "same"
    if oa != na:
        return "other"
    if ob == nb and ob in ("varchar", "bit varying"):
        if not nm:
            return "widen"
        if not om:
            return "narrow"
        return "widen" if nm[0] >= om[0] else "narrow"
    if ob == "varchar" and nb == "text":
        return "widen"
    if ob == "text" and nb == "varchar":
        return "widen" if not nm else "narrow"
    if ob in _INT_WIDTH and nb in _INT_WIDTH:
        return "widen" if _INT_WIDTH[nb] > _INT_WIDTH[ob] else "narrow"
    if ob == nb == "numeric":
        if not nm:
            return "widen"
        if not om or len(om) != len(nm) or (len(om) == 2 and om[1] != nm[1]):
            return "other"
        return "widen" if nm[0] >= om[0] else "narrow"
    return "other"


def type_change_rewrites(old: str, new: str) -> bool:
    """Whether PostgreSQL rewrites the table for ALTER COLUMN TYPE old -> new (binary-coercible ones do not)."""
    (ob, om, oa), (nb, nm, na) = normalize_type(old), normalize_type(new)
    if (ob, om, oa) == (nb, nm, na):
        return False
    if oa != na:
        return True
    if ob in ("varchar", "text") and nb in ("varchar", "text"):
        if nb == "text" or not nm:
            return False  # to text or unbounded varchar: binary-coercible
        if ob == "text" or not om:
            return True  # to a bounded varchar from an unbounded type: every value is checked, the table rewritten
        return nm[0] < om[0]
    if ob == nb == "numeric":
        if not nm:
            return False
        return not (om and len(om) == len(nm) and nm[0] >= om[0] and om[1:] == nm[1:])
    if ob == nb == "bit varying":
        return bool(nm) and (not om or nm[0] < om[0])
    return not (ob == "cidr" and nb == "inet")


# --------------------------------------------------------------------------------------------
# The live catalog (reads only)
# --------------------------------------------------------------------------------------------


def regclass_text(table: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in table.split(".", 1))


class Catalog:
    """Cached reads of pg_class / pg_attribute / pg_proc through the Django connection."""

    def __init__(self, connection: Any, large_rows: int, large_bytes: int) -> None:
        self.connection = connection
        self.large_rows = large_rows
        self.large_bytes = large_bytes
        self.server_version = int(getattr(connection, "pg_version", 0) or 0)
        self._tables: dict[str, dict[str, Any]] = {}
        self._columns: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._volatile: dict[str, bool] = {}
        self._index_tables: dict[str, str | None] = {}
        self.aliases: dict[str, str] = {}  # a name given in the plan -> the live table it renames
        self.created: set[str] = set()  # tables created by the plan

    def _fetch(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def live_name(self, table: str) -> str:
        seen = set()
        while table in self.aliases and table not in seen:
            seen.add(table)
            table = self.aliases[table]
        return table

    def table(self, name: str) -> dict[str, Any]:
        """{exists, new, rows, heap_bytes, size_bytes, rows_source, large, non_empty} of the live table a name means."""
        if name in self.created:
            return {
                "exists": False,
                "new": True,
                "rows": 0,
                "heap_bytes": 0,
                "size_bytes": 0,
                "rows_source": "new",
                "large": False,
                "non_empty": False,
            }
        live = self.live_name(name)
        if live not in self._tables:
            self._tables[live] = self._read_table(live)
        return self._tables[live]

    def _read_table(self, live: str) -> dict[str, Any]:
        rows = self._fetch(
            "SELECT c.oid::regclass::text, c.relkind, c.reltuples, pg_relation_size(c.oid), pg_total_relation_size(c.oid)"
            " FROM pg_class c WHERE c.oid = to_regclass(%s)",
            [regclass_text(live)],
        )
        if not rows:
            return {
                "exists": False,
                "new": True,
                "rows": 0,
                "heap_bytes": 0,
                "size_bytes": 0,
                "rows_source": "absent",
                "large": False,
                "non_empty": False,
            }
        regclass, relkind, reltuples, heap, total = rows[0]
        if relkind == "p" and self.server_version >= 120000:
            (reltuples, heap, total) = self._fetch(
                "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0), coalesce(sum(pg_relation_size(t.relid)), 0),"
                " coalesce(sum(pg_total_relation_size(t.relid)), 0)"
                " FROM pg_partition_tree(to_regclass(%s)) t JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf",
                [regclass_text(live)],
            )[0]
        source = "reltuples"
        estimate = int(max(float(reltuples), 0))
        if float(reltuples) <= 0 and int(heap) > 0:
            # Never analysed (-1, or 0 before PostgreSQL 14): count, but never beyond the threshold.
            (estimate,) = self._fetch(f"SELECT count(*) FROM (SELECT 1 FROM {regclass} LIMIT %s) AS s", [self.large_rows + 1])[0]
            source = "counted (never analysed), capped at the threshold"
        info = {
            "exists": True,
            "new": False,
            "rows": int(estimate),
            "heap_bytes": int(heap),
            "size_bytes": int(total),
            "rows_source": source,
        }
        info["large"] = info["rows"] >= self.large_rows or (self.large_bytes > 0 and info["size_bytes"] >= self.large_bytes)
        info["non_empty"] = info["rows"] > 0 or info["heap_bytes"] > 0
        return info

    def column(self, table: str, column: str) -> dict[str, Any] | None:
        """{not_null, has_default, type} of a live column (None if the table or column is not live)."""
        if table in self.created:
            return None
        key = (self.live_name(table), column)
        if key not in self._columns:
            rows = self._fetch(
                "SELECT a.attnotnull, a.atthasdef, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
                " WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped",
                [regclass_text(key[0]), column],
            )
            self._columns[key] = {"not_null": rows[0][0], "has_default": rows[0][1], "type": rows[0][2]} if rows else None
        return self._columns[key]

    def not_null_proven(self, table: str, column: str) -> bool:
        """A validated CHECK (column IS NOT NULL) lets PostgreSQL 12+ skip the SET NOT NULL scan."""
        if self.server_version < 120000 or table in self.created:
            return False
        rows = self._fetch(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype = 'c'"
            " AND convalidated",
            [regclass_text(self.live_name(table))],
        )
        pattern = re.compile(rf'\(?\s*"?{re.escape(column)}"?\s+IS\s+NOT\s+NULL\s*\)?', re.I)
        return any(pattern.search(r[0]) for r in rows)

    def volatile(self, function: str) -> bool:
        """Whether a function is VOLATILE (unknown functions count as volatile)."""
        if function not in self._volatile:
            rows = self._fetch("SELECT bool_or(provolatile = 'v'), count(*) FROM pg_proc WHERE proname = %s", [function])
            self._volatile[function] = True if not rows or not rows[0][1] else bool(rows[0][0])
        return self._volatile[function]

    def index_table(self, index: str) -> str | None:
        if index not in self._index_tables:
            rows = self._fetch(
                "SELECT n.nspname, c.relname, n.nspname = ANY (current_schemas(false)) FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE i.indexrelid = to_regclass(%s)",
                [regclass_text(index)],
            )
            self._index_tables[index] = (rows[0][1] if rows[0][2] else f"{rows[0][0]}.{rows[0][1]}") if rows else None
        return self._index_tables[index]

    def tables_seen(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"rows": info["rows"], "size_bytes": info["size_bytes"], "rows_source": info["rows_source"]}
            for name, info in sorted(self._tables.items())
            if info["exists"]
        }


def _risk(kind: str, table: str, lock: str, holds: str, statement: str, detail: str, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": kind,
        "table": table,
        "lock": lock,
        "holds": holds,
        "rows": info["rows"],
        "size_bytes": info["size_bytes"],
        "large": info["large"],
        "escalates": holds in ("rewrite", "scan") and info["large"],
        "statement": statement,
        "detail": detail,
    }


def assess_statement(stmt: Statement, catalog: Catalog) -> list[dict[str, Any]]:
    """Locking risks of one statement against the live tables (and record the plan's creates/renames)."""
    risks: list[dict[str, Any]] = []

    def add(kind: str, table: str | None, lock: str, holds: str, detail: str) -> None:
        if not table:
            return
        info = catalog.table(table)
        if not info["exists"]:
            return
        if (holds in ("rewrite", "scan") and info["non_empty"]) or info["large"]:
            risks.append(_risk(kind, table, lock, holds, stmt.text, detail, info))

    for a in parse_statement(stmt.masked):
        action, table = a["action"], a.get("table")
        if action == "create_table":
            if not a["temporary"] and table:
                catalog.created.add(table)
        elif action == "create_index" and not a["concurrently"]:
            add(
                "index_build", table, "SHARE", "scan", "CREATE INDEX without CONCURRENTLY: writes to the table wait for the build"
            )
        elif action == "add_column":
            add_column_risks(a, table, catalog, add)
        elif action == "alter_type":
            live = catalog.column(table, a["column"]) if table else None
            if a["using"] or live is None or type_change_rewrites(live["type"], a["type"]):
                was = live["type"] if live else "a column created in this plan"
                add(
                    "rewrite",
                    table,
                    "ACCESS EXCLUSIVE",
                    "rewrite",
                    f"ALTER COLUMN {a['column']} TYPE {a['type']} (from {was}): the table is rewritten under ACCESS EXCLUSIVE",
                )
            else:
                add("access_exclusive", table, "ACCESS EXCLUSIVE", "brief", f"ALTER COLUMN {a['column']} TYPE (no rewrite)")
        elif action == "set_not_null":
            if table and catalog.not_null_proven(table, a["column"]):
                add("access_exclusive", table, "ACCESS EXCLUSIVE", "brief", "SET NOT NULL proven by a valid CHECK constraint")
            else:
                add(
                    "set_not_null",
                    table,
                    "ACCESS EXCLUSIVE",
                    "scan",
                    f"SET NOT NULL on {a['column']}: full scan under ACCESS EXCLUSIVE (reads and writes wait)",
                )
        elif action == "add_constraint":
            kind = a["kind"]
            if kind == "FOREIGN KEY":
                if not a["not_valid"]:
                    add(
                        "constraint_validation",
                        table,
                        "SHARE ROW EXCLUSIVE",
                        "scan",
                        f"FOREIGN KEY without NOT VALID: every row is checked against {a.get('references')} while writes to"
                        " both tables wait",
                    )
            elif kind == "CHECK":
                if not a["not_valid"]:
                    add(
                        "constraint_validation",
                        table,
                        "ACCESS EXCLUSIVE",
                        "scan",
                        "CHECK without NOT VALID: every row is checked under ACCESS EXCLUSIVE",
                    )
            elif a["using_index"]:
                add("access_exclusive", table, "ACCESS EXCLUSIVE", "brief", f"{kind} USING INDEX")
            else:
                add(
                    "index_build",
                    table,
                    "ACCESS EXCLUSIVE",
                    "scan",
                    f"ADD {kind}: its index is built under ACCESS EXCLUSIVE (reads and writes wait)",
                )
        elif action == "rename_table":
            if table:
                catalog.aliases[a["new"]] = catalog.live_name(table)
                if table in catalog.created:
                    catalog.created.add(a["new"])
            add("access_exclusive", table, "ACCESS EXCLUSIVE", "brief", "RENAME")
        elif action == "rewrite_table":
            add("rewrite", table, "ACCESS EXCLUSIVE", "rewrite", f"{a['what']}: the table is rewritten under ACCESS EXCLUSIVE")
        elif action == "reindex":
            target = table or catalog.index_table(a["index"])
            add("index_build", target, "SHARE", "scan", "REINDEX without CONCURRENTLY: writes wait for the rebuild")
        elif action == "lock":
            if a["mode"] not in ("ACCESS SHARE", "ROW SHARE", "ROW EXCLUSIVE", "SHARE UPDATE EXCLUSIVE"):
                add(
                    "explicit_lock", table, a["mode"], "scan", f"LOCK TABLE IN {a['mode']} MODE: held until the migration commits"
                )
        elif action == "dml":
            add(
                "bulk_dml",
                table,
                "ROW EXCLUSIVE",
                "rows",
                f"{a['verb']}{' with WHERE' if a['where'] else ' of every row'}: row locks held until the migration commits",
            )
        elif action == "drop_index":
            if not a["concurrently"]:
                add("access_exclusive", catalog.index_table(a["index"]), "ACCESS EXCLUSIVE", "brief", "DROP INDEX")
        elif action in ("drop_table", "truncate", "drop_column", "drop_constraint", "drop_not_null", "rename_column"):
            add("access_exclusive", table, "ACCESS EXCLUSIVE", "brief", action.replace("_", " ").upper())
        elif action == "alter_other" and a["lock"] == "ACCESS EXCLUSIVE":
            add("access_exclusive", table, "ACCESS EXCLUSIVE", "brief", "ALTER TABLE")
    return risks


def add_column_risks(a: dict[str, Any], table: str | None, catalog: Catalog, add: Any) -> None:
    default = a["default"]
    if a["identity"]:
        add("rewrite", table, "ACCESS EXCLUSIVE", "rewrite", f"ADD COLUMN {a['column']} identity/serial: every row is rewritten")
    elif a["generated_stored"]:
        add(
            "rewrite",
            table,
            "ACCESS EXCLUSIVE",
            "rewrite",
            f"ADD COLUMN {a['column']} GENERATED ... STORED: every row is rewritten",
        )
    elif default and default.upper() != "NULL":
        volatile = [f for f in default_functions(default) if catalog.volatile(f)]
        if volatile:
            add(
                "rewrite",
                table,
                "ACCESS EXCLUSIVE",
                "rewrite",
                f"ADD COLUMN {a['column']} DEFAULT {default}: volatile ({', '.join(volatile)}), every row is rewritten",
            )
        elif catalog.server_version and catalog.server_version < 110000:
            add(
                "rewrite", table, "ACCESS EXCLUSIVE", "rewrite", f"ADD COLUMN {a['column']} DEFAULT before PostgreSQL 11 rewrites"
            )
        else:
            add("access_exclusive", table, "ACCESS EXCLUSIVE", "brief", f"ADD COLUMN {a['column']}")
    elif a["inline_index"]:
        add("index_build", table, "ACCESS EXCLUSIVE", "scan", f"ADD COLUMN {a['column']} UNIQUE/PRIMARY KEY builds an index")
    else:
        add("access_exclusive", table, "ACCESS EXCLUSIVE", "brief", f"ADD COLUMN {a['column']}")


# --------------------------------------------------------------------------------------------
# Django: the plan, the states, each operation's SQL and class
# --------------------------------------------------------------------------------------------

KNOWN_CORE = (
    "CreateModel",
    "DeleteModel",
    "RenameModel",
    "AlterModelTable",
    "AlterModelTableComment",
    "AlterUniqueTogether",
    "AlterIndexTogether",
    "AlterOrderWithRespectTo",
    "AlterModelOptions",
    "AlterModelManagers",
    "AddIndex",
    "RemoveIndex",
    "RenameIndex",
    "AddConstraint",
    "RemoveConstraint",
    "AlterConstraint",
    "AddField",
    "RemoveField",
    "AlterField",
    "RenameField",
    "SeparateDatabaseAndState",
    "RunSQL",
    "RunPython",
)
KNOWN_POSTGRES = (
    "CreateExtension",
    "BloomExtension",
    "BtreeGinExtension",
    "BtreeGistExtension",
    "CITextExtension",
    "CryptoExtension",
    "HStoreExtension",
    "TrigramExtension",
    "UnaccentExtension",
    "AddIndexConcurrently",
    "RemoveIndexConcurrently",
    "CreateCollation",
    "RemoveCollation",
    "AddConstraintNotValid",
    "ValidateConstraint",
)
EXTENSIONS = {n for n in KNOWN_POSTGRES if n.endswith("Extension")}
STATE_ONLY = {"AlterModelOptions", "AlterModelManagers", "AlterConstraint"}
MODEL_NAMED = {
    "CreateModel",
    "DeleteModel",
    "AlterModelTable",
    "AlterModelTableComment",
    "AlterUniqueTogether",
    "AlterIndexTogether",
    "AlterOrderWithRespectTo",
    "AlterModelOptions",
    "AlterModelManagers",
}
ALWAYS_EXPAND = {
    "CreateModel": "creates a table the old code does not use",
    "AddIndex": "adds an index: the old code does not notice",
    "AddIndexConcurrently": "adds an index concurrently: the old code does not notice",
    "RemoveIndex": "drops an index: the old code keeps working (its queries may slow down)",
    "RemoveIndexConcurrently": "drops an index concurrently: the old code keeps working (its queries may slow down)",
    "RenameIndex": "renames an index: the code never names indexes",
    "AddConstraint": "adds a constraint the old code's writes must already respect",
    "AddConstraintNotValid": "adds a NOT VALID constraint the old code's new writes must respect",
    "ValidateConstraint": "validates a constraint (SHARE UPDATE EXCLUSIVE: reads and writes go on)",
    "RemoveConstraint": "drops a constraint: only relaxes",
    "AlterIndexTogether": "changes index_together indexes: the old code does not notice",
    "AlterModelTableComment": "changes a table comment",
    "CreateCollation": "creates a collation",
    "RemoveCollation": "drops a collation (no column the old code uses may still need it)",
}


def known_operation_types() -> dict[type, str]:
    from django.db.migrations import operations as core

    known = {getattr(core, n): n for n in KNOWN_CORE if hasattr(core, n)}
    try:
        from django.contrib.postgres import operations as pg
    except Exception:  # no psycopg: no postgres operations can occur either
        return known
    known.update({getattr(pg, n): n for n in KNOWN_POSTGRES if hasattr(pg, n)})
    return known


def key_text(key: tuple[str, str]) -> str:
    return f"{key[0]}.{key[1]}"


class OpContext:
    """One operation being judged: its models before/after, its table, its SQL."""

    def __init__(
        self,
        app_label: str,
        op: Any,
        old_model: Any,
        new_model: Any,
        table: str | None,
        editor: Any,
        has_sql: bool,
        statements: list[Statement],
    ) -> None:
        self.app_label = app_label
        self.op = op
        self.old_model = old_model
        self.new_model = new_model
        self.table = table
        self.editor = editor
        self.has_sql = has_sql
        self.statements = statements


# LOCK [TABLE] [ONLY] name[, ...] IN SHARE [ROW EXCLUSIVE] MODE: modes that admit ROW SHARE (SELECT ... FOR
# UPDATE) but not ROW EXCLUSIVE (the writes after it).
WEAK_WRITE_LOCK = re.compile(
    r"\bLOCK\s+(?:TABLE\s+)?(?:ONLY\s+)?(?P<tables>[\w.\"]+(?:\s*\*)?(?:\s*,\s*[\w.\"]+(?:\s*\*)?)*)"
    r"\s+IN\s+(?P<mode>SHARE\s+ROW\s+EXCLUSIVE|SHARE)\s+MODE\b",
    re.IGNORECASE,
)


def weak_lock_warning(text: str) -> str | None:
    """The warning for a table lock in data-migration code that can make a live request a deadlock's victim."""
    found = [(" ".join(m["mode"].upper().split()), m["tables"].replace('"', "")) for m in WEAK_WRITE_LOCK.finditer(text)]
    if not found:
        return None
    locks = ", ".join(f"{tables} IN {mode} MODE" for mode, tables in dict.fromkeys(found))
    return (
        f"locks {locks}: that mode admits the old code's SELECT ... FOR UPDATE, so a live transaction can hold a row"
        " this migration then writes while it waits to write under this lock; PostgreSQL then kills one of the two"
        " after deadlock_timeout, maybe the request. Lock IN EXCLUSIVE MODE instead (reads go on, row holders finish first)"
    )


class Judgement:
    """The class of one operation and why, with what the orchestrator needs to defer it."""

    def __init__(self, cls: str, reason: str, deferrable: bool | None = None) -> None:
        self.cls = cls
        self.reason = reason
        self.deferrable = deferrable if cls == "contract" else None
        self.table: str | None = None
        self.column: str | None = None
        self.deferral: dict[str, Any] | None = None
        self.reverse_warning: str | None = None
        self.lock_warning: str | None = None


class Analysis:
    """Walks the plan with the same states `migrate` would use, collecting SQL without executing it."""

    def __init__(self, connection: Any, catalog: Catalog, loader: Any, old_state: Any) -> None:
        from django.db.models.fields import NOT_PROVIDED

        self.connection = connection
        self.catalog = catalog
        self.loader = loader
        self.known = known_operation_types()
        self.not_provided = NOT_PROVIDED
        self.old_tables: set[str] = set()
        self.old_columns: set[tuple[str, str]] = set()
        for model in old_state.apps.get_models(include_auto_created=True):
            meta = model._meta
            if not meta.managed or meta.proxy:
                continue
            table = parse_qname(meta.db_table) or meta.db_table
            self.old_tables.add(table)
            self.old_columns.update((table, f.column) for f in meta.local_concrete_fields)

    # ---- helpers over states
    @staticmethod
    def model(state: Any, app_label: str, name: str | None) -> Any:
        if not name:
            return None
        try:
            return state.apps.get_model(app_label, name)
        except LookupError:
            return None

    @staticmethod
    def table_of(model: Any) -> str | None:
        return (parse_qname(model._meta.db_table) or model._meta.db_table) if model is not None else None

    def old_uses(self, table: str | None, column: str | None = None) -> bool:
        if table is None:
            return False
        return (table, column) in self.old_columns if column is not None else table in self.old_tables

    def db_default(self, field: Any) -> Any:
        return getattr(field, "db_default", self.not_provided)

    def has_db_default(self, field: Any) -> bool:
        return self.db_default(field) is not self.not_provided

    def db_type(self, field: Any) -> str | None:
        return field.db_parameters(connection=self.connection).get("type")

    # ---- renames seen in SQL keep the old code's names current
    def follow_renames(self, statements: list[Statement]) -> None:
        for stmt in statements:
            for a in parse_statement(stmt.masked):
                table = a.get("table")
                if a["action"] == "rename_table" and table in self.old_tables:
                    self.old_tables.add(a["new"])
                    self.old_columns.update((a["new"], c) for t, c in list(self.old_columns) if t == table)
                elif a["action"] == "rename_column" and (table, a["column"]) in self.old_columns:
                    self.old_columns.add((table, a["new"]))

    def renames_old(self, statements: list[Statement]) -> list[str]:
        found = []
        for stmt in statements:
            for a in parse_statement(stmt.masked):
                table = a.get("table")
                if a["action"] == "rename_table" and table in self.old_tables:
                    found.append(f"table {table} -> {a['new']}")
                elif a["action"] == "rename_column" and (table, a["column"]) in self.old_columns:
                    found.append(f"column {table}.{a['column']} -> {a['new']}")
        return found

    def destructive_old(self, statements: list[Statement]) -> list[str]:
        """Statements of raw SQL that break the old code: drops, renames, retypes, NOT NULL on what it uses."""
        found = []
        for stmt in statements:
            for a in parse_statement(stmt.masked):
                table, column, action = a.get("table"), a.get("column"), a["action"]
                if action in ("drop_table", "truncate") and table in self.old_tables:
                    found.append(f"{action.replace('_', ' ')} {table}")
                elif (
                    action in ("drop_column", "alter_type", "set_not_null", "rename_column")
                    and (table, column) in self.old_columns
                ):
                    found.append(f"{action.replace('_', ' ')} {table}.{column}")
                elif action == "rename_table" and table in self.old_tables:
                    found.append(f"rename table {table}")
                elif action == "add_column" and table in self.old_tables and a["not_null"] and not a["default"]:
                    found.append(f"add NOT NULL column {table}.{column} without a default")
        return found

    # ---- one operation
    def run(self, app_label: str, op: Any, from_state: Any, to_state: Any, editor: Any, out: dict[str, Any]) -> Judgement:
        """Collect the SQL of `op` (to_state has it applied already) and judge it; sets out['sql'] and out['_deferred']."""
        name = self.known.get(type(op))
        out["sql"], out["_deferred"] = [], []
        out["reversible"] = reversible(op, self.known)
        if name is None:
            return Judgement(
                "unknown",
                f"operation class {type(op).__module__}.{type(op).__qualname__} is not one this analysis knows:"
                " it was not executed and its effect on the database cannot be judged",
            )
        if name == "SeparateDatabaseAndState":
            return self.separate(app_label, op, from_state, editor, out)
        before = len(editor.collected_sql)
        deferred_before = list(editor.deferred_sql)
        if op.reduces_to_sql:
            try:
                op.database_forwards(app_label, editor, from_state, to_state)
            except Exception as exc:
                del editor.collected_sql[before:]
                editor.deferred_sql[:] = deferred_before
                return Judgement("unknown", f"its SQL could not be collected: {type(exc).__name__}: {first_line(exc)}")
        out["sql"] = [s for s in editor.collected_sql[before:] if s.strip()]
        out["_deferred"] = [s for s in editor.deferred_sql if not any(s is d for d in deferred_before)]
        statements = [st for s in out["sql"] for st in split_sql(s)]
        if name in MODEL_NAMED:
            model_name = op.name
        elif name == "RenameModel":
            model_name = op.old_name
        else:
            model_name = getattr(op, "model_name", None)
        old_model = self.model(from_state, app_label, model_name)
        new_model = self.model(to_state, app_label, op.new_name if name == "RenameModel" else model_name)
        table = self.table_of(old_model) or self.table_of(new_model)
        c = OpContext(app_label, op, old_model, new_model, table, editor, bool(out["sql"] or out["_deferred"]), statements)
        j = self.judge(name, c)
        if j.table is None:
            j.table = table
        self.follow_renames(statements)
        return j

    def judge(self, name: str, c: OpContext) -> Judgement:
        if name in ("RunPython", "RunSQL"):
            return self.judge_code(name, c)
        if name in EXTENSIONS:
            return Judgement("expand", f"creates extension {c.op.name} if missing (needs the privilege to)")
        if name in STATE_ONLY:
            return Judgement("expand", "state only: no SQL")
        if not c.has_sql and name not in ("AddField", "RemoveField", "RenameField"):
            return Judgement("expand", "no SQL: state only")
        if name in ALWAYS_EXPAND:
            j = Judgement("expand", ALWAYS_EXPAND[name])
            if name == "CreateModel":
                j.table = self.table_of(c.new_model)
            return j
        method: Callable[[OpContext], Judgement] = getattr(self, "judge_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower())
        return method(c)

    def separate(self, app_label: str, op: Any, from_state: Any, editor: Any, out: dict[str, Any]) -> Judgement:
        """SeparateDatabaseAndState: judged by its database_operations, each on its own intermediate state."""
        subs: list[dict[str, Any]] = []
        judgements: list[Judgement] = []
        state = from_state
        for index, dbop in enumerate(op.database_operations):
            next_state = state.clone()
            dbop.state_forwards(app_label, next_state)
            sub: dict[str, Any] = {"index": index, "operation": type(dbop).__name__, "description": describe(dbop)}
            j = self.run(app_label, dbop, state, next_state, editor, sub)
            judgements.append(j)
            subs.append(sub)
            sub.update({"class": j.cls, "reason": j.reason, "table": j.table})
            state = next_state
        out["sql"] = [s for sub in subs for s in sub["sql"]]
        out["_deferred"] = [s for sub in subs for s in sub.pop("_deferred")]
        out["database_operations"] = subs
        if not judgements:
            return Judgement("expand", "SeparateDatabaseAndState without database operations: state only")
        worst = max(judgements, key=lambda j: CLASS_RANK[j.cls])
        contract = [j for j in judgements if j.cls == "contract"]
        result = Judgement(
            worst.cls,
            "database operations: " + "; ".join(f"{s['operation']}: {j.cls} ({j.reason})" for s, j in zip(subs, judgements)),
            all(j.deferrable for j in contract),
        )
        result.table = next((j.table for j in judgements if j.table), None)
        result.column = next((j.column for j in judgements if j.column), None)
        if worst.cls == "contract" and all(j.deferral for j in contract):
            result.deferral = {
                key: [x for j in contract for x in j.deferral[key]]  # type: ignore[index]
                for key in ("interim_sql", "deferred_sql", "caveats")
            }
        return result

    # ---- RunPython / RunSQL
    def judge_code(self, name: str, c: OpContext) -> Judgement:
        j = self.judge_code_class(name, c)
        if name == "RunSQL":
            text = "\n".join(st.text for st in c.statements)
        else:
            try:
                text = inspect.getsource(c.op.code)
            except (OSError, TypeError):  # no source to read (built in, generated): nothing to warn about
                text = ""
        j.lock_warning = weak_lock_warning(text)
        return j

    def judge_code_class(self, name: str, c: OpContext) -> Judgement:
        if name == "RunSQL":
            breaking = self.destructive_old(c.statements)
            tables = [a["table"] for st in c.statements for a in parse_statement(st.masked) if a.get("table")]
            if breaking:
                j = Judgement(
                    "contract", "raw SQL breaks the old code: " + ", ".join(breaking) + " (not split, not deferrable)", False
                )
            elif not c.op.reversible:
                j = Judgement("contract", "irreversible: RunSQL without reverse_sql; going back needs the backup restored", False)
            else:
                j = Judgement("expand", "raw SQL with a reverse; drops, renames or tightens nothing the old code uses")
            j.table = tables[0] if tables else None
            return j
        if not c.op.reversible:
            return Judgement(
                "contract",
                "irreversible data migration: RunPython without reverse_code (the new code may need its effect;"
                " going back needs the backup restored)",
                False,
            )
        return Judgement("expand", "data migration with a reverse: runs while the old code serves (it must cope with its writes)")

    # ---- models
    def judge_delete_model(self, c: OpContext) -> Judgement:
        if not self.old_uses(c.table):
            return Judgement("expand", f"drops table {c.table}, created in this plan: the old code never used it")
        j = Judgement("contract", f"drops table {c.table}, which the old code uses (breaks old code); deferrable", True)
        fks = [f.column for f in c.old_model._meta.local_concrete_fields if f.remote_field and getattr(f, "db_constraint", False)]
        caveats = []
        if fks:
            caveats.append(
                f"until it is dropped, its foreign keys ({', '.join(fks)}) can fail the new code's deletes of referenced rows"
            )
        j.deferral = {"interim_sql": [], "deferred_sql": [s.text for s in c.statements], "caveats": caveats}
        return j

    def judge_rename_model(self, c: OpContext) -> Judgement:
        renamed = self.renames_old(c.statements)
        if not renamed:
            return Judgement("expand", "renames nothing the old code uses")
        return Judgement(
            "contract",
            "renames " + ", ".join(renamed) + ": the old code needs the old name, the new code the new one (breaks old code)",
            False,
        )

    judge_alter_model_table = judge_rename_model

    def judge_alter_unique_together(self, c: OpContext) -> Judgement:
        old = {tuple(t) for t in (c.old_model._meta.unique_together if c.old_model is not None else ())}
        new = {tuple(t) for t in (c.new_model._meta.unique_together if c.new_model is not None else ())}
        added = sorted(new - old)
        if not added:
            return Judgement("expand", "only removes uniqueness")
        if not self.old_uses(c.table):
            return Judgement("expand", f"adds uniqueness on {c.table}, created in this plan")
        together = ", ".join("(" + ", ".join(a) + ")" for a in added)
        j = Judgement(
            "contract", f"adds uniqueness {together}: the old code may write duplicates (breaks old code); deferrable", True
        )
        j.deferral = {"interim_sql": [], "deferred_sql": [s.text for s in c.statements], "caveats": []}
        return j

    def judge_alter_order_with_respect_to(self, c: OpContext) -> Judgement:
        if not self.old_uses(c.table):
            return Judgement("expand", f"changes the _order column of {c.table}, created in this plan")
        had = c.old_model is not None and c.old_model._meta.order_with_respect_to
        has = c.new_model is not None and c.new_model._meta.order_with_respect_to
        if has and not had:
            return Judgement(
                "contract",
                "adds the NOT NULL _order column without a DB default: old-code INSERTs fail (breaks old code); the new code"
                " needs it, not deferrable",
                False,
            )
        if had and not has:
            field = c.old_model._meta.get_field("_order")
            return self.removal(c, field, "drops the _order column, which the old code writes")
        return Judgement("expand", "changes order_with_respect_to without touching what the old code uses")

    # ---- fields
    def judge_add_field(self, c: OpContext) -> Judgement:
        field = c.new_model._meta.get_field(c.op.name)
        if field.many_to_many:
            return Judgement("expand", "adds a many-to-many relation (a new link table)" if c.has_sql else "no SQL: state only")
        j = self._add_field(field, c)
        j.column = field.column
        return j

    def _add_field(self, field: Any, c: OpContext) -> Judgement:
        if not c.has_sql:
            return Judgement("expand", "no SQL: state only")
        if not self.old_uses(c.table):
            return Judgement("expand", f"adds a column to {c.table}, created in this plan")
        if getattr(field, "generated", False):
            return Judgement("expand", f"adds generated column {field.column}: the database computes it")
        if self.has_db_default(field):
            return Judgement("expand", f"adds column {field.column} with a db_default: old-code INSERTs get the database default")
        if field.null:
            return Judgement("expand", f"adds nullable column {field.column}: the old code does not write it")
        how = "with a default that Django drops after filling the existing rows" if field.has_default() else "without a default"
        return Judgement(
            "contract",
            f"adds NOT NULL column {field.column} {how}: old-code INSERTs omit it and fail (breaks old code); the new code"
            " needs it, not deferrable (add it nullable, or with a db_default on Django 5, first)",
            False,
        )

    def judge_remove_field(self, c: OpContext) -> Judgement:
        field = c.old_model._meta.get_field(c.op.name)
        if field.many_to_many:
            through_table = self.table_of(field.remote_field.through)
            if not c.has_sql:
                return Judgement("expand", "no SQL: state only")
            if not self.old_uses(through_table):
                return Judgement("expand", f"drops link table {through_table}, created in this plan")
            j = Judgement(
                "contract", f"drops link table {through_table}, which the old code uses (breaks old code); deferrable", True
            )
            j.table = through_table
            j.deferral = {"interim_sql": [], "deferred_sql": [s.text for s in c.statements], "caveats": []}
            return j
        if not c.has_sql:
            j = Judgement("expand", "no SQL: state only")
        elif not self.old_uses(c.table, field.column):
            j = Judgement("expand", f"drops column {c.table}.{field.column}, created in this plan: the old code never used it")
        else:
            j = self.removal(c, field, f"drops column {field.column}, which the old code reads")
        j.column = field.column
        if c.has_sql:
            j.reverse_warning = self.re_add_warning(field, c)
        return j

    def removal(self, c: OpContext, field: Any, why: str) -> Judgement:
        """A drop of a column the old code uses: contract, deferrable, with interim SQL that keeps both codes working."""
        j = Judgement("contract", why, True)
        j.column = field.column
        live = self.catalog.column(c.table, field.column) if c.table else None
        not_null_now = bool(live and live["not_null"])
        not_null_at_removal = not field.null
        has_default = self.has_db_default(field) or bool(live and live["has_default"])
        interim, deferred = [], []
        for stmt in c.statements:
            if re.match(r"^(?:SET\s+CONSTRAINTS\b|ALTER\s+TABLE\s+.*\s+DROP\s+CONSTRAINT\b)", stmt.masked, re.I):
                interim.append(stmt.text)  # a FK the new code does not know: its deletes must not trip on it
            else:
                deferred.append(stmt.text)
        caveats = []
        if (not_null_now or not_null_at_removal) and not has_default:
            editor = c.editor
            sql = editor.sql_alter_column % {
                "table": editor.quote_name(c.old_model._meta.db_table),
                "changes": editor.sql_alter_column_null % {"column": editor.quote_name(field.column)},
            }
            interim.append(sql + ";")
            if not not_null_at_removal:
                caveats.append("the plan makes the column nullable before this operation; the interim DROP NOT NULL repeats it")
        j.deferral = {
            "interim_sql": interim,
            "deferred_sql": deferred,
            "caveats": caveats,
            "not_null_now": not_null_now,
            "not_null_at_removal": not_null_at_removal,
        }
        relax = " (DROP NOT NULL: the new code's INSERTs omit the column)" if any("DROP NOT NULL" in s for s in interim) else ""
        j.reason = f"{why} (breaks old code); deferrable: interim_sql before the switch{relax}, deferred_sql after it"
        return j

    def re_add_warning(self, field: Any, c: OpContext) -> str | None:
        """Django reverses a RemoveField by re-adding the column: NOT NULL without a default fails on rows."""
        if field.null or self.has_db_default(field) or c.editor.effective_default(field) is not None:
            return None
        info = self.catalog.table(c.table) if c.table else None
        if info and info["non_empty"]:
            return f"the reverse re-adds NOT NULL column {field.column} without a default: it fails while {c.table} has rows"
        return None

    def judge_rename_field(self, c: OpContext) -> Judgement:
        old = c.old_model._meta.get_field(c.op.old_name)
        renamed = self.renames_old(c.statements)
        if renamed:
            j = Judgement(
                "contract",
                "renames " + ", ".join(renamed) + ": the old code uses the old name, the new code the new one (breaks old code;"
                " not deferrable)",
                False,
            )
        elif not c.has_sql:
            j = Judgement("expand", "no SQL: the column keeps its name")
        else:
            j = Judgement("expand", f"renames column {getattr(old, 'column', None)}, which the old code does not use")
        j.column = getattr(old, "column", None)
        return j

    def judge_alter_field(self, c: OpContext) -> Judgement:
        old = c.old_model._meta.get_field(c.op.name)
        new = c.new_model._meta.get_field(c.op.name)
        if not self.old_uses(c.table):
            j = Judgement("expand", f"alters a column of {c.table}, created in this plan")
            j.column = getattr(new, "column", None)
            return j
        if old.many_to_many or new.many_to_many:
            renamed = self.renames_old(c.statements)
            if renamed:
                return Judgement("contract", "renames " + ", ".join(renamed) + " (breaks old code; not deferrable)", False)
            return Judgement("expand", "alters a many-to-many relation without renaming what the old code uses")
        used = self.old_uses(c.table, old.column)
        parts: list[tuple[str, str, bool]] = []  # (class, what, deferrable)

        def tighten(what: str, deferrable: bool = False) -> None:
            parts.append(("contract" if used else "expand", what, deferrable))

        def relax(what: str) -> None:
            parts.append(("expand", what, False))

        if old.column != new.column:
            tighten(f"renames column {old.column} -> {new.column}")
        old_type, new_type = self.db_type(old), self.db_type(new)
        if old_type and new_type and old_type != new_type:
            how = type_change(old_type, new_type)
            if how == "widen":
                relax(f"widens {old_type} -> {new_type}")
            elif how == "narrow":
                tighten(f"narrows {old_type} -> {new_type}: the old code may write longer values", True)
            else:
                tighten(f"changes the type {old_type} -> {new_type}")
        if old.null and not new.null:
            if used:
                parts.append(("contract", f"NULL -> NOT NULL on {new.column}: the old code may write NULL", True))
            elif self.has_db_default(new):
                relax(f"NOT NULL on {new.column}, filled by its db_default for the old code")
            else:
                parts.append(("contract", f"NULL -> NOT NULL on {new.column}: old-code INSERTs omit it and fail", True))
        elif not old.null and new.null:
            relax(f"NOT NULL -> NULL on {new.column}")
        if not old.unique and new.unique and not new.primary_key:
            tighten(f"adds uniqueness on {new.column}: the old code may write duplicates", True)
        elif old.unique and not new.unique:
            relax(f"drops uniqueness on {new.column}")
        if old.primary_key != new.primary_key:
            tighten("changes the primary key")
        if old.db_index != new.db_index:
            relax("adds an index" if new.db_index else "drops an index")
        old_fk = bool(old.remote_field) and getattr(old, "db_constraint", False)
        new_fk = bool(new.remote_field) and getattr(new, "db_constraint", False)
        if (
            old.remote_field
            and new.remote_field
            and self.table_of(old.remote_field.model) != self.table_of(new.remote_field.model)
        ):
            tighten("points the foreign key at another table")
        elif new_fk and not old_fk:
            tighten("adds a foreign key constraint the old code's writes may violate", True)
        elif old_fk and not new_fk:
            relax("drops the foreign key constraint")
        old_default, new_default = self.db_default(old), self.db_default(new)
        if (old_default is self.not_provided) != (new_default is self.not_provided) or repr(old_default) != repr(new_default):
            if new_default is not self.not_provided:
                relax(f"sets the db_default of {new.column}")
            elif not new.null:
                tighten(f"drops the db_default of NOT NULL {new.column}: old-code INSERTs may rely on it", True)
            else:
                relax(f"drops the db_default of nullable {new.column}")
        if getattr(old, "db_collation", None) != getattr(new, "db_collation", None):
            tighten("changes the collation")
        if getattr(old, "db_comment", None) != getattr(new, "db_comment", None):
            relax("changes the column comment")
        if not parts:
            tighten("changes the column in a way this analysis does not recognise")
        j = self.combine(parts)
        j.column = new.column
        if j.cls == "contract" and j.deferrable:
            j.deferral = {
                "interim_sql": [],
                "deferred_sql": [s.text for s in c.statements],
                "caveats": ["the new code runs on the unaltered column until deferred_sql runs"],
            }
        return j

    @staticmethod
    def combine(parts: list[tuple[str, str, bool]]) -> Judgement:
        contract = [p for p in parts if p[0] == "contract"]
        if not contract:
            return Judgement("expand", "only relaxes: " + "; ".join(p[1] for p in parts))
        deferrable = all(p[2] for p in contract)
        tail = "deferrable" if deferrable else "not deferrable: the new code needs it"
        return Judgement("contract", "; ".join(p[1] for p in parts) + f" (breaks old code; {tail})", deferrable)


def describe(op: Any) -> str:
    try:
        return str(op.describe())
    except Exception:  # a third-party describe() must not stop the analysis
        return type(op).__name__


def reversible(op: Any, known: dict[type, str]) -> bool:
    if known.get(type(op)) == "SeparateDatabaseAndState":
        return all(reversible(d, known) for d in op.database_operations)
    return bool(getattr(op, "reversible", True))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# The whole plan
# --------------------------------------------------------------------------------------------


def old_code_state(executor: Any) -> Any:
    """The project state of the applied migrations (what the old code runs on), as `migrate` builds it."""
    from django.db.migrations.state import ProjectState

    loader = executor.loader
    state = ProjectState(real_apps=loader.unmigrated_apps)
    applied = {loader.graph.nodes[k] for k in loader.applied_migrations if k in loader.graph.nodes}
    for migration, _ in executor.migration_plan(loader.graph.leaf_nodes(), clean_start=True):
        if migration in applied:
            migration.mutate_state(state, preserve=False)
    return state


def resolve_targets(loader: Any, specs: list[str] | None) -> list[tuple[str, str | None]]:
    from django.db.migrations.exceptions import AmbiguityError

    leaves = sorted(loader.graph.leaf_nodes())
    if not specs:
        return leaves
    targets: list[tuple[str, str | None]] = []
    for spec in specs:
        app, _, name = spec.partition(":")
        if not app or app not in loader.migrated_apps:
            raise BadInput(f"target {spec!r}: app {app!r} has no migrations")
        if not name:
            targets.extend(k for k in leaves if k[0] == app)
        elif name == "zero":
            targets.append((app, None))
        else:
            try:
                migration = loader.get_migration_by_prefix(app, name)
            except AmbiguityError:
                raise BadInput(f"target {spec!r}: more than one migration of {app} starts with {name!r}") from None
            except KeyError:
                raise BadInput(f"target {spec!r}: {app} has no migration {name!r}") from None
            key = (app, migration.name)
            if key not in loader.graph.nodes:
                raise BadInput(f"target {spec!r}: {key_text(key)} is replaced by a squashed migration; name that instead")
            targets.append(key)
    return targets


def leaf_nodes_before(loader: Any) -> tuple[dict[str, str], list[str]]:
    """{app: applied leaf | 'zero'} for every app with migrations, and notes on apps with several applied leaves."""
    graph, applied = loader.graph, set(loader.applied_migrations)
    order: dict[tuple[str, str], int] = {}
    for leaf in sorted(graph.leaf_nodes()):
        for key in graph.forwards_plan(leaf):
            order.setdefault(key, len(order))
    result: dict[str, str] = {}
    notes: list[str] = []
    for app in sorted({k[0] for k in graph.nodes}):
        leaves = sorted(
            (
                k
                for k in graph.nodes
                if k[0] == app
                and k in applied
                and not any(c.key in applied and c.key[0] == app for c in graph.node_map[k].children)
            ),
            key=lambda k: order.get(k, -1),
        )
        result[app] = leaves[-1][1] if leaves else "zero"
        if len(leaves) > 1:
            notes.append(
                f"{app} has several applied leaf nodes ({', '.join(k[1] for k in leaves)}): no single migrate target reverts it"
            )
    return result, notes


def analyse(args: argparse.Namespace) -> dict[str, Any]:
    connection, django_version = setup(args.database)
    from django.db.migrations.exceptions import InconsistentMigrationHistory
    from django.db.migrations.executor import MigrationExecutor

    try:
        executor = MigrationExecutor(connection)
    except Exception as exc:  # any error loading the migration files
        raise SetupError(f"cannot load the migrations: {type(exc).__name__}: {first_line(exc)}") from None
    loader = executor.loader
    refusals: list[str] = []
    try:
        loader.check_consistent_history(connection)
    except InconsistentMigrationHistory as exc:
        refusals.append(f"migrate would refuse: {first_line(exc)}")
    for app, names in sorted(loader.detect_conflicts().items()):
        refusals.append(
            f"migrate would refuse: conflicting leaf nodes in {app}: {', '.join(sorted(names))} (makemigrations --merge)"
        )
    targets = resolve_targets(loader, args.targets)
    plan = executor.migration_plan(targets)
    backwards = [key_text((m.app_label, m.name)) for m, back in plan if back]
    if backwards:
        raise BadInput(f"the targets would unapply {', '.join(backwards)}: this analyses forward plans only")
    before, notes = leaf_nodes_before(loader)

    catalog = Catalog(connection, args.large_table_rows, args.large_table_bytes)
    try:
        state = old_code_state(executor)
        analysis = Analysis(connection, catalog, loader, state)
    except Exception as exc:  # the applied state cannot be rebuilt
        raise SetupError(f"cannot rebuild the applied project state: {type(exc).__name__}: {first_line(exc)}") from None

    migrations = []
    for migration, _ in plan:
        key = (migration.app_label, migration.name)
        ops_out: list[dict[str, Any]] = []
        owners: list[tuple[Any, dict[str, Any]]] = []
        with connection.schema_editor(collect_sql=True, atomic=False) as editor:
            for index, op in enumerate(migration.operations):
                out: dict[str, Any] = {"index": index, "operation": type(op).__name__, "description": describe(op)}
                from_state = state.clone()
                try:
                    op.state_forwards(migration.app_label, state)
                except Exception as exc:  # the plan cannot be replayed further
                    raise SetupError(
                        f"cannot replay {key_text(key)} operation {index} ({type(op).__name__}):"
                        f" {type(exc).__name__}: {first_line(exc)}"
                    ) from None
                j = analysis.run(migration.app_label, op, from_state, state, editor, out)
                owners.extend((stmt, out) for stmt in out.pop("_deferred"))
                out["_judgement"] = j
                ops_out.append(out)
            for stmt in editor.deferred_sql:  # what survives to the end of the migration, as Django runs it
                owner = next((o for s, o in owners if s is stmt), ops_out[-1] if ops_out else None)
                if owner is not None:
                    text = str(stmt)
                    owner["sql"].append(text if text.rstrip().endswith(";") else text + ";")
            editor.deferred_sql = []
        for out in ops_out:
            finish_operation(out, catalog)
        migrations.append({"key": key, "migration": migration, "operations": ops_out})

    return assemble(args, connection, django_version, loader, targets, before, refusals, notes, migrations, catalog)


def finish_operation(out: dict[str, Any], catalog: Catalog) -> None:
    j: Judgement = out.pop("_judgement")
    statements = [stmt for text in out["sql"] for stmt in split_sql(text)]
    locks = [risk for stmt in statements for risk in assess_statement(stmt, catalog)]
    if j.deferral is not None and "database_operations" not in out:
        # Everything the operation runs, deferred SQL (indexes, constraints) included, except what runs in the interim.
        j.deferral["deferred_sql"] = [st.text for st in statements if st.text not in j.deferral["interim_sql"]]
    info = catalog.table(j.table) if j.table else None
    out.update(
        {
            "class": j.cls,
            "reason": j.reason,
            "table": j.table,
            "column": j.column,
            "rows": info["rows"] if info else None,
            "size_bytes": info["size_bytes"] if info else None,
            "new_table": bool(info and info["new"]),
            "reverse_warning": j.reverse_warning,
            "lock_warning": j.lock_warning,
            "locks": locks,
            "locking_risk": bool(locks),
            "deferrable": j.deferrable,
            "deferral": j.deferral,
        }
    )


def assemble(
    args: argparse.Namespace,
    connection: Any,
    django_version: str,
    loader: Any,
    targets: list[tuple[str, str | None]],
    before: dict[str, str],
    refusals: list[str],
    notes: list[str],
    migrations: list[dict[str, Any]],
    catalog: Catalog,
) -> dict[str, Any]:
    graph = loader.graph
    pending = [m["key"] for m in migrations]
    pending_set = set(pending)
    cls: dict[tuple[str, str], str] = {}
    phase: dict[tuple[str, str], str] = {}
    contract_ancestors: dict[tuple[str, str], set[tuple[str, str]]] = {}
    deps: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for m in migrations:
        key = m["key"]
        m_ops = m["operations"]
        cls[key] = max((o["class"] for o in m_ops), key=CLASS_RANK.__getitem__, default="expand")
        deps[key] = sorted(p.key for p in graph.node_map[key].parents)
        pending_deps = [d for d in deps[key] if d in pending_set]
        ancestors: set[tuple[str, str]] = set()
        for d in pending_deps:
            ancestors |= contract_ancestors[d]
            if cls[d] != "expand":
                ancestors.add(d)
        contract_ancestors[key] = ancestors
        phase[key] = "expand" if cls[key] == "expand" and all(phase[d] == "expand" for d in pending_deps) else "contract"
    order = {k: i for i, k in enumerate(pending)}
    blocks = {
        k: sorted((m for m in pending if cls[m] == "expand" and k in contract_ancestors[m]), key=order.get) for k in pending
    }

    out_migrations = []
    irreversible = []
    locking_risks = []
    deferred_statements = []
    blocking = []
    maintenance: list[str] = list(refusals)
    warnings: list[str] = list(notes)
    contract_ops = 0
    for m in migrations:
        key, name = m["key"], key_text(m["key"])
        for o in m["operations"]:
            where = f"{name} #{o['index']} {o['operation']}"
            if not o["reversible"]:
                irreversible.append(
                    {"migration": name, "operation": o["index"], "description": o["description"], "reason": o["reason"]}
                )
            if o["class"] == "unknown":
                maintenance.append(f"{where}: unknown: {o['reason']}")
            elif o["class"] == "contract":
                contract_ops += 1
                if not o["deferrable"]:
                    maintenance.append(f"{where}: contract that cannot be deferred: {o['reason']}")
                elif o["deferral"] is not None:
                    d = o["deferral"]
                    deferred_statements.append(
                        {
                            "migration": name,
                            "operation": o["index"],
                            "kind": o["operation"],
                            "table": o["table"],
                            "column": o["column"],
                            "not_null_now": d.get("not_null_now"),
                            "not_null_at_removal": d.get("not_null_at_removal"),
                            "interim_sql": d["interim_sql"],
                            "deferred_sql": d["deferred_sql"],
                            "caveats": d["caveats"],
                        }
                    )
            for risk in o["locks"]:
                locking_risks.append({"migration": name, "operation": o["index"], **risk})
                text = (
                    f"{where}: {risk['kind']} on {risk['table']} (~{risk['rows']} rows, {human_bytes(risk['size_bytes'])}):"
                    f" {risk['detail']}"
                )
                if risk["escalates"]:
                    maintenance.append(text + " - the table is large")
                else:
                    warnings.append(text + (" - large table: set lock_timeout" if risk["holds"] == "brief" else ""))
            if o["reverse_warning"]:
                warnings.append(f"{where}: {o['reverse_warning']}")
            if o.get("lock_warning"):
                warnings.append(f"{where}: {o['lock_warning']}")
        contract_parts = [o for o in m["operations"] if o["class"] == "contract"]
        harmless = all(
            (o["class"] == "contract" and o["deferrable"])
            or (o["class"] == "expand" and not o["sql"] and o["operation"] != "RunPython")
            for o in m["operations"]
        )
        if cls[key] == "expand":
            deferrable, why = None, None
        elif cls[key] == "unknown":
            deferrable, why = False, "holds an operation of unknown class"
        elif blocks[key]:
            deferrable = False
            verb = "depends" if len(blocks[key]) == 1 else "depend"
            why = f"{', '.join(key_text(b) for b in blocks[key])} (needed by the new code) {verb} on it"
        elif not harmless:
            deferrable = False
            why = "it also holds operations the new code needs (or contract operations that cannot be deferred)"
        else:
            deferrable, why = True, "nothing pending depends on it and the new code does not need it"
        if cls[key] != "expand" and blocks[key]:
            blocking.append(
                {
                    "migration": name,
                    "blocks": [key_text(b) for b in blocks[key]],
                    "operations": [o["index"] for o in contract_parts],
                }
            )
        out_migrations.append(
            {
                "migration": name,
                "app": key[0],
                "name": key[1],
                "atomic": bool(getattr(m["migration"], "atomic", True)),
                "dependencies": [key_text(d) for d in deps[key]],
                "pending_dependencies": [key_text(d) for d in deps[key] if d in pending_set],
                "class": cls[key],
                "phase": phase[key],
                "reversible": all(o["reversible"] for o in m["operations"]),
                "deferrable": deferrable,
                "deferrable_reason": why,
                "blocks": [key_text(b) for b in blocks[key]] if cls[key] != "expand" else [],
                "blocked_by": sorted((key_text(a) for a in contract_ancestors[key]), key=lambda t: order[tuple(t.split(".", 1))])
                if phase[key] == "contract"
                else [],
                "operations": [{k: v for k, v in o.items() if not k.startswith("_")} for o in m["operations"]],
            }
        )

    # A non-atomic migration cut half-way leaves part of its data work committed, which Django does not
    # record and no reverse undoes: only a restore does, and a restore is lossless only while writes
    # are blocked. Index builds (CONCURRENTLY) are not data work.
    for m in out_migrations:
        data_ops = [
            o
            for o in m["operations"]
            if o["operation"] == "RunPython"
            or (o["operation"] == "RunSQL" and not all(CONCURRENT_INDEX.match(sql) for sql in o["sql"]))
        ]
        if not m["atomic"] and data_ops:
            maintenance.append(
                f"{m['migration']} is not atomic and runs data operations"
                f" ({', '.join(str(o['index']) + ' ' + o['operation'] for o in data_ops)}): cut half-way, part of its work"
                " stays committed and only a restore undoes it, which loses nothing only while writes are blocked"
            )

    strategy = None
    if maintenance:
        verdict, reasons = "maintenance", maintenance
    elif contract_ops:
        verdict = "two_phase"
        contract_migrations = [m for m in out_migrations if m["class"] == "contract"]
        if all(m["deferrable"] for m in contract_migrations):
            strategy = "migrations"
            reasons = [
                f"{contract_ops} contract operation(s), all deferrable: run the expand migrations, switch, then the contract"
                f" migrations ({', '.join(m['migration'] for m in contract_migrations)})"
            ]
        else:
            strategy = "deferred_statements"
            reasons = [
                f"{contract_ops} contract operation(s), all deferrable, but "
                + "; ".join(
                    f"{m['migration']} cannot wait for the switch ({m['deferrable_reason']})"
                    for m in contract_migrations
                    if not m["deferrable"]
                )
                + ": run every migration before the switch with each contract operation's interim_sql instead of its SQL,"
                " and its deferred_sql after the switch"
            ]
    else:
        verdict = "rolling"
        reasons = (
            ["every pending operation is expand: the old code keeps working while they run"] if pending else ["nothing pending"]
        )

    return {
        "format": 1,
        "django_version": django_version,
        "database": {
            "alias": args.database,
            "vendor": connection.vendor,
            "name": connection.settings_dict.get("NAME"),
            "server_version": catalog.server_version,
        },
        "thresholds": {"large_table_rows": args.large_table_rows, "large_table_bytes": args.large_table_bytes},
        "targets": [key_text((a, n or "zero")) for a, n in targets],
        "leaf_nodes_before": before,
        "pending": [key_text(k) for k in pending],
        "expand": [key_text(k) for k in pending if phase[k] == "expand"],
        "contract": [key_text(k) for k in pending if phase[k] == "contract"],
        "reversible": not irreversible,
        "irreversible": irreversible,
        "verdict": verdict,
        "strategy": strategy,
        "verdict_reasons": reasons,
        "warnings": warnings,
        "blocking": blocking,
        "deferred_statements": deferred_statements,
        "locking_risks": locking_risks,
        "tables": catalog.tables_seen(),
        "problems": refusals + notes,
        "migrations": out_migrations,
    }


def setup(database: str) -> tuple[Any, str]:
    """django.setup() from the release directory; a READ ONLY session on the database."""
    sys.path.insert(0, os.getcwd())
    try:
        import django

        django.setup()
        from django.conf import settings
        from django.db import connections

        if database not in settings.DATABASES:
            raise BadInput(f"--database {database!r} is not in DATABASES")
        connection = connections[database]
        if connection.vendor != "postgresql":
            raise SetupError(f"database {database!r} is {connection.vendor}, not PostgreSQL")
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            cursor.execute("SET lock_timeout = '10s'")
            cursor.execute("SET statement_timeout = '300s'")
    except (BadInput, SetupError):
        raise
    except Exception as exc:  # settings, imports, database: one line for the operator
        raise SetupError(f"cannot set up Django: {type(exc).__name__}: {first_line(exc)}") from None
    return connection, django.get_version()


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def render_table(doc: dict[str, Any]) -> str:
    header = ("APP", "MIGRATION", "#", "OPERATION", "CLASS", "TABLE", "ROWS", "SIZE", "FLAGS", "REASON")
    rows: list[tuple[str, ...]] = []
    for m in doc["migrations"]:
        summary = f"phase {m['phase']}"
        if m["blocked_by"]:
            summary += f", blocked by {', '.join(m['blocked_by'])}"
        if m["blocks"]:
            summary += f", blocks {', '.join(m['blocks'])}"
        if m["class"] == "contract":
            summary += ", deferrable" if m["deferrable"] else f", not deferrable: {m['deferrable_reason']}"
        rows.append(
            (m["app"], m["name"], "", "(migration)", m["class"], "", "", "", "" if m["atomic"] else "non-atomic", summary)
        )
        for o in m["operations"]:
            flags = []
            if any(r["escalates"] for r in o["locks"]):
                flags.append("LOCK")
            elif o["locks"]:
                flags.append("lock")
            if not o["reversible"]:
                flags.append("irreversible")
            if o["deferrable"]:
                flags.append("deferrable")
            rows_text = "new" if o["new_table"] else ("-" if o["rows"] is None else str(o["rows"]))
            size_text = "-" if o["new_table"] else human_bytes(o["size_bytes"])
            operation = f"{o['operation']}: {o['description']}"
            if len(operation) > 60:
                operation = operation[:57] + "..."
            rows.append(
                (
                    m["app"],
                    m["name"],
                    str(o["index"]),
                    operation,
                    o["class"],
                    o["table"] or "-",
                    rows_text,
                    size_text,
                    ",".join(flags),
                    o["reason"],
                )
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in [header, *rows]]
    lines.append("")
    lines.append(f"pending: {len(doc['pending'])}   expand: {', '.join(doc['expand']) or '-'}")
    lines.append(f"contract: {', '.join(doc['contract']) or '-'}")
    for b in doc["blocking"]:
        lines.append(f"blocking: {b['migration']} (contract, operations {b['operations']}) blocks {', '.join(b['blocks'])}")
    for d in doc["deferred_statements"]:
        lines.append(f"deferred: {d['migration']} #{d['operation']} {d['kind']} {d['table']}.{d['column'] or ''}".rstrip("."))
        lines.extend(f"    interim:  {s}" for s in d["interim_sql"])
        lines.extend(f"    deferred: {s}" for s in d["deferred_sql"])
    lines.append("leaf nodes before: " + " ".join(f"{a}:{n}" for a, n in doc["leaf_nodes_before"].items()))
    lines.append(f"reversible: {'yes' if doc['reversible'] else 'no'}")
    lines.append(f"verdict: {doc['verdict']}" + (f" ({doc['strategy']})" if doc["strategy"] else ""))
    lines.extend(f"  - {r}" for r in doc["verdict_reasons"])
    if doc["warnings"]:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in doc["warnings"])
    return "\n".join(lines) + "\n"


def non_negative(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="Analyse the pending Django migration plan (reads only).")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", dest="output", action="store_const", const="json", help="JSON on stdout (default)")
    output.add_argument("--table", dest="output", action="store_const", const="table", help="a human table on stdout")
    parser.add_argument("--large-table-rows", type=non_negative, default=1_000_000, metavar="N", help="default 1000000")
    parser.add_argument(
        "--large-table-bytes", type=non_negative, default=1 << 30, metavar="N", help="default 1073741824 (1 GiB); 0: off"
    )
    parser.add_argument("--database", default="default", help="the DATABASES alias (default: default)")
    parser.add_argument("--targets", nargs="+", metavar="APP[:NAME]", help="plan to these nodes instead of every leaf node")
    args = parser.parse_args(argv)
    args.output = args.output or "json"
    for spec in args.targets or ():
        if spec.count(":") > 1 or spec.startswith(":"):
            parser.error(f"--targets {spec!r}: expected APP or APP:NAME")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        doc = analyse(args)
    except BadInput as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SetupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    if args.output == "table":
        sys.stdout.write(render_table(doc))
    else:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
