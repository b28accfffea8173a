"""The djm CLI's run report: exit codes, the report built from runner events and the run record, its HTML page.

Pure functions on plain data (no ansible-runner, no hosts), so recorded event streams and run records
can be fed to them in tests.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_record import stage_seconds

# ------------------------------------------------------------------------------------------ exit codes
EXIT_OK = 0
EXIT_ROLLED_BACK = 1
EXIT_NEEDS_HUMAN = 2
EXIT_REFUSED = 3

EXIT_MEANINGS = {
    EXIT_OK: "success",
    EXIT_ROLLED_BACK: "failed, and rolled back cleanly: every app host serves the release the run started from",
    EXIT_NEEDS_HUMAN: (
        "failed, and needs a human: the undo did not finish, or the run was interrupted (read the report, then rollback)"
    ),
    EXIT_REFUSED: "refused before any change (bad input, an unreachable host, a held lock, nothing to undo)",
}


def stage_of(play_name: str) -> str:
    """The stage a play stands for: the words before ' - ' in its name (`Switch - one app host at a
    time` -> switch), else its name's first word (`Validate the inventory` -> validate). The event
    log callback (plugins/callback/djm_events.py) names stages the same way."""
    name = (play_name or "").strip()
    if " - " in name:
        return name.split(" - ", 1)[0].strip().lower()
    return (name.split() or ["play"])[0].lower()


def exit_code(
    command: str, succeeded: bool, run_id: str, record: dict[str, Any] | None, failed_roles: list[str] | None = None
) -> int:
    """The CLI's exit code for a playbook run.

    command      plan, plan-prepare, migrate, rollback, status, backups-list, backups-verify
    succeeded    ansible-playbook ended with rc 0
    run_id       the id this run made (djm_run_id), "" when it never got that far
    record       the last run record the run wrote or read (deploy_run's `run`); for rollback, the
                 record of the run it undoes
    failed_roles roles of the tasks that failed (backups verify: a failure inside pg_restore's check
                 is a backup that cannot be trusted)
    """
    if succeeded:
        return EXIT_OK
    if command in ("status", "backups-list"):
        return EXIT_REFUSED  # read-only: nothing was changed
    if command == "backups-verify":
        return EXIT_NEEDS_HUMAN if "pg_restore" in (failed_roles or []) else EXIT_REFUSED
    if command == "plan":
        return EXIT_REFUSED  # --check: nothing was written, whatever failed
    # plan-prepare (-e migrate_plan_only=true) prepares the release: a failure is judged as a migrate's.
    if command == "rollback":
        requested = (record or {}).get("rollback_requested") or {}
        if not run_id or requested.get("by_run") != run_id:
            return EXIT_REFUSED  # no recorded run, a held lock, a host down: the rollback never started
        return EXIT_NEEDS_HUMAN
    # migrate (and a plan that prepared): the record is this run's once the lock was taken.
    if not record or not run_id or record.get("run_id") != run_id:
        return EXIT_REFUSED
    if record.get("result") == "rolled_back":
        return EXIT_ROLLED_BACK
    return EXIT_NEEDS_HUMAN  # result failed (the undo did not finish), or no result: interrupted


# ------------------------------------------------------------------------------------------ events
def _seconds(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# The long steps of a run, by the start of their task names in the roles (pg_backup, pg_restore,
# django_release): a progress bar on a terminal, their durations in the report (the next run's estimate).
LONG_STEPS = (
    ("Take a snapshot-consistent pg_dump", "backup"),
    ("Verify checksums, archive", "backup verify"),
    ("Copy the backup to", "backup copy"),
    ("Re-verify the backup's checksums", "restore check"),
    ("Restore the backup into a new database", "restore"),
    ("Build the wheels of", "wheelhouse build"),
    ("Fetch the wheelhouse tarball", "wheelhouse fetch"),
    ("Copy the wheelhouse tarball", "wheelhouse copy"),
    ("Install the requirements from the wheelhouse", "wheelhouse install"),
    ("Copy the virtualenv of the release", "venv copy"),
)
# Steps whose time grows with the database (an estimate from an earlier run is scaled by its size).
SIZED_STEPS = ("backup", "backup verify", "backup copy")


def long_step(task: str) -> str:
    """The long step a task is ("" for any other task)."""
    for prefix, step in LONG_STEPS:
        if task.startswith(prefix):
            return step
    return ""


def bytes_written(res: dict[str, Any]) -> int | None:
    """The bytes a running dump has written, from one poll of pg_backup's watch (a runner_retry event's
    result: `pg_snapshot_backup.py progress` prints {"bytes_written": N, ...}); None when that poll has no
    such figure (the reader failed, printed something else)."""
    if res.get("rc") != 0 or not isinstance(res.get("stdout"), str):
        return None
    try:
        polled = json.loads(res["stdout"])
    except ValueError:
        return None
    written = polled.get("bytes_written") if isinstance(polled, dict) else None
    if isinstance(written, bool) or not isinstance(written, int) or written < 0:
        return None
    return written


RESULT_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_unreachable": "unreachable",
    "runner_on_skipped": "skipped",
}


@dataclass
class Timeline:
    """What the runner events say about a run: stages (in order) with their hosts, batches, errors."""

    started: float | None = None
    ended: float | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    run_id: str = ""
    project: str = ""
    record: dict[str, Any] | None = None
    backups: dict[str, Any] | None = None
    serving: dict[str, str] = field(default_factory=dict)
    lock_status: dict[str, Any] | None = None
    messages: list[str] = field(default_factory=list)
    said: str = ""  # the last debug message: the run's own last word (finish's report, "nothing to do")
    long_steps: list[dict[str, Any]] = field(default_factory=list)
    db_size_bytes: int | None = None  # pg_backup's preflight: the database's size, and the dump it expects
    estimated_dump_bytes: int | None = None
    _plays: dict[str, int] = field(default_factory=dict)
    _play_key: str = ""
    _batch_hosts: dict[str, dict[int, list[str]]] = field(default_factory=dict)

    def stage(self, name: str) -> dict[str, Any]:
        for entry in self.stages:
            if entry["stage"] == name:
                return entry
        entry = {"stage": name, "plays": [], "started": None, "ended": None, "hosts": {}, "batches": 0}
        self.stages.append(entry)
        return entry

    def feed(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Take one runner event; returns what changed that a progress display may show:
        {"kind": "stage"|"batch"|"result"|"record", ...} or None."""
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        when = _seconds(event.get("created"))
        if when is not None:
            self.started = when if self.started is None else min(self.started, when)
            self.ended = when if self.ended is None else max(self.ended, when)
        if kind == "playbook_on_play_start":
            play = str(data.get("play") or data.get("name") or "")
            name = stage_of(play)
            # A play with `serial` starts once per batch, under the same uuid (the runner suffixes _k).
            base_uuid = str(data.get("play_uuid") or play).split("_")[0]
            repeats = self._plays.get(base_uuid, 0) + 1
            self._plays[base_uuid] = repeats
            self._play_key = base_uuid
            entry = self.stage(name)
            if play not in entry["plays"]:
                entry["plays"].append(play)
            if repeats > 1:
                entry["batches"] = max(entry["batches"], repeats)
                if repeats == 2:  # the play is batched: its first batch is batch 1
                    for host in self._batch_hosts.get(base_uuid, {}).get(1, []):
                        entry["hosts"][host]["batch"] = 1
                previous = self._batch_hosts.get(base_uuid, {}).get(repeats - 1, [])
                return {
                    "kind": "batch",
                    "stage": name,
                    "batch": repeats,
                    "play": play,
                    "previous": previous,
                    "done": sum(len(v) for k, v in self._batch_hosts.get(base_uuid, {}).items() if k < repeats),
                }
            return {"kind": "stage", "stage": name, "play": play, "pattern": data.get("play_pattern", "")}
        if kind in RESULT_EVENTS:
            return self._result(RESULT_EVENTS[kind], data, when)
        if kind == "playbook_on_stats":
            for key in ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored"):
                for host, count in (data.get(key) or {}).items():
                    self.stats.setdefault(host, {})[key if key != "dark" else "unreachable"] = count
        return None

    def _result(self, status: str, data: dict[str, Any], when: float | None) -> dict[str, Any] | None:
        host = str(data.get("host") or "?")
        play = str(data.get("play") or "")
        res = data.get("res") if isinstance(data.get("res"), dict) else {}
        if status == "ok" and res.get("changed"):
            status = "changed"
        action = str(data.get("resolved_action") or data.get("task_action") or "").rsplit(".", 1)[-1]
        if action in ("include_tasks", "import_tasks", "include_role", "meta") and status == "ok":
            status = "skipped"  # an include or meta task is no work of its own: a stage of only those did nothing
        delegated = (res.get("_ansible_delegated_vars") or {}).get("ansible_host")
        if delegated in ("localhost", "127.0.0.1") and host != "localhost" and status in ("ok", "changed"):
            status = "skipped"  # done on the controller for the play (a batches file, the run id): not this host's work
        entry = self.stage(stage_of(play))
        start, end = _seconds(data.get("start")), _seconds(data.get("end")) or when
        batch = self._plays.get(self._play_key, 1)
        slot = entry["hosts"].setdefault(
            host,
            {"started": start, "ended": end, "ok": 0, "changed": 0, "failed": 0, "unreachable": 0, "skipped": 0, "batch": None},
        )
        slot[status] += 1
        if status != "skipped":
            batches = self._batch_hosts.setdefault(self._play_key, {})
            if host not in batches.setdefault(batch, []):
                batches[batch].append(host)
                new_in_batch = True
            else:
                new_in_batch = False
            if batch > 1 or entry["batches"]:
                slot["batch"] = batch
        else:
            new_in_batch = False
        if start is not None and (slot["started"] is None or start < slot["started"]):
            slot["started"] = start
        if end is not None and (slot["ended"] is None or end > slot["ended"]):
            slot["ended"] = end
        if status != "skipped" and start is not None and end is not None:
            # The host's work in this play (and batch): one bar of the timeline per segment.
            segment = slot.setdefault("segments", {}).setdefault(f"{self._play_key}#{batch}", [start, end])
            segment[0], segment[1] = min(segment[0], start), max(segment[1], end)
        if end is not None and (entry["ended"] is None or end > entry["ended"]):
            entry["ended"] = end
        if start is not None and (entry["started"] is None or start < entry["started"]):
            entry["started"] = start
        change = self._watch(res, data, host)
        step = long_step(str(data.get("task") or ""))
        if step and status != "skipped" and start is not None and end is not None:
            self.long_steps.append(
                {
                    "step": step,
                    "host": host,
                    "task": str(data.get("task") or ""),
                    "stage": entry["stage"],
                    "seconds": round(end - start, 1),
                    "status": status,
                    **({"db_size_bytes": self.db_size_bytes} if step in SIZED_STEPS and self.db_size_bytes else {}),
                }
            )
        if status in ("failed", "unreachable") and not data.get("ignore_errors"):
            error = {
                "stage": entry["stage"],
                "host": host,
                "task": str(data.get("task") or ""),
                "role": str(data.get("role") or ""),
                "msg": _message(res),
                "status": status,
            }
            self.errors.append(error)
            return {"kind": "error", **error}
        if change:
            return change
        if status == "skipped":
            return None
        return {
            "kind": "result",
            "stage": entry["stage"],
            "host": host,
            "status": status,
            "task": str(data.get("task") or ""),
            "batch": batch,
            "new_in_batch": new_in_batch,
        }

    def _watch(self, res: dict[str, Any], data: dict[str, Any], host: str) -> dict[str, Any] | None:
        """The facts a report needs, as the run's own tasks return them."""
        facts = res.get("ansible_facts") if isinstance(res.get("ansible_facts"), dict) else {}
        if facts.get("djm_run_id") and not self.run_id:
            self.run_id = str(facts["djm_run_id"])
        action = str(data.get("resolved_action") or data.get("task_action") or "").rsplit(".", 1)[-1]
        if action == "deploy_run":
            args = (res.get("invocation") or {}).get("module_args") or {}
            if args.get("project"):
                self.project = str(args["project"])
            if isinstance(res.get("run"), dict):
                before = self.record
                self.record = res["run"]
                if before is not None:  # the first record seen is the one started, or read (rollback): no decision yet
                    said = decisions(before, self.record)
                    if said:
                        return {
                            "kind": "record",
                            "stage": stage_of(str(data.get("play") or "")),
                            "record": self.record,
                            "said": said,
                        }
            if "lock" in res and "last_run" in res:  # action read: status
                self.lock_status = {"lock": res.get("lock"), "last_run": res.get("last_run")}
        if action == "stat" and str(data.get("task") or "").startswith("Read the release link"):
            target = ((res.get("stat") or {}).get("lnk_target")) or ""
            self.serving[host] = target.rstrip("/").rsplit("/", 1)[-1] if target else ""
        if action == "script" and str(data.get("task") or "").startswith("List the backups"):
            try:
                self.backups = json.loads(res.get("stdout") or "{}")
            except ValueError:
                self.backups = None
        if action == "script" and str(data.get("task") or "").startswith("Run the preflight checks for backup"):
            try:
                preflight = json.loads(res.get("stdout") or "{}")
            except ValueError:
                preflight = {}
            if isinstance(preflight.get("db_size_bytes"), int):
                self.db_size_bytes = preflight["db_size_bytes"]
            if isinstance(preflight.get("estimated_dump_bytes"), int):
                self.estimated_dump_bytes = preflight["estimated_dump_bytes"]
        if action in ("debug", "assert") and isinstance(res.get("msg"), (str, list)):
            text = res["msg"] if isinstance(res["msg"], str) else "\n".join(map(str, res["msg"]))
            if text != "All assertions passed":
                self.messages.append(text)
            if action == "debug":
                self.said = text
        return None


def decisions(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What a record update decided, in words: the strategy, the undo mode and its end, the result."""
    said = []
    if after.get("strategy") and after.get("strategy") != before.get("strategy"):
        said.append(f"strategy {after['strategy']}: {after.get('strategy_reason', '')}")
    old, new = before.get("converge") or {}, after.get("converge") or {}
    if new.get("mode") and new.get("mode") != old.get("mode"):
        said.append(f"undo by {new['mode']}" + (f" to {new['to']}" if new.get("to") else ""))
    if new.get("failed") and new.get("failed") != old.get("failed"):
        said.append(f"undo failed: {new['failed']}")
    if after.get("result") and after.get("result") != before.get("result"):
        said.append(f"result {after['result']}")
    return said


def _message(res: dict[str, Any]) -> str:
    parts = []
    if res.get("msg"):
        parts.append(str(res["msg"]))
    stderr = [line for line in (res.get("stderr_lines") or []) if str(line).strip()]
    if stderr:
        parts.append(str(stderr[-1]))
    text = ": ".join(parts).strip()
    return text[:2000]


# ------------------------------------------------------------------------------------------ the report
def plan_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    plan = record.get("plan") or {}
    rows = []
    for migration in plan.get("migrations") or []:
        rows.append(
            {
                "migration": migration.get("migration"),
                "class": migration.get("class"),
                "reversible": migration.get("reversible"),
                "atomic": migration.get("atomic"),
                "operations": len(migration.get("operations") or []),
                "locking_risks": len(
                    [r for r in plan.get("locking_risks") or [] if r.get("migration") == migration.get("migration")]
                ),
            }
        )
    return rows


def build_report(
    command: str,
    timeline: Timeline,
    code: int,
    *,
    argv_summary: dict[str, Any],
    paths: dict[str, str],
    wall_started: str,
    seconds: float,
) -> dict[str, Any]:
    """The run report (JSON): stages with durations and hosts, plan, strategy, backup, migrations, result."""
    record = timeline.record or {}
    origin = timeline.started or 0.0

    def rel(value: float | None) -> float | None:
        return None if value is None else round(value - origin, 1)

    stages = []
    for entry in timeline.stages:
        hosts = {
            host: {
                "started": rel(slot["started"]),
                "ended": rel(slot["ended"]),
                "seconds": round(slot["ended"] - slot["started"], 1)
                if slot["started"] is not None and slot["ended"] is not None
                else None,
                **{k: slot[k] for k in ("ok", "changed", "failed", "unreachable", "skipped")},
                **({"batch": slot["batch"]} if slot.get("batch") else {}),
                "segments": [[rel(a), rel(b)] for a, b in sorted((slot.get("segments") or {}).values())],
            }
            for host, slot in entry["hosts"].items()
        }
        started, ended = entry["started"], entry["ended"]
        stages.append(
            {
                "stage": entry["stage"],
                "plays": entry["plays"],
                "started": rel(started),
                "ended": rel(ended),
                "seconds": round(ended - started, 1) if started is not None and ended is not None else None,
                "hosts": hosts,
                "batches": entry["batches"] or None,
                "failed": any(h["failed"] or h["unreachable"] for h in hosts.values()),
                "ran": any(h["ok"] or h["changed"] or h["failed"] or h["unreachable"] for h in hosts.values()),
            }
        )
    converge = record.get("converge") or {}
    applied = record.get("applied") or converge.get("applied") or []
    report: dict[str, Any] = {
        "format": 1,
        "command": command,
        "project": timeline.project or None,
        "run_id": timeline.run_id or None,
        "record_run_id": record.get("run_id"),
        "started": wall_started,
        "seconds": round(seconds, 1),
        "exit_code": code,
        "exit_meaning": EXIT_MEANINGS[code],
        "result": record.get("result") if record.get("run_id") == timeline.run_id or command == "rollback" else None,
        "arguments": argv_summary,
        "from_release": record.get("from_release"),
        "to_release": record.get("to_release"),
        "serving": record.get("serving"),
        "strategy": record.get("strategy"),
        "strategy_reason": record.get("strategy_reason"),
        "backup_id": record.get("backup_id"),
        "backup": (record.get("stages") or {}).get("backup"),
        "migrations_applied": applied,
        "plan": plan_rows(record),
        "deferred_statements": [
            {k: s.get(k) for k in ("migration", "kind", "table", "column", "deferred_sql", "interim_sql")}
            for s in (record.get("plan") or {}).get("deferred_statements") or []
        ],
        "record_stages": stage_seconds(record),
        "stages": stages,
        "hosts": sorted({h for s in stages for h in s["hosts"]}),
        "host_stats": timeline.stats,
        "errors": timeline.errors,
        "failure": record.get("failure"),
        "converge": converge or None,
        "validation": record.get("validation"),
        "restored": record.get("restored"),
        "maintenance": record.get("maintenance"),
        "contract_pending": record.get("contract_pending"),
        "said": timeline.said or None,
        "long_steps": timeline.long_steps,
        "database_size_bytes": timeline.db_size_bytes,
        "load": None,  # the load check, when one is given (load_check)
        "record": record or None,
        "paths": paths,
    }
    return report


# ------------------------------------------------------------------------------------------ estimates
def mib(size: float) -> str:
    return f"{size / 2**20:.0f} MiB"


def earlier_long_steps(reports_dir: Path, project: str, run_id: str, newest: int = 20) -> tuple[str, list[dict[str, Any]]]:
    """The long steps of the newest earlier report of the project that has some (reports written by this
    djm onwards): (its run id, its steps); ("", []) when there is none."""
    try:
        files = sorted((reports_dir / project).glob("*.json"), key=lambda f: f.stat().st_mtime, reverse=True)
    except OSError:
        return "", []
    for path in files[:newest]:
        if run_id and path.stem == run_id:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        steps = data.get("long_steps") if isinstance(data, dict) else None
        if steps:
            return str(data.get("run_id") or path.stem), steps
    return "", []


def estimate(earlier: tuple[str, list[dict[str, Any]]], step: str, host: str, db_size: int | None) -> dict[str, Any] | None:
    """How long a long step should take, from the same step in an earlier run (on the same host when it
    ran there; its longest otherwise), scaled by the database's size for the backup steps when both
    sizes are known. {"seconds", "label"} (the label says where the figure comes from), or None."""
    run_id, steps = earlier
    done = [s for s in steps if s.get("step") == step and s.get("status") in ("ok", "changed") and s.get("seconds")]
    same = [s for s in done if s.get("host") == host] or done
    if not same:
        return None
    before = max(same, key=lambda s: float(s["seconds"]))
    seconds = float(before["seconds"])
    label = f"estimate: run {run_id} took {seconds:.0f} s"
    if step in SIZED_STEPS and db_size and before.get("db_size_bytes"):
        seconds = seconds * db_size / float(before["db_size_bytes"])
        label += f" at {mib(before['db_size_bytes'])}, scaled to {mib(db_size)}"
    return {"seconds": seconds, "label": label}


# ------------------------------------------------------------------------------------------ load check
def load_check(summary_path: str, verify_path: str | None, run_start: float, run_end: float) -> dict[str, Any]:
    """The load check of a run, from scripts/loadgen.py's files: its summary (`loadgen.py run --summary
    FILE`, or `loadgen.py summary --json`) and, optionally, its order check (`loadgen.py verify --json`).
    run_start/run_end: the run's wall clock (epoch seconds). A summary whose window does not overlap the
    run is not counted as this run's (its figures are left out and the reason given); nothing is
    guessed: orders missing stay None (not checked) without a verify file."""
    check: dict[str, Any] = {"summary_file": summary_path, "verify_file": verify_path, "problems": []}
    try:
        summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        check["problems"].append("no summary file (loadgen writes it when it stops: is it still running?)")
        return check
    except (OSError, ValueError) as exc:
        check["problems"].append(f"the summary cannot be read: {exc}")
        return check
    needed = ("total", "ok", "failed", "failures_by_status", "failures_by_kind", "window")
    if not isinstance(summary, dict) or any(key not in summary for key in needed):
        check["problems"].append("not a loadgen.py summary (keys total, failed, failures_by_status, window...)")
        return check
    window = summary.get("window") or {}
    start, end = window.get("start"), window.get("end")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):
        covered = min(end, run_end) - max(start, run_start)
        check["window"] = {"start": start, "end": end, "covers_run_seconds": round(max(0.0, covered), 1)}
        if covered <= 0:
            check["problems"].append(
                "the load window does not overlap this run (another run's load check?): its figures are not counted"
            )
            return check
    else:
        check["problems"].append("the summary has no window (no request recorded?)")
    check.update(
        {
            "url": summary.get("url"),
            "stopped_by": summary.get("stopped_by"),
            "requests": summary["total"],
            "ok": summary["ok"],
            "failed": summary["failed"],
            "failures_by_status": summary["failures_by_status"],
            "failures_by_kind": summary["failures_by_kind"],
            "errors": dict(list((summary.get("errors") or {}).items())[:5]),
            "orders_acknowledged": summary.get("orders_acknowledged"),
            "orders_found": None,
            "orders_missing": None,  # None: not checked (no verify file)
        }
    )
    if verify_path:
        try:
            verified = json.loads(Path(verify_path).read_text(encoding="utf-8"))
            check["orders_found"] = int(verified["found"])
            check["orders_missing"] = [int(i) for i in verified["missing"]]
            check["orders_table"] = verified.get("table")
            if verified.get("acknowledged") != summary.get("orders_acknowledged"):
                check["problems"].append(
                    f"the verify file checked {verified.get('acknowledged')} orders, the summary acknowledged "
                    f"{summary.get('orders_acknowledged')}: not the same load?"
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            check["problems"].append(f"the verify file cannot be read ({type(exc).__name__}: {exc}); orders not checked")
    return check


def load_line(check: dict[str, Any]) -> list[str]:
    """The load check in a few words, for the summary: requests and failures, the failures by kind and
    status, the orders; and what is wrong with the files."""
    lines = []
    if check.get("requests") is not None:
        missing = check.get("orders_missing")
        orders = (
            f"orders {check.get('orders_acknowledged')} acknowledged, "
            + ("not checked against the database" if missing is None else f"{len(missing)} missing")
            + (f" ({', '.join(map(str, missing[:10]))}{'...' if len(missing) > 10 else ''})" if missing else "")
        )
        lines.append(f"{check['requests']} requests, {check['failed']} failed; {orders}")
        by_kind = ", ".join(
            f"{kind} {status}: {count}"
            for kind, counts in sorted(check["failures_by_kind"].items())
            for status, count in counts.items()
        )
        if by_kind:
            lines.append(f"failed    {by_kind} (status 0: no answer)")
    lines += [f"problem   {problem}" for problem in check.get("problems") or []]
    return lines


# ------------------------------------------------------------------------------------------ HTML
STAGE_COLOURS = {
    "validate": "#9e9e9e",
    "preflight": "#607d8b",
    "lock": "#795548",
    "prepare": "#3f51b5",
    "plan": "#009688",
    "maintenance": "#ff9800",
    "backup": "#8bc34a",
    "migrate": "#e91e63",
    "switch": "#2196f3",
    "contract": "#9c27b0",
    "verify": "#4caf50",
    "converge": "#f44336",
    "finish": "#455a64",
    "interrupted runs": "#ff5722",
    "undo": "#f44336",
}


def _colour(stage: str) -> str:
    if stage in STAGE_COLOURS:
        return STAGE_COLOURS[stage]
    return "#%06x" % (abs(hash(stage)) % 0xFFFFFF)


def _cell(value: Any) -> str:
    if value is None:
        return "<td class=dim>-</td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, (list, dict)):
        return f"<td><code>{html.escape(json.dumps(value, sort_keys=True))}</code></td>"
    return f"<td>{html.escape(str(value))}</td>"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "<p class=dim>none</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page of the run (no script, no external file): summary, stage timeline per
    host, stages, plan, fingerprint comparison, errors."""
    esc = html.escape
    code = report["exit_code"]
    badge = {0: "ok", 1: "warn", 2: "bad", 3: "warn"}[code]
    total = max([report.get("seconds") or 0.0] + [s["ended"] or 0.0 for s in report["stages"]]) or 1.0
    hosts = report["hosts"]

    # The timeline: one row per host, one bar per stage the host took part in.
    rows = []
    for host in hosts:
        bars = []
        for stage in report["stages"]:
            slot = stage["hosts"].get(host)
            if not slot:
                continue
            failed = slot["failed"] or slot["unreachable"]
            for started, ended in slot.get("segments") or []:
                left = 100.0 * started / total
                width = max(0.4, 100.0 * (ended - started) / total)
                title = (
                    f"{stage['stage']} on {host}: {started}s to {ended}s ({ended - started:.1f} s)"
                    + (f", batch {slot['batch']}" if slot.get("batch") else "")
                    + (" FAILED" if failed else "")
                )
                bars.append(
                    f'<div class="bar{" failed" if failed else ""}" style="left:{left:.2f}%;width:{width:.2f}%;'
                    f'background:{_colour(stage["stage"])}" title="{esc(title)}"></div>'
                )
        rows.append(f"<div class=row><div class=host>{esc(host)}</div><div class=lane>{''.join(bars)}</div></div>")
    legend = "".join(
        f'<span class=key><span class=swatch style="background:{_colour(s["stage"])}"></span>{esc(s["stage"])}</span>'
        for s in report["stages"]
    )
    ticks = "".join(
        f'<span class=tick style="left:{100.0 * t / total:.2f}%">{t:.0f}s</span>' for t in [total * i / 5 for i in range(6)]
    )

    summary = [
        ["project", report.get("project")],
        ["command", report.get("command")],
        ["run", report.get("run_id")],
        ["run undone" if report.get("command") == "rollback" else "record", report.get("record_run_id")],
        ["started (UTC)", report.get("started")],
        ["duration", f"{report.get('seconds')} s"],
        ["result", report.get("result")],
        ["exit code", f"{code}: {report.get('exit_meaning')}"],
        ["stopped", " · ".join(" ".join(str(a).split()) for a in (report.get("interrupted") or {}).get("advice") or []) or None],
        ["the run's last word", report.get("said")],
        ["releases", f"{report.get('from_release') or '-'} → {report.get('to_release') or '-'}"],
        ["serving now", report.get("serving")],
        ["strategy", f"{report.get('strategy') or '-'} ({report.get('strategy_reason') or '-'})"],
        ["backup", report.get("backup_id")],
        ["migrations applied", len(report.get("migrations_applied") or [])],
        ["undo", report.get("converge")],
        ["failure", report.get("failure")],
        ["maintenance window", report.get("maintenance")],
        ["load check", "; ".join(load_line(report["load"])) if report.get("load") else None],
    ]
    summary_html = "".join(f"<tr><th>{esc(k)}</th>{_cell(v)}</tr>" for k, v in summary)
    stage_rows = [
        [
            s["stage"],
            s["started"],
            s["seconds"],
            (report.get("record_stages") or {}).get(s["stage"]),
            ", ".join(sorted(s["hosts"])),
            s["batches"],
            "FAILED" if s["failed"] else "ok" if s["ran"] else "skipped",
        ]
        for s in report["stages"]
        if s["hosts"]
    ]
    plan_rows_html = [
        [p["migration"], p["class"], p["reversible"], p["atomic"], p["operations"], p["locking_risks"]] for p in report["plan"]
    ]
    deferred = [
        [d["migration"], d["kind"], d["table"], d["column"], " ".join(d["deferred_sql"] or [])]
        for d in report["deferred_statements"]
    ]
    comparison = []
    validation = report.get("validation") or {}
    if validation:
        comparison += [
            ["compared against backup", validation.get("against")],
            ["schema equal to the backup's", validation.get("schema_equal")],
            ["django_migrations equal to the backup's", validation.get("migrations_equal")],
            ["tables users wrote since (rows)", validation.get("tables_changed")],
            ["indexes renamed", validation.get("renamed_indexes")],
        ]
    restored = report.get("restored") or {}
    if restored:
        comparison += [
            ["restored backup (fingerprints proven before the swap)", restored.get("backup_id")],
            ["replaced database kept as", restored.get("failed_db")],
            ["rows exported before the restore", restored.get("export")],
        ]
    backup = report.get("backup") or {}
    if backup:
        comparison += [["backup of this run", {k: backup.get(k) for k in ("bytes", "files", "verified") if k in backup}]]
    comparison_html = "".join(f"<tr><th>{esc(k)}</th>{_cell(v)}</tr>" for k, v in comparison) or ""
    errors = [[e["stage"], e["host"], e["task"], e["msg"]] for e in report["errors"]]
    long_rows = [
        [
            step.get("step"),
            step.get("host"),
            step.get("stage"),
            step.get("seconds"),
            step.get("status"),
            mib(step["db_size_bytes"]) if step.get("db_size_bytes") else None,
        ]
        for step in report.get("long_steps") or []
    ]
    load = report.get("load")
    if not load:
        load_html = "<p class=dim>no load check given (djm migrate/rollback --load-summary, or djm report)</p>"
    else:
        missing = load.get("orders_missing")
        rows_load = [
            ["summary file", load.get("summary_file")],
            ["verify file", load.get("verify_file")],
            ["target", load.get("url")],
            ["requests", load.get("requests")],
            ["failed", load.get("failed")],
            ["failures by status (0: no answer)", load.get("failures_by_status")],
            ["failures by kind and status", load.get("failures_by_kind")],
            ["most frequent errors", load.get("errors")],
            ["orders acknowledged", load.get("orders_acknowledged")],
            ["orders missing from the database", "not checked" if missing is None else len(missing)],
            ["missing order ids", missing or None],
            ["seconds of the run under load", (load.get("window") or {}).get("covers_run_seconds")],
            ["problems", load.get("problems") or None],
        ]
        load_html = "<table>" + "".join(f"<tr><th>{esc(k)}</th>{_cell(v)}</tr>" for k, v in rows_load) + "</table>"

    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<title>{esc(str(report.get("project") or ""))} {esc(str(report.get("command")))} {esc(str(report.get("run_id") or ""))}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}}
h1{{font-size:1.4em}} h2{{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}}
table{{border-collapse:collapse;margin:.5em 0}} th,td{{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}}
th{{background:#f5f5f5}} code{{font-size:12px;white-space:pre-wrap;word-break:break-word}} .dim{{color:#999}}
.badge{{padding:2px 8px;border-radius:4px;color:#fff}}
.ok{{background:#2e7d32}} .warn{{background:#ef6c00}} .bad{{background:#c62828}}
.row{{display:flex;align-items:center;height:22px}} .host{{width:90px;font-family:monospace}}
.lane{{position:relative;flex:1;height:16px;background:#fafafa;border:1px solid #eee}}
.bar{{position:absolute;top:1px;height:14px;border-radius:2px;opacity:.9}} .bar.failed{{outline:2px solid #c62828}}
.axis{{position:relative;margin-left:90px;height:18px;font-size:11px;color:#777}} .tick{{position:absolute}}
.key{{margin-right:12px;font-size:12px}} .swatch{{display:inline-block;width:10px;height:10px;margin-right:4px}}
</style></head><body>
<h1>{esc(str(report.get("project") or "?"))}: {esc(str(report.get("command")))}
<span class="badge {badge}">exit {code}</span></h1>
<p>{esc(report.get("exit_meaning") or "")}</p>
<h2>Summary</h2><table>{summary_html}</table>
<h2>Stage timeline per host</h2>
<div>{"".join(rows)}</div><div class=axis>{ticks}</div><p>{legend}</p>
<h2>Stages</h2>
{_table(["stage", "start (s)", "seconds (events)", "seconds (run record)", "hosts", "batches", "status"], stage_rows)}
<h2>Plan</h2>
{_table(["migration", "class", "reversible", "atomic", "operations", "locking risks"], plan_rows_html)}
<h3>Deferred statements (two_phase contract)</h3>
{_table(["migration", "operation", "table", "column", "deferred SQL"], deferred)}
<h2>Data proof: backup and fingerprint comparison</h2>
{f"<table>{comparison_html}</table>" if comparison_html else "<p class=dim>the run record holds no comparison (no undo ran)</p>"}
<h2>Long steps</h2>
{_table(["step", "host", "stage", "seconds", "status", "database size"], long_rows)}
<h2>Load check (scripts/loadgen.py)</h2>
{load_html}
<h2>Migrations applied</h2>
{_table(["migration"], [[m] for m in report.get("migrations_applied") or []])}
<h2>Errors</h2>
{_table(["stage", "host", "task", "message"], errors)}
<p class=dim>JSON report: {esc(report["paths"].get("json", ""))} · event log: {esc(report["paths"].get("events", ""))}
· ansible output: {esc(report["paths"].get("log", ""))}</p>
</body></html>
"""


def batch_total(done_before: int, batch: int, batch_size: int, total: int) -> int:
    """An estimate of the number of batches of a serial play: the batches so far, and the hosts left
    in batches the size of the last one (a canary batch of one, then migrate_serial)."""
    left = max(0, total - done_before - batch_size)
    return batch + math.ceil(left / max(1, batch_size))


def write_report(report: dict[str, Any]) -> None:
    """Write the report's JSON and HTML files where report["paths"] says (mode 0640)."""
    for kind, text in (("json", json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"), ("html", render_html(report))):
        path = Path(report["paths"][kind])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o640)
        tmp.replace(path)
