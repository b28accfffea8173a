# The JSON event log of a playbook run: one JSON object per line, one file per run.
"""Ansible callback plugin: the JSON-lines event log of one run of migrate.yml / rollback.yml (or any playbook)."""

from __future__ import annotations

DOCUMENTATION = r"""
name: djm_events
type: notification
short_description: One JSON-lines event log per playbook run (stages, host results, decisions, errors)
description:
  - Writes C(<dir>/<project>/<run id>.jsonl) (the run id the playbooks make, C(djm_run_id); before it
    is known the file is named by the start time and the process id, and renamed once it is).
  - "Events: C(run_start), C(stage_start)/C(stage_end) (a stage is a play: the words before ' - ' in its
    name, e.g. C(switch)), C(batch) (a serial play's next batch of hosts), C(host_result) (ok, changed,
    failed, unreachable; skipped tasks are only counted), C(run_id), C(decision) (what the run record
    says was decided: strategy, undo mode, failure, backup id, result), C(error) (a failed task,
    rescued or not), C(run_end) (per host stats)."
  - "Secrets: a result of a task with C(no_log) is written as its status only, never a message or a
    value; messages are only those of C(debug) tasks and failures (what the default callback prints);
    module arguments, extra vars and the command line are never written."
options:
  dir:
    description:
      - Directory of the event logs (one sub-directory per project).
      - Unset, C(build/events) beside the ansible.cfg in use (the current directory without one).
    env:
      - name: DJM_EVENTS_DIR
    ini:
      - section: callback_djm_events
        key: dir
    type: path
  file:
    description: Write exactly this file instead (the djm CLI names it); no renaming.
    env:
      - name: DJM_EVENTS_FILE
    type: path
"""

# An Ansible plugin documents itself before its imports.
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from ansible import constants as C  # noqa: E402
from ansible.plugins.callback import CallbackBase  # noqa: E402

# Keys of the run record whose changes are decisions worth a line of their own.
DECISION_KEYS = ("strategy", "strategy_reason", "backup_id", "failure", "nothing_to_do", "result", "contract_pending")
MESSAGE_LIMIT = 2000
NO_LOG_MESSAGE = "the output has been hidden due to the fact that 'no_log: true' was specified for this result"


def stage_of(play_name: str, tags: list[str] | None = None) -> str:
    """The stage a play stands for: the words before ' - ' in its name (`Switch - one app host at a
    time` -> switch), else its first tag that is not always/never, else its name's first word."""
    name = (play_name or "").strip()
    if " - " in name:
        return name.split(" - ", 1)[0].strip().lower()
    for tag in tags or []:
        if tag not in ("always", "never"):
            return str(tag).lower()
    return (name.split() or ["play"])[0].lower()


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def hidden(result: dict[str, Any], task_no_log: bool = False) -> bool:
    """True when Ansible hides this result (no_log on the task, the result or any loop item)."""
    if task_no_log or result.get("_ansible_no_log"):
        return True
    items = result.get("results")
    return isinstance(items, list) and any(isinstance(i, dict) and i.get("_ansible_no_log") for i in items)


def message_of(result: dict[str, Any], action: str, failed: bool) -> str | None:
    """What the default callback shows of a result, in one string: the msg of a debug task (action
    without its collection) or of a failure (and a failed command's last stderr line). None otherwise."""
    if not failed and action != "debug":
        return None
    parts: list[str] = []
    msg = result.get("msg")
    if msg not in (None, ""):
        parts.append(msg if isinstance(msg, str) else json.dumps(msg, sort_keys=True, default=str))
    if failed:
        stderr = [line for line in (result.get("stderr_lines") or []) if str(line).strip()]
        if stderr:
            parts.append(str(stderr[-1]))
        items = result.get("results")
        if not parts and isinstance(items, list):
            parts += [str(i.get("msg")) for i in items if isinstance(i, dict) and i.get("failed") and i.get("msg")]
    if not parts:
        return None
    text = ": ".join(parts)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def decisions(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """The decisions a record update made: DECISION_KEYS that changed, and the undo mode/result."""
    found = [
        {"key": key, "value": after.get(key)}
        for key in DECISION_KEYS
        if key in after and after.get(key) != before.get(key) and after.get(key) not in (None, "", [], {})
    ]
    for key in ("mode", "result", "failed"):
        old, new = (before.get("converge") or {}).get(key), (after.get("converge") or {}).get(key)
        if new is not None and new != old:
            found.append({"key": f"converge.{key}", "value": new})
    requested = (after.get("rollback_requested") or {}).get("mode")
    if requested and requested != (before.get("rollback_requested") or {}).get("mode"):
        found.append({"key": "rollback_mode", "value": requested})
    return found


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "djm_events"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handle: Any = None
        self._path = ""
        self._fixed = False
        self._start = time.monotonic()
        self._project = ""
        self._run_id = ""
        self._playbook = ""
        self._stage: dict[str, Any] | None = None
        self._record: dict[str, Any] = {}
        self._skipped = 0
        self._broken = False
        self._batches: dict[str, int] = {}

    # ------------------------------------------------------------------ the file
    def _directory(self) -> str:
        configured = self.get_option("dir") if self._plugin_options else None
        if configured:
            return str(configured)
        base = os.path.dirname(C.CONFIG_FILE) if C.CONFIG_FILE else os.getcwd()
        return os.path.join(base, "build", "events")

    def _open(self) -> None:
        fixed = self.get_option("file") if self._plugin_options else None
        if fixed:
            self._path, self._fixed = str(fixed), True
        else:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            self._path = os.path.join(self._directory(), "_unnamed", f"{stamp}-{self._playbook or 'run'}-{os.getpid()}.jsonl")
        os.makedirs(os.path.dirname(self._path), mode=0o750, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._handle = os.fdopen(fd, "a", encoding="utf-8")

    def _rename(self) -> None:
        """Move the file to <dir>/<project>/<run id>.jsonl once both are known (never a CLI-named file)."""
        if self._fixed or not self._run_id or not self._handle:
            return
        project = re.sub(r"[^A-Za-z0-9._-]", "_", self._project) or "_unnamed"
        target = os.path.join(self._directory(), project, re.sub(r"[^A-Za-z0-9._-]", "_", self._run_id) + ".jsonl")
        if target == self._path:
            return
        os.makedirs(os.path.dirname(target), mode=0o750, exist_ok=True)
        if os.path.exists(target):  # a re-entered run id: keep both, the new one suffixed
            target = target[: -len(".jsonl")] + f"-{os.getpid()}.jsonl"
        os.rename(self._path, target)  # the open handle follows the file
        self._path = target

    def _emit(self, event: str, **fields: Any) -> None:
        if self._broken:
            return
        try:
            if self._handle is None:
                self._open()
            line = {"ts": utc_stamp(), "t": round(time.monotonic() - self._start, 2), "event": event}
            line.update({k: v for k, v in fields.items() if v is not None})
            self._handle.write(json.dumps(line, sort_keys=True, default=str) + "\n")
            self._handle.flush()
        except Exception as exc:  # the log must never break a run
            self._broken = True
            self._display.warning(f"djm_events: event log disabled: {exc}")

    # ------------------------------------------------------------------ playbook and plays
    def v2_playbook_on_start(self, playbook: Any) -> None:
        self._playbook = os.path.splitext(os.path.basename(getattr(playbook, "_file_name", "") or "run"))[0]
        self._emit("run_start", playbook=self._playbook, pid=os.getpid())

    def _project_of(self, play: Any) -> str:
        """project_name as the inventory gives it to localhost (the validation play's host)."""
        try:
            manager = play.get_variable_manager()
            host = manager._inventory.get_host("localhost") or next(iter(manager._inventory.get_hosts(play.hosts)), None)
            value = manager.get_vars(play=play, host=host, include_hostvars=False).get("project_name", "")
            return value if isinstance(value, str) and "{" not in value else ""
        except Exception:
            return ""

    def _end_stage(self) -> None:
        if self._stage is not None:
            self._emit(
                "stage_end",
                stage=self._stage["stage"],
                play=self._stage["play"],
                seconds=round(time.monotonic() - self._stage["started"], 2),
            )
            self._stage = None

    def v2_playbook_on_play_start(self, play: Any) -> None:
        # A play with `serial` starts again for each batch of hosts: the same play, batch k.
        # (ansible-runner's stdout callback, called first, suffixes the uuid of a repeated play with _k.)
        uuid = str(getattr(play, "_uuid", "") or id(play)).split("_")[0]
        self._batches[uuid] = self._batches.get(uuid, 0) + 1
        if self._batches[uuid] > 1 and self._stage is not None and self._stage["play"] == play.get_name():
            self._emit("batch", stage=self._stage["stage"], play=self._stage["play"], batch=self._batches[uuid])
            return
        self._end_stage()
        if not self._project:
            self._project = self._project_of(play)
            if self._project:
                self._emit("project", project=self._project)
                self._rename()
        name = play.get_name()
        stage = stage_of(name, list(getattr(play, "tags", []) or []))
        self._stage = {"stage": stage, "play": name, "started": time.monotonic()}
        hosts = play.hosts if isinstance(play.hosts, str) else ",".join(play.hosts)
        self._emit("stage_start", stage=stage, play=name, hosts=hosts)

    # ------------------------------------------------------------------ results
    def _result(self, result: Any, status: str, ignored: bool = False) -> None:
        task = result.task
        res = result.result if isinstance(result.result, dict) else {}
        action = str(getattr(task, "action", "") or "")
        short = action.rsplit(".", 1)[-1]
        failed = status in ("failed", "unreachable")
        fields: dict[str, Any] = {
            "host": result.host.get_name(),
            "task": task.get_name(),
            "action": action,
            "status": status,
            "stage": self._stage["stage"] if self._stage else None,
            "ignored": True if ignored else None,
        }
        # ansible-core censors a no_log result before callbacks see it; checked again all the same.
        if hidden(res, getattr(task, "no_log", False) is True):
            fields["no_log"] = True
        else:
            fields["msg"] = message_of(res, short, failed)
            self._watch(res, short)
        self._emit("host_result", **fields)
        if failed and not ignored:
            self._emit(
                "error",
                host=fields["host"],
                task=fields["task"],
                stage=fields["stage"],
                msg=fields.get("msg"),
                no_log=fields.get("no_log"),
            )

    def _watch(self, res: dict[str, Any], action: str) -> None:
        """The run id (a fact set on the controller) and the decisions of the run record."""
        facts = res.get("ansible_facts") or {}
        run_id = facts.get("djm_run_id") if isinstance(facts, dict) else None
        if isinstance(run_id, str) and run_id and not self._run_id:
            self._run_id = run_id
            self._emit("run_id", run_id=run_id)
            self._rename()
        if action == "deploy_run" and isinstance(res.get("run"), dict):
            record = res["run"]
            for decision in decisions(self._record, record):
                self._emit("decision", run=record.get("run_id"), **decision)
            self._record = record

    def v2_runner_on_ok(self, result: Any) -> None:
        self._result(result, "changed" if result.result.get("changed") else "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._result(result, "failed", ignored=ignore_errors)

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._result(result, "unreachable")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._skipped += 1

    # ------------------------------------------------------------------ the end
    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._end_stage()
        hosts = {
            host: {
                key: value
                for key, value in stats.summarize(host).items()
                if key in ("ok", "changed", "failures", "unreachable", "skipped", "rescued", "ignored")
            }
            for host in sorted(stats.processed.keys())
        }
        failed = any(s["failures"] or s["unreachable"] for s in hosts.values())
        self._emit(
            "run_end",
            run_id=self._run_id or None,
            project=self._project or None,
            hosts=hosts,
            failed=failed,
            result=self._record.get("result"),
            skipped_results=self._skipped,
            seconds=round(time.monotonic() - self._start, 2),
        )
        if self._handle is not None:
            self._handle.close()
            self._handle = None
