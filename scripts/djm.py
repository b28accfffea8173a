#!/usr/bin/env python3
"""djm: plan, migrate, roll back and inspect a Django + PostgreSQL fleet, with live progress and a run report.

Every command runs this repository's playbooks through ansible-runner (its Python API: events, not
parsed output), against the inventory you name, so it works for any project's inventory exactly as
`ansible-playbook` does; plain `ansible-playbook migrate.yml` and `rollback.yml` keep working.

  djm plan     [RELEASE]   migrate.yml --check: preflight, lock check, the migration plan and the
                           strategy; writes nothing (--prepare: -e migrate_plan_only=true instead,
                           which prepares the release on the app hosts so the plan can be computed)
  djm migrate  [RELEASE]   migrate.yml: the whole run (README "Operating a fleet")
  djm rollback             rollback.yml: undo the last run from its record
  djm status               release per app host, the deploy lock, the last run and its result, the
                           newest verified backup and its age (playbooks/status.yml; read-only)
  djm backups list         the backups on the first db host, newest first (playbooks/backups.yml)
  djm backups verify [ID]  re-read a backup against its manifest as a restore would (pg_restore's
                           check; default: the newest verified)
  djm report RUN.json      add a load check (--load-summary, --load-verify) to a run report written before

Common options (each command): -i INVENTORY (repeatable; default: ansible.cfg's, the local fleet),
-e VARS (repeatable, as ansible-playbook's -e), --vault-id / --vault-password-file, -v (more
ansible verbosity in the saved output), --output (show ansible's own output instead of the progress).

While it runs: one line per stage as it starts (elapsed time, stage, hosts), the rolling switch's
batches (batch k/n and its hosts), every failure as it happens; on a terminal, a long step (backup,
restore, wheelhouse) shows a bar of its time against the same step of the project's last report,
marked as an estimate. Ctrl-C cancels the run (ansible-runner stops ansible-playbook within a second)
and says what it left: the deploy lock, and `djm rollback` to finish the run; a second Ctrl-C kills
ansible-playbook and stops at once. At the end: a summary table of the
stages (duration, hosts, status) and, for plan/migrate/rollback, the run report:
  build/reports/<project>/<run id>.json   stages with durations per host, plan, strategy, backup,
                                          migrations applied, undo, failure, result, the run record;
                                          the load check with --load-summary (or `djm report`)
  build/reports/<project>/<run id>.html   the same as one self-contained page (a stage timeline
                                          per host, the plan table, the fingerprint comparison)
  build/reports/<project>/<run id>.log    ansible's own output of the run
  build/events/<project>/<run id>.jsonl   the JSON event log (plugins/callback/djm_events.py)

Exit codes:
  0  success (a plan shown, a run succeeded or had nothing to do, a rollback done or not needed,
     status read, backup verified)
  1  failed, and rolled back cleanly: the run's undo finished, every app host serves the release it
     started from (the report says why it failed and how it was undone)
  2  failed, and needs a human: the undo did not finish, the run was interrupted, a rollback did not
     complete, or a backup failed verification (read the report; then `djm rollback` or the runbook)
  3  refused before any change: bad arguments or inventory, an unreachable host in preflight, the
     deploy lock held by another run, nothing to undo; or status/list could not be read
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import djm_report  # noqa: E402
from djm_report import EXIT_OK, EXIT_REFUSED, Timeline  # noqa: E402

VERSION = "1"
RUNS_STARTED = 0  # playbook runs started by this process: a crash after one may have left changes


class Refused(Exception):
    """Bad arguments: exit 3, nothing was run."""


class ForceStopped(BaseException):
    """A second Ctrl-C: djm stops at once, without waiting for ansible-runner to return. A
    BaseException, as KeyboardInterrupt is: the `except Exception` that keeps a display bug from
    stopping a migration (on_event, the tick) must not swallow it."""


class Interrupts:
    """Ctrl-C (SIGINT) for the whole of djm's life. Installed first thing in main(), so a SIGINT is
    never lost: a job started in the background by a non-interactive shell inherits SIGINT *ignored*,
    and only a handler of our own undoes that (while the handler was set only around the runner, a
    Ctrl-C during djm's start was ignored: the likely cause of the one lost in three tries on a
    backgrounded `djm plan`).

    First Ctrl-C: cancel_requested() turns true; ansible-runner polls it (cancel_callback, every
    RUNNER_POLL_SECONDS) and kills ansible-playbook's process group, the run ends `canceled`, and
    djm writes the report and says what was left (the deploy lock, and how to finish the run).
    Before the runner starts, the run is not started at all. Second Ctrl-C: ansible-playbook's
    process group is killed here (its pid is in every runner event) and ForceStopped is raised."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.previous: Any = None
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.running = False
        self.workers_stopped = False
        self.child_pid: int | None = None

    def install(self) -> None:
        self.previous = signal.signal(signal.SIGINT, self.handle)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def cancel_requested(self) -> bool:
        """ansible-runner's cancel_callback. Before it says yes, the workers are stopped: ansible-core
        (2.19) runs each task in a worker process of a session of its own, which the runner's kill of
        ansible-playbook's process group misses; left alone, a worker finishes its task (the rest of a
        loop, a command on the controller) after the run is reported cancelled."""
        if self.count and self.running and not self.workers_stopped:
            self.workers_stopped = True
            killed = self.kill_workers()
            if killed:
                self.say(f"stopped {len(killed)} ansible worker(s) still running a task (pid {', '.join(map(str, killed))})")
        return self.count > 0

    def say(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(f"\ndjm: {text}\n")
        stream.flush()

    def handle(self, _sig: int, _frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            if self.running:
                self.say(
                    "Ctrl-C: cancelling the run; ansible-runner stops ansible-playbook within "
                    f"{RUNNER_POLL_SECONDS} s, then the report is written (Ctrl-C again to force-stop)"
                )
            else:
                self.say("Ctrl-C: no playbook is running; stopping (Ctrl-C again to quit at once)")
            return
        killed = self.kill_child()
        self.say("second Ctrl-C: force-stop" + (f", ansible-playbook's process group (pid {killed}) killed" if killed else ""))
        raise ForceStopped

    def kill_workers(self) -> list[int]:
        """SIGKILL the process groups of ansible-playbook's children that are not in its own group
        (its workers, each with what it started); never djm's group. The workers' pids."""
        if not self.child_pid or not self.running or self.child_pid == os.getpid():
            return []
        try:
            parent_group = os.getpgid(self.child_pid)
        except (ProcessLookupError, PermissionError):
            return []
        killed = []
        for pid, group in children(self.child_pid):
            if group in (parent_group, os.getpgrp()):
                continue
            try:
                os.killpg(group, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                continue
        return killed

    def kill_child(self) -> int | None:
        """SIGKILL ansible-playbook's process group (pexpect makes it a session of its own; never
        djm's own group). The pid, or None when there was nothing to kill."""
        pid = self.child_pid
        if not pid or not self.running or pid == os.getpid():
            return None
        self.kill_workers()
        try:
            group = os.getpgid(pid)
            if group == os.getpgrp():
                os.kill(pid, signal.SIGKILL)
            else:
                os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return None
        return pid


def children(parent: int) -> list[tuple[int, int]]:
    """(pid, process group) of each child process of `parent`, from /proc (Linux; elsewhere none)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[1] == str(parent):  # state, ppid, pgrp
            found.append((int(entry.parent.name), int(fields[2])))
    return found


INTERRUPTS = Interrupts()
RUNNER_POLL_SECONDS = 1  # ansible-runner's pexpect_timeout: how often it asks cancel_callback (its default is 5)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"djm: {message}\n")
        sys.exit(EXIT_REFUSED)


# ------------------------------------------------------------------------------------------ progress
class Progress:
    """Lines on stdout from runner events: a stage when its first host reports (a stage whose tasks
    all skip is not shown), the batches of a serial play, every failure; on a terminal, a status line
    (stage, host, task, elapsed) rewritten in place.

    On a terminal only, a long step (djm_report.LONG_STEPS: the dump, its verification and copy, a
    restore and its check, the wheelhouse) shows a bar of its elapsed time against an estimate: the
    same step in the newest earlier report of the project (scaled by the database's size for the
    backup steps when both sizes are known), labelled as such; without one, the elapsed time alone.
    Ansible reports nothing while a task runs, except the polls of an until loop (runner_retry
    events): pg_backup watches its dump with one, so the backup's bar is the bytes written so far
    against the dump's expected size (pg_backup's preflight estimate), or against the database's size
    when there is no estimate (labelled: a compressed dump is smaller), once the first poll says."""

    def __init__(
        self,
        timeline: Timeline,
        stream: Any = sys.stdout,
        live: bool | None = None,
        reports_dir: Path | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.timeline = timeline
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.clock = clock
        self.started = clock()
        self.reports_dir = reports_dir
        self.steps: dict[tuple[str, str], dict[str, Any]] = {}  # (host, task) -> the long step going there
        self.earlier: tuple[str, list[dict[str, Any]]] | None = None
        self.drawn = 0.0
        self.pending: dict[str, Any] = {}
        self.shown = ""
        self.shown_play = ""
        self.status = ""
        self.batch_size = 1
        self.batch_done = 0

    def elapsed(self) -> str:
        return f"{self.clock() - self.started:6.0f}s"

    def line(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(f"{self.elapsed()}  {text}\n")
        if self.live and self.status:
            self.stream.write(self.status[: shutil.get_terminal_size().columns - 1])
        self.stream.flush()

    def transient(self, text: str) -> None:
        self.status = f"{self.elapsed()}  {text}"
        if self.live:
            self.stream.write("\r\033[K" + self.status[: shutil.get_terminal_size().columns - 1])
            self.stream.flush()

    def total_hosts(self) -> int:
        return len((self.timeline.record or {}).get("hosts") or []) or 1

    def step_started(self, host: str, task: str) -> None:
        step = djm_report.long_step(task)
        if not step or not self.live:
            return
        if self.earlier is None and self.reports_dir is not None and self.timeline.project:
            self.earlier = djm_report.earlier_long_steps(self.reports_dir, self.timeline.project, self.timeline.run_id)
        guess = djm_report.estimate(self.earlier or ("", []), step, host, self.timeline.db_size_bytes)
        self.steps[(host, task)] = {"step": step, "host": host, "started": self.clock(), "estimate": guess}
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        """Redraw the long step's bar (at most once a second): called on each event and by the runner's
        cancel_callback, which it asks every RUNNER_POLL_SECONDS while ansible is silent."""
        if not self.live or not self.steps:
            return
        now = self.clock()
        if not force and now - self.drawn < 1.0:
            return
        self.drawn = now
        self.transient(self.bar(now))

    def bar(self, now: float) -> str:
        first = min(self.steps.values(), key=lambda s: s["started"])
        hosts = [s["host"] for s in self.steps.values() if s["step"] == first["step"]]
        took = now - first["started"]
        text = f"{first['step']:<12} {hosts[0] if len(hosts) == 1 else f'{len(hosts)} hosts'}  "
        written = first.get("bytes")
        size, dump = self.timeline.db_size_bytes, self.timeline.estimated_dump_bytes
        whole = dump or size
        if written is not None and whole:
            share = written / whole
            filled = round(min(1.0, share) * 20)
            text += f"[{'#' * filled}{'.' * (20 - filled)}] {djm_report.mib(written)} of ~{djm_report.mib(whole)}"
            text += f" ({share:.0%}{', over the estimate' if share > 1 else ''})  {took:.0f}s  "
            if dump:
                text += "expected dump: pg_backup's preflight estimate"
                return text + (f"; database {djm_report.mib(size)}" if size else "")
            return text + "of the database's size: a compressed dump is smaller"
        guess = first["estimate"]
        if guess:
            share = min(1.0, took / guess["seconds"]) if guess["seconds"] > 0 else 1.0
            filled = round(share * 20)
            text += f"[{'#' * filled}{'.' * (20 - filled)}] {took:.0f}s of ~{guess['seconds']:.0f}s"
            text += (" (over the estimate)" if took > guess["seconds"] else "") + f"  {guess['label']}"
        else:
            text += f"{took:.0f}s (no earlier run of this step to estimate from)"
        if first["step"] in djm_report.SIZED_STEPS and size:
            text += f"; database {djm_report.mib(size)}" + (f", dump ~{djm_report.mib(dump)}" if dump else "")
        if written is not None:
            text += f"; {djm_report.mib(written)} written"
        return text

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        data = event.get("event_data") or {}
        if kind == "runner_on_start":
            self.step_started(str(data.get("host") or "?"), str(data.get("task") or ""))
        elif kind == "runner_retry" and self.steps:
            step = self.steps.get((str(data.get("host") or "?"), str(data.get("task") or "")))
            res = data.get("res") if isinstance(data.get("res"), dict) else {}
            written = djm_report.bytes_written(res) if step else None
            if step is not None and written is not None:
                step["bytes"] = written
        elif kind in djm_report.RESULT_EVENTS and self.steps:
            self.steps.pop((str(data.get("host") or "?"), str(data.get("task") or "")), None)
            if not self.steps:
                self.status = ""
        self.show(self.timeline.feed(event), event)
        if self.steps:
            self.tick(force=True)  # the bar stays on the status line while a long step goes on

    def show(self, change: dict[str, Any] | None, event: dict[str, Any]) -> None:
        if change is None:
            if event.get("event") == "playbook_on_task_start":
                task = (event.get("event_data") or {}).get("task", "")
                self.transient(f"{self.pending.get('stage', ''):<12} {task}")
            return
        kind = change["kind"]
        if kind == "stage":
            self.pending = change
        elif kind == "batch":
            previous = change["previous"]
            if change["batch"] == 2:
                self.batch_size = max(1, len(previous))
                total = djm_report.batch_total(0, 1, self.batch_size, self.total_hosts())
                self.line(f"  {change['stage']:<12} batch 1/{total}: {', '.join(previous)} done")
            self.batch_size = max(1, len(previous))
            self.batch_done = change["done"]
            self.pending = {**self.pending, "batch": change["batch"]}
        elif kind in ("result", "error", "record"):
            stage = change["stage"]
            play = str(self.pending.get("play", ""))
            if stage != self.shown and self.pending.get("stage") == stage:
                self.shown, self.shown_play = stage, play
                self.line(f"▸ {stage:<12} {self.pending.get('pattern', '')}   ({play})")
            elif stage == self.shown and play != self.shown_play and self.pending.get("stage") == stage:
                self.shown_play = play  # another play of the same stage: say what it does
                self.line(f"  {stage:<12} {play.split(' - ', 1)[-1]}")
            if kind == "result" and change.get("new_in_batch") and change["batch"] > 1:
                total = djm_report.batch_total(self.batch_done, change["batch"], self.batch_size, self.total_hosts())
                self.line(f"  {stage:<12} batch {change['batch']}/{total}: {change['host']}")
            if kind == "error":
                self.line(f"✗ {stage:<12} {change['host']}: {change['task']}: {change['msg'][:400]}")
            elif kind == "record":
                for said in change["said"]:
                    self.line(f"  {stage:<12} {said}")
            else:
                self.transient(f"{stage:<12} {change['host']} {change['status']}: {change['task']}")

    def finish(self) -> None:
        self.steps.clear()
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


# ------------------------------------------------------------------------------------------ running
def ansible_args(args: argparse.Namespace) -> list[str]:
    """What is passed through to ansible-playbook, besides -i: -e, vault options, verbosity."""
    out: list[str] = []
    for value in args.extra_vars or []:
        out += ["-e", value]
    for value in args.vault_id or []:
        out += ["--vault-id", value]
    if args.vault_password_file:
        out += ["--vault-password-file", str(Path(args.vault_password_file).expanduser().resolve())]
    if args.verbose:
        out.append("-" + "v" * args.verbose)
    return out


def inventories(args: argparse.Namespace) -> list[str] | None:
    """-i as given, paths made absolute (the playbooks run from the repository root); None: ansible.cfg's."""
    if not args.inventory:
        return None
    result = []
    for item in args.inventory:
        path = Path(item).expanduser()
        # A host list ("h1,h2,") stays as it is; a path is resolved from where djm was started.
        result.append(item if ("," in item and not path.exists()) else str(path.resolve()))
    return result


def extra_var_names(args: argparse.Namespace) -> list[str]:
    """The names of the -e variables (never their values: a -e may carry a secret)."""
    names = []
    for value in args.extra_vars or []:
        if value.startswith("@"):
            names.append(value)
        elif value.lstrip().startswith("{"):
            names.append("<json>")
        else:
            names += [part.split("=", 1)[0] for part in shlex.split(value) if "=" in part]
    return names


def run_playbook(
    playbook: str, args: argparse.Namespace, extra: list[str], timeline: Timeline, progress: Progress | None
) -> tuple[bool, str, Path]:
    """Run a playbook of this repository with ansible-runner; every event goes through the timeline
    (and the progress display). Returns (succeeded, runner status, path of ansible's output kept)."""
    import ansible_runner  # imported here: --help works without it

    global RUNS_STARTED
    private = Path(tempfile.mkdtemp(prefix="djm-runner-"))
    events_file = REPO / "build" / "events" / f".running-{os.getpid()}.jsonl"
    events_file.parent.mkdir(parents=True, exist_ok=True)
    envvars = {
        "ANSIBLE_CONFIG": os.environ.get("ANSIBLE_CONFIG", str(REPO / "ansible.cfg")),
        # ansible-runner turns host key checking off unless told: keep ansible.cfg's (on).
        "ANSIBLE_HOST_KEY_CHECKING": os.environ.get("ANSIBLE_HOST_KEY_CHECKING", "True"),
        "ANSIBLE_CALLBACK_PLUGINS": str(REPO / "plugins" / "callback"),
        "ANSIBLE_CALLBACKS_ENABLED": "djm_events",
        "DJM_EVENTS_FILE": str(events_file),
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    cmdline = shlex.join([*extra, *ansible_args(args)])
    broken: list[Exception] = []

    def on_event(event: dict[str, Any]) -> bool:
        # An exception here would end runner.run() mid-playbook: a display bug must never stop a migration.
        if isinstance(event.get("pid"), int):
            INTERRUPTS.child_pid = event["pid"]  # ansible-playbook's: what a second Ctrl-C kills
        if not broken:
            try:
                if progress is not None:
                    progress.event(event)
                else:
                    timeline.feed(event)
            except Exception as exc:
                broken.append(exc)
                print(f"djm: progress display stopped ({type(exc).__name__}: {exc}); the run goes on", file=sys.stderr)
        if args.output and event.get("stdout"):
            print(event["stdout"], flush=True)
        return False  # nothing kept under the runner's private directory

    def cancel_callback() -> bool:  # asked every RUNNER_POLL_SECONDS: also the long step's clock
        if progress is not None and not broken:
            try:
                progress.tick()
            except Exception as exc:
                broken.append(exc)
                print(f"djm: progress display stopped ({type(exc).__name__}: {exc}); the run goes on", file=sys.stderr)
        return INTERRUPTS.cancel_requested()

    kept = private / "ansible-output.log"
    if INTERRUPTS.cancel_requested():  # Ctrl-C before the playbook started: do not start it
        shutil.rmtree(private, ignore_errors=True)
        return False, "not-started", kept
    RUNS_STARTED += 1
    INTERRUPTS.running = True
    try:
        try:
            runner = ansible_runner.run(
                private_data_dir=str(private),
                project_dir=str(REPO),
                playbook=str(REPO / playbook),
                inventory=inventories(args),
                cmdline=cmdline,
                envvars=envvars,
                settings={"pexpect_timeout": RUNNER_POLL_SECONDS},
                quiet=True,
                event_handler=on_event,
                cancel_callback=cancel_callback,
                rotate_artifacts=1,
            )
        except ForceStopped:
            for log in private.glob("artifacts/*/stdout"):  # what ansible-playbook wrote until it was killed
                shutil.copyfile(log, kept)
            return False, "force-stopped", kept
        log = Path(runner.stdout.name) if getattr(runner, "stdout", None) else None
        if log is not None and log.exists():
            shutil.copyfile(log, kept)
        return runner.rc == 0 and runner.status == "successful", str(runner.status), kept
    finally:
        INTERRUPTS.running = False
        if progress is not None:
            progress.finish()
        for item in private.iterdir():
            if item.name != "ansible-output.log":
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def file_outputs(timeline: Timeline, output_log: Path, reports_dir: Path) -> dict[str, str]:
    """Move ansible's output and the event log next to the report; the paths, by kind."""
    running = REPO / "build" / "events" / f".running-{os.getpid()}.jsonl"
    if not timeline.project and running.exists():
        # A run stopped before the lock: the event log's callback read project_name from the inventory.
        timeline.project = project_from_events(running)
    project = timeline.project or "_unknown"
    name = timeline.run_id or datetime.datetime.now(datetime.timezone.utc).strftime("refused-%Y%m%dT%H%M%SZ")
    where = reports_dir / project
    where.mkdir(parents=True, exist_ok=True, mode=0o750)
    paths = {"json": str(where / f"{name}.json"), "html": str(where / f"{name}.html"), "log": str(where / f"{name}.log")}
    if output_log.exists():
        shutil.move(str(output_log), paths["log"])
        os.chmod(paths["log"], 0o600)
        shutil.rmtree(output_log.parent, ignore_errors=True)
    if running.exists():
        events = REPO / "build" / "events" / project / f"{name}.jsonl"
        events.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        shutil.move(str(running), events)
        paths["events"] = str(events)
    return paths


def project_from_events(path: Path) -> str:
    """project_name as the event log's `project` line gives it ("" without one)."""
    import json

    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "project" and isinstance(event.get("project"), str):
                return re.sub(r"[^A-Za-z0-9._-]", "_", event["project"])
    return ""


# ------------------------------------------------------------------------------------------ output
def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s"


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str("-" if v is None else v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def print_summary(report: dict[str, Any]) -> None:
    print()
    rows = []
    for stage in report["stages"]:
        if not stage["hosts"]:
            continue
        hosts = sorted(stage["hosts"])
        failed = sorted(h for h, s in stage["hosts"].items() if s["failed"] or s["unreachable"])
        rows.append(
            [
                stage["stage"],
                fmt_seconds(stage["started"]),
                fmt_seconds(stage["seconds"]),
                ", ".join(hosts) if len(hosts) <= 5 else f"{len(hosts)} hosts",
                stage["batches"] or "",
                "FAILED on " + ", ".join(failed) if failed else "ok" if stage["ran"] else "skipped",
            ]
        )
    print_table(["stage", "start", "took", "hosts", "batches", "status"], rows)
    print()
    rollback = report["command"] == "rollback"
    converge = report.get("converge") or {}
    failure = report.get("failure") or {}
    facts = [
        ("run", report.get("run_id")),
        ("undoes", f"run {report.get('record_run_id')}" if rollback and report.get("record_run_id") else None),
        ("releases", f"{report.get('from_release')} -> {report.get('to_release')}" if report.get("to_release") else None),
        (
            "strategy",
            f"{report['strategy']} ({report.get('strategy_reason')})" if report.get("strategy") and not rollback else None,
        ),
        ("plan", f"{len(report['plan'])} migration(s) pending" if report.get("plan") and not rollback else None),
        ("backup", report.get("backup_id")),
        (
            "applied",
            f"{len(report['migrations_applied'])} migration(s)" if report.get("migrations_applied") and not rollback else None,
        ),
        (
            "undo",
            f"{converge.get('mode')} -> {converge.get('to')} ({converge.get('result', '?')})" if converge.get("mode") else None,
        ),
        # The hosts' releases as the run's finish read them (rollback.yml does not read them again: see `djm status`).
        ("serving", ", ".join(f"{h} {r}" for h, r in sorted((report.get("serving") or {}).items())) if not rollback else None),
        ("result", report.get("result")),
        ("failure", f"{failure.get('stage')} on {failure.get('host')}: {failure.get('cause')}" if failure else None),
        ("said", " ".join(str(report.get("said") or "").split())[:600] or None),
        ("took", f"{report['seconds']:.0f}s"),
        ("exit", f"{report['exit_code']}: {report['exit_meaning']}"),
    ]
    for key, value in facts:
        if value:
            print(f"  {key:<9} {value}")
    for number, text in enumerate(djm_report.load_line(report["load"]) if report.get("load") else []):
        print(f"  {'load':<9} {text}" if number == 0 and not text.startswith("problem") else f"  {text}")
    for kind in ("json", "html", "events", "log"):
        if report["paths"].get(kind):
            print(f"  {kind:<9} {report['paths'][kind]}")


# ------------------------------------------------------------------------------------------ commands
def command_run(args: argparse.Namespace) -> int:
    """plan, migrate, rollback: a playbook run with progress, a summary and the run report."""
    extra: list[str] = []
    if args.command in ("plan", "migrate"):
        playbook = "migrate.yml"
        if args.release:
            extra += ["-e", f"project_release_id={args.release}"]
        if args.command == "plan":
            extra += ["-e", "migrate_plan_only=true"] if args.prepare else ["--check"]
        else:
            if args.strategy:
                extra += ["-e", f"migrate_strategy={args.strategy}"]
            if args.canary is not None:
                extra += ["-e", f"migrate_canary_seconds={args.canary}"]
            if args.break_lock:
                extra += ["-e", "migrate_break_lock=true"]
    else:
        playbook = "rollback.yml"
        if args.mode:
            extra += ["-e", f"rollback_mode={args.mode}"]
        if args.to_release:
            extra += ["-e", f"rollback_to_release={args.to_release}"]
    timeline = Timeline()
    progress = None if args.output else Progress(timeline, reports_dir=Path(args.reports_dir))
    wall = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    wall_epoch = time.time()
    started = time.monotonic()
    print(
        f"djm {args.command}: {playbook} {shlex.join(extra)}".rstrip()
        + f" (inventory: {', '.join(args.inventory or ['ansible.cfg default'])})"
    )
    succeeded, status, output_log = run_playbook(playbook, args, extra, timeline, progress)
    command = "plan-prepare" if args.command == "plan" and args.prepare else args.command
    code = djm_report.exit_code(command, succeeded, timeline.run_id, timeline.record)
    advice: list[str] = []
    if status in STOPPED:
        code, advice = after_stop(command, status, timeline, args.inventory or [])
    paths = file_outputs(timeline, output_log, Path(args.reports_dir))
    summary = {
        "playbook": playbook,
        "check": args.command == "plan" and not args.prepare,
        "inventory": inventories(args),
        "extra_vars": extra_var_names(args) + [e.split("=", 1)[0] for e in extra[1::2] if "=" in e],
        "runner_status": status,
    }
    report = djm_report.build_report(
        args.command, timeline, code, argv_summary=summary, paths=paths, wall_started=wall, seconds=time.monotonic() - started
    )
    if status in STOPPED:
        report["interrupted"] = {"status": status, "advice": advice}
    if getattr(args, "load_summary", None):
        report["load"] = djm_report.load_check(args.load_summary, args.load_verify, wall_epoch, time.time())
    djm_report.write_report(report)
    if advice:
        print()
        for text in advice:
            print(f"  {text}")
    if args.command == "plan" and (timeline.record or {}).get("plan"):
        print_plan(report)
    print_summary(report)
    cause = str((report.get("failure") or {}).get("cause") or "")
    if args.command == "plan" and not args.prepare and "is not prepared" in cause:
        print(
            "  hint      --check cannot prepare a release: "
            f"`djm plan {args.release or ''} --prepare` prepares it and changes nothing else"
        )
    return code


STOPPED = ("canceled", "timeout", "force-stopped", "not-started")


def after_stop(command: str, status: str, timeline: Timeline, inventory: list[str]) -> tuple[int, list[str]]:
    """A run stopped by Ctrl-C (or the runner's timeout): its exit code, and what it left and how to
    finish it, from what its events said (the lock stage reached, the run record seen).

    command: plan, plan-prepare, migrate, rollback; status: one of STOPPED. An interrupted run keeps
    the deploy lock; rollback.yml finishes it (its header: it stops what the dead run left running,
    repairs a cut restore, undoes the run from its record) and takes over the lock of the run it
    undoes, once that run's ansible-playbook is gone. The lock of an interrupted rollback is not the
    undone run's: the next rollback needs -e rollback_break_lock=true."""
    how = {
        "canceled": "cancelled by Ctrl-C (ansible-runner stopped ansible-playbook)",
        "force-stopped": "force-stopped by a second Ctrl-C (ansible-playbook's process group killed)",
        "timeout": "stopped by ansible-runner's timeout",
        "not-started": "Ctrl-C before ansible-playbook started",
    }[status]
    inv = "".join(f" -i {shlex.quote(i)}" for i in inventory)
    record = timeline.record or {}
    run_id = timeline.run_id
    said = [f"stopped   {how}"]
    reached_lock = any(s["stage"] == "lock" for s in timeline.stages)
    if status == "not-started":
        return EXIT_REFUSED, [*said, "nothing   no playbook ran: nothing changed, no lock taken"]
    if command == "plan":
        return EXIT_REFUSED, [*said, "nothing   --check writes nothing: no lock taken, nothing to undo"]
    if command == "rollback":
        if run_id and (record.get("rollback_requested") or {}).get("by_run") == run_id:
            return djm_report.EXIT_NEEDS_HUMAN, [
                *said,
                f"lock      held by this rollback, run {run_id}; the undo of run {record.get('run_id')} may be half-done",
                f"next      `djm status{inv}` (the lock, each host's release), then"
                f" `djm rollback{inv} -e rollback_break_lock=true`: rollback.yml takes over by itself only"
                " the lock of the run it undoes, and this lock is the rollback's",
            ]
        if reached_lock:
            return djm_report.EXIT_NEEDS_HUMAN, [
                *said,
                f"lock      stopped while taking the deploy lock: `djm status{inv}` shows whether this rollback"
                f" ({run_id or 'run id not seen'}) holds it; if it does, `djm rollback{inv} -e rollback_break_lock=true`",
            ]
        return EXIT_REFUSED, [*said, "nothing   stopped before the deploy lock: nothing changed"]
    # migrate, plan-prepare: the lock is taken with the run record
    if run_id and record.get("run_id") == run_id:
        if record.get("result"):
            return djm_report.EXIT_NEEDS_HUMAN, [
                *said,
                f"record    run {run_id} had recorded its result ({record['result']}) when it was stopped; the lock is"
                f" released just after that: `djm status{inv}` shows whether it still is held",
            ]
        return djm_report.EXIT_NEEDS_HUMAN, [
            *said,
            f"lock      held by run {run_id}, stopped in stage {record.get('stage')}; its ansible-playbook is gone,"
            " so the lock is stale and a new `djm migrate` is refused",
            f"next      `djm rollback{inv}` finishes it: rollback.yml takes over the stale lock of the run it undoes,"
            " stops what the run left running on the hosts and undoes it from its record"
            f" (`djm status{inv}` first shows the lock and each host's release)",
        ]
    if reached_lock:
        return djm_report.EXIT_NEEDS_HUMAN, [
            *said,
            "lock      stopped while taking the deploy lock: the run record was not seen, the lock may be held all the same;"
            f" `djm status{inv}` shows the holder; if it is this run ({run_id or 'run id not seen'}),"
            f" `djm rollback{inv}` finishes it",
        ]
    return EXIT_REFUSED, [*said, "nothing   stopped before the deploy lock: nothing changed"]


def command_report(args: argparse.Namespace) -> int:
    """djm report RUN.json --load-summary FILE [--load-verify FILE]: add a load check to a run report
    written before (loadgen writes its summary when it stops, and its order check needs the database:
    both usually come after the run), and write its JSON and HTML again."""
    import json

    path = Path(args.report)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        started = datetime.datetime.strptime(report["started"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        seconds = float(report["seconds"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"djm report: {path} is not a djm run report ({type(exc).__name__}: {exc})", file=sys.stderr)
        return EXIT_REFUSED
    # The report's own start is rounded down to the second: the run's window is [start, start + seconds + 1].
    report["load"] = djm_report.load_check(
        args.load_summary, args.load_verify, started.timestamp(), started.timestamp() + seconds + 1
    )
    report["paths"] = {**(report.get("paths") or {}), "json": str(path), "html": str(path.with_suffix(".html"))}
    djm_report.write_report(report)
    for number, text in enumerate(djm_report.load_line(report["load"])):
        print(f"  {'load':<9} {text}" if number == 0 and not text.startswith("problem") else f"  {text}")
    print(f"  {'json':<9} {report['paths']['json']}")
    print(f"  {'html':<9} {report['paths']['html']}")
    return EXIT_REFUSED if report["load"].get("requests") is None else EXIT_OK


def print_plan(report: dict[str, Any]) -> None:
    print()
    if report["plan"]:
        print_table(
            ["migration", "class", "reversible", "atomic", "ops", "locking risks"],
            [
                [p["migration"], p["class"], p["reversible"], p["atomic"], p["operations"], p["locking_risks"]]
                for p in report["plan"]
            ],
        )
    else:
        print("no migration pending")
    for statement in report["deferred_statements"]:
        print(f"  deferred to contract: {statement['migration']} {statement['kind']} {statement['table']}.{statement['column']}")


def age(stamp: str | None) -> str:
    if not stamp:
        return "-"
    try:
        then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.timezone.utc)
    seconds = (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def history_tail(project: str, count: int = 3) -> list[dict[str, Any]]:
    """The last `count` runs in the controller's copy of the history (deploy_run finish.yml), newest
    first, each as its newest line says: a run undone later has a second line (result rolled_back),
    which replaces the first."""
    import json

    path = REPO / "build" / "deploys" / project / "history.jsonl"
    if not project or not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        run_id = str(record.get("run_id", "")) if isinstance(record, dict) else ""
        if not run_id or run_id in seen:
            continue
        seen.add(run_id)
        records.append(record)
        if len(records) == count:
            break
    return records


def command_status(args: argparse.Namespace) -> int:
    timeline = Timeline()
    succeeded, _status, output_log = run_playbook("playbooks/status.yml", args, [], timeline, None)
    if output_log.exists():
        shutil.rmtree(output_log.parent, ignore_errors=True)
    events = REPO / "build" / "events" / f".running-{os.getpid()}.jsonl"
    events.unlink(missing_ok=True)
    if timeline.errors:
        for error in timeline.errors:
            print(f"✗ {error['host']}: {error['task']}: {error['msg'][:300]}")
    if not timeline.lock_status and not timeline.serving:
        print("djm status: could not read the fleet (see the errors above)")
        return djm_report.exit_code("status", False, "", None)
    print(f"project   {timeline.project or '?'}")
    print()
    print_table(
        ["app host", "serves"], [[h, timeline.serving.get(h) or "(unreachable or none)"] for h in sorted(timeline.serving)]
    )
    print()
    status = timeline.lock_status or {}
    lock, last = status.get("lock"), status.get("last_run")
    if lock:
        print(
            f"lock      held by run {lock.get('run_id')} ({lock.get('playbook')} to {lock.get('target')}) by {lock.get('owner')} "
            f"on {lock.get('controller')} since {lock.get('locked_at')} ({age(lock.get('locked_at'))})"
        )
    else:
        print("lock      free")
    if last:
        result = last.get("result") or f"in progress or interrupted, stage {last.get('stage')}"
        print(
            f"last run  {last.get('run_id')}: {last.get('playbook')} "
            f"{last.get('from_release')} -> {last.get('to_release')}, {result}"
            f" (finished {last.get('finished', '-')}, {age(last.get('finished') or last.get('created'))} ago)"
        )
        if last.get("converge"):
            converge = last["converge"]
            print(
                f"          undone by {converge.get('mode')} to {converge.get('to')} "
                f"({converge.get('result', '?')}, {converge.get('finished', '-')})"
            )
        if last.get("failure"):
            print(
                f"          failure: {last['failure'].get('stage')} on {last['failure'].get('host')}: "
                f"{last['failure'].get('cause')}"
            )
    else:
        print("last run  none recorded")
    backups = timeline.backups or {}
    newest = next((b for b in backups.get("backups") or [] if b.get("id") == backups.get("newest_verified")), None)
    if newest:
        size = newest.get("dump_size_bytes")
        print(
            f"backup    newest verified {newest['id']}, "
            f"finished {newest.get('finished_at')} ({age(newest.get('finished_at'))} ago)"
            + (f", {size / 2**20:.1f} MiB" if size else "")
        )
    else:
        print("backup    no verified backup")
    history = history_tail(timeline.project)
    if history:
        print()
        print("controller history (build/deploys/<project>/history.jsonl), newest first:")
        print_table(
            ["run", "playbook", "releases", "strategy", "result", "finished"],
            [
                [
                    r.get("run_id"),
                    r.get("playbook"),
                    f"{r.get('from_release')} -> {r.get('to_release')}",
                    r.get("strategy"),
                    r.get("result"),
                    r.get("finished"),
                ]
                for r in history
            ],
        )
    return EXIT_OK if succeeded else djm_report.EXIT_REFUSED


def command_backups(args: argparse.Namespace) -> int:
    extra = ["-e", "backups_verify=true"] if args.action == "verify" else []
    if args.action == "verify" and args.id:
        extra += ["-e", f"backups_id={args.id}"]
    timeline = Timeline()
    succeeded, _status, output_log = run_playbook("playbooks/backups.yml", args, extra, timeline, None)
    if output_log.exists():
        shutil.rmtree(output_log.parent, ignore_errors=True)
    (REPO / "build" / "events" / f".running-{os.getpid()}.jsonl").unlink(missing_ok=True)
    backups = timeline.backups or {}
    if backups.get("backups") is not None:
        print_table(
            ["backup", "state", "finished", "age", "release", "MiB"],
            [
                [
                    b.get("id"),
                    b.get("state") + (" (newest verified)" if b.get("id") == backups.get("newest_verified") else ""),
                    b.get("finished_at"),
                    age(b.get("finished_at")),
                    b.get("release_id"),
                    f"{b['dump_size_bytes'] / 2**20:.1f}" if b.get("dump_size_bytes") else None,
                ]
                for b in backups["backups"]
            ],
        )
    for error in timeline.errors:
        print(f"✗ {error['host']}: {error['task']}: {error['msg'][:600]}")
    if args.action == "verify" and succeeded:
        checked = [m for m in timeline.messages if "matches its manifest" in m]
        print(checked[-1] if checked else "verified")
    roles = [e["role"] for e in timeline.errors]
    return djm_report.exit_code(f"backups-{args.action}", succeeded, "", None, roles)


# ------------------------------------------------------------------------------------------ arguments
def add_load_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_argument_group("load check (scripts/loadgen.py)")
    group.add_argument(
        "--load-summary",
        metavar="FILE",
        required=required,
        help="the JSON summary of the loadgen.py run that sent traffic during this run (loadgen.py run --summary FILE): "
        "requests, failures by status and kind go into the summary and the report. Read when the run ends: a summary "
        "whose window does not overlap the run is not counted; one not written yet (loadgen still running) is "
        "reported missing, and `djm report` adds it later",
    )
    group.add_argument(
        "--load-verify",
        metavar="FILE",
        help="the output of `loadgen.py verify --json` for the same load: the acknowledged orders missing from "
        "the database (without it: not checked)",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("passed to ansible-playbook")
    group.add_argument("-i", "--inventory", action="append", metavar="INVENTORY", help="inventory path or host list (repeatable)")
    group.add_argument(
        "-e", "--extra-vars", action="append", metavar="VARS", help="extra variables, as ansible-playbook -e (repeatable)"
    )
    group.add_argument("--vault-id", action="append", help="as ansible-playbook --vault-id (repeatable)")
    group.add_argument("--vault-password-file", help="as ansible-playbook --vault-password-file")
    group.add_argument("-v", "--verbose", action="count", default=0, help="ansible verbosity in the saved output (-vvv)")
    out = common.add_argument_group("output")
    out.add_argument("--output", action="store_true", help="show ansible's own output instead of the progress lines")
    out.add_argument("--reports-dir", default=str(REPO / "build" / "reports"), help="where reports go (default build/reports)")

    parser = Parser(prog="djm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"djm {VERSION} ({REPO})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    fmt = argparse.HelpFormatter  # subcommand descriptions are paragraphs: wrapped

    plan = sub.add_parser(
        "plan",
        parents=[common],
        formatter_class=fmt,
        help="show the migration plan and the strategy; change nothing",
        description="migrate.yml --check: preflight, the lock, the plan of every pending migration (expand / contract / "
        "locking risk) and the strategy it leads to. Writes nothing. The plan is computed in the target release "
        "on the first app host: when it is not prepared yet, --prepare prepares it (-e migrate_plan_only=true) "
        "and changes nothing else.",
    )
    plan.add_argument("release", nargs="?", help="target release (-e project_release_id=...; default: the inventory's)")
    plan.add_argument("--prepare", action="store_true", help="prepare the release on the app hosts to compute the plan")

    migrate = sub.add_parser(
        "migrate",
        parents=[common],
        formatter_class=fmt,
        help="move the fleet to a release (migrate.yml)",
        description="migrate.yml: preflight, lock, prepare, plan, backup, migrate, switch, contract, verify, "
        "finish; on a failure the run is undone from its record (exit 1 when the undo finished).",
    )
    migrate.add_argument("release", nargs="?", help="target release (-e project_release_id=...; default: the inventory's)")
    migrate.add_argument(
        "--strategy", choices=["rolling", "two_phase", "maintenance"], help="force a strategy (-e migrate_strategy)"
    )
    migrate.add_argument(
        "--canary", type=int, metavar="SECONDS", help="first host serves alone this long (-e migrate_canary_seconds)"
    )
    migrate.add_argument("--break-lock", action="store_true", help="break a stale deploy lock (-e migrate_break_lock=true)")
    add_load_options(migrate)

    rollback = sub.add_parser(
        "rollback",
        parents=[common],
        formatter_class=fmt,
        help="undo the last run (rollback.yml)",
        description="rollback.yml: undo the last run of migrate.yml from its record (code, reverse or "
        "restore), or finish an interrupted one. Run twice, the second does nothing.",
    )
    rollback.add_argument("--mode", choices=["auto", "code", "reverse", "restore"], help="force the undo mode (-e rollback_mode)")
    rollback.add_argument("--to-release", help="switch back to another prepared release (code only; -e rollback_to_release)")
    add_load_options(rollback)

    report = sub.add_parser(
        "report",
        formatter_class=fmt,
        help="add a load check to a run report written before",
        description="Add the load check of a run to its report and write the report's JSON and HTML again: "
        "loadgen.py writes its summary when it stops and its order check needs the database, so both usually "
        "come after the run. Exit 0 when the load check was counted, 3 when it could not be (the reason is "
        "printed and kept in the report).",
    )
    report.add_argument("report", help="the run's JSON report, build/reports/<project>/<run id>.json")
    add_load_options(report, required=True)

    sub.add_parser(
        "status",
        parents=[common],
        formatter_class=fmt,
        help="release per host, lock, last run, newest verified backup",
        description="Read-only (playbooks/status.yml): the release each app host serves, the deploy lock and its "
        "holder, the last run and its result (the run record on the first db host), the newest verified "
        "backup and its age, and the last runs in the controller's copy of the history.",
    )

    backups = sub.add_parser(
        "backups",
        parents=[common],
        formatter_class=fmt,
        help="list or verify the database backups",
        description="list: the backups on the first db host, newest first. verify [ID]: the backup (default "
        "the newest verified) re-read against the sha256 of every file of its manifest, pg_restore's version, "
        "room to restore it and the live database, by the pg_restore role's own check (playbooks/backups.yml). "
        "A backup that fails it exits 2.",
    )
    backups.add_argument("action", choices=["list", "verify"])
    backups.add_argument("id", nargs="?", help="verify: the backup id (default: the newest verified)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    INTERRUPTS.reset()  # a fresh count for each call (tests call main more than once)
    INTERRUPTS.install()
    try:
        return run_main(argv)
    finally:
        INTERRUPTS.restore()


def run_main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    try:
        return dispatch(args)
    except ForceStopped:
        started = RUNS_STARTED > 0 and (args.command in ("migrate", "rollback") or (args.command == "plan" and args.prepare))
        code = djm_report.EXIT_NEEDS_HUMAN if started else EXIT_REFUSED
        print(
            f"djm: force-stopped before the report was complete; exit {code}: {djm_report.EXIT_MEANINGS[code]}"
            + (" (`djm status` shows the lock and the releases; `djm rollback` finishes an interrupted run)" if started else ""),
            file=sys.stderr,
        )
        return code
    except Exception as exc:  # djm's own failure: never exit 1 ("rolled back cleanly") by accident
        import traceback

        traceback.print_exc()
        started = RUNS_STARTED > 0 and (args.command in ("migrate", "rollback") or (args.command == "plan" and args.prepare))
        code = djm_report.EXIT_NEEDS_HUMAN if started else EXIT_REFUSED
        print(f"djm: {type(exc).__name__}: {exc}; exit {code}: {djm_report.EXIT_MEANINGS[code]}", file=sys.stderr)
        return code


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "report":
        return command_report(args)
    if args.command == "status":
        return command_status(args)
    if args.command == "backups":
        if args.action == "list" and args.id:
            print("djm: backups list takes no backup id", file=sys.stderr)
            return EXIT_REFUSED
        return command_backups(args)
    return command_run(args)


if __name__ == "__main__":
    sys.exit(main())
