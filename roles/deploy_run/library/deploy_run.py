#!/usr/bin/python
"""Ansible module: the deploy lock and the run record of one environment, on the host that keeps them."""

from __future__ import annotations

DOCUMENTATION = r"""
module: deploy_run
short_description: Deploy lock, run record and deploy history of one environment
description:
  - Keeps, under I(state_dir)/I(project)/, the lock (C(lock.json), created with O_EXCL so two runs
    can never both hold it), one record per run (C(runs/<run_id>.json)), the pointer to the last run
    (C(last-run)) and the history (C(history.jsonl): the record as it was each time a run finished,
    or was finished again by a rollback).
  - A new run's record names the run that was the last one before it (C(previous_run)). A run
    finished with C(changed_nothing) true in its record (a plan-only run, a re-run with nothing to
    do) hands the C(last-run) pointer back to that run, so a rollback undoes the run that changed
    something.
  - Every failure path and rollback reads the run record instead of re-deriving backup and releases
    from links.
options:
  action:
    description: read, lock, unlock, start, update or finish.
    type: str
    required: true
    choices: [read, lock, unlock, start, update, finish]
  state_dir:
    description: Directory that holds every project's state.
    type: path
    required: true
  project:
    description: Project name (a directory under I(state_dir)).
    type: str
    required: true
  run_id:
    description: The run acted on (required except for I(action=read)); for read, also return that run's record.
    type: str
    default: ""
  data:
    description: >-
      lock: the holder (owner, controller, pid, playbook, target, started). start/update/finish: fields
      merged into the record (top level; a C(stages) dict is merged per stage).
    type: dict
    default: {}
  stage:
    description: start/update/finish. Name of the stage now running; its start time is recorded, and the end of the previous one.
    type: str
    default: ""
  force:
    description: lock/unlock. Replace or remove a lock held by another run (breaking a stale lock).
    type: bool
    default: false
  check_record:
    description: >-
      update/finish in check mode. The record as the caller knows it (its check-mode start wrote
      nothing), used when the record does not exist on the host; ignored otherwise.
    type: dict
    default: {}
"""

# An Ansible module documents itself before its imports (ansible-test's validate-modules order).
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

# \Z, not $: "$" also matches before a trailing newline ("run-1\n" would name a file "run-1\n.json").
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
# Lock, records, pointer and history are readable by root and the group only (the run directories 0750).
FILE_MODE = 0o640


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_json(path, fail):
    """The document in path, None when there is none; fail(msg=...) when it is not JSON (changed outside)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        fail(msg=f"{path} is not JSON ({exc}): changed outside deploy_run; look at it, then repair or remove it")


def read_text(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def write_file(path, text):
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    write_file(tmp, text)
    os.replace(tmp, path)


def write_json_atomic(path, data):
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def merge_record(record, data, stage):
    merged = dict(record)
    for key, value in data.items():
        if key == "stages" and isinstance(value, dict):
            stages = dict(merged.get("stages") or {})
            for name, fields in value.items():
                stages[name] = dict(stages.get(name) or {}, **(fields or {}))
            merged["stages"] = stages
        else:
            merged[key] = value
    if stage and stage != merged.get("stage"):
        stamp = now()
        stages = dict(merged.get("stages") or {})
        previous = merged.get("stage")
        if previous and previous in stages and "finished" not in stages[previous]:
            stages[previous] = dict(stages[previous], finished=stamp)
        # A stage entered again (a rollback re-enters converge) is open again: its old end is dropped.
        entered = {name: value for name, value in (stages.get(stage) or {}).items() if name != "finished"}
        stages[stage] = dict(entered, started=stamp)
        merged["stages"] = stages
        merged["stage"] = stage
    return merged


def main():
    module = AnsibleModule(
        argument_spec={
            "action": {"type": "str", "required": True, "choices": ["read", "lock", "unlock", "start", "update", "finish"]},
            "state_dir": {"type": "path", "required": True},
            "project": {"type": "str", "required": True},
            "run_id": {"type": "str", "default": ""},
            "data": {"type": "dict", "default": {}},
            "stage": {"type": "str", "default": ""},
            "force": {"type": "bool", "default": False},
            "check_record": {"type": "dict", "default": {}},
        },
        supports_check_mode=True,
    )
    p = module.params
    action, run_id = p["action"], p["run_id"]
    if not ID_PATTERN.match(p["project"]):
        module.fail_json(msg=f"project {p['project']!r} is not a plain name (letters, digits, '.', '_', '-')")
    if action != "read" and not ID_PATTERN.match(run_id):
        module.fail_json(msg=f"run_id {run_id!r} is not a plain name (letters, digits, '.', '_', '-')")
    if run_id and not ID_PATTERN.match(run_id):
        module.fail_json(msg=f"run_id {run_id!r} is not a plain name")

    root = os.path.join(p["state_dir"], p["project"])
    lock_path = os.path.join(root, "lock.json")
    runs = os.path.join(root, "runs")
    run_path = os.path.join(runs, run_id + ".json") if run_id else ""
    last_path = os.path.join(root, "last-run")
    history_path = os.path.join(root, "history.jsonl")
    lock = read_json(lock_path, module.fail_json)

    def last_run():
        try:
            with open(last_path, encoding="utf-8") as handle:
                last_id = handle.read().strip()
        except FileNotFoundError:
            return None
        return read_json(os.path.join(runs, last_id + ".json"), module.fail_json) if ID_PATTERN.match(last_id) else None

    if action == "read":
        module.exit_json(
            changed=False, lock=lock, last_run=last_run(), run=read_json(run_path, module.fail_json) if run_path else None
        )

    if not module.check_mode:
        # The project directory too is 0750 (makedirs applies its mode to the last directory only).
        os.makedirs(root, mode=0o750, exist_ok=True)
        os.makedirs(runs, mode=0o750, exist_ok=True)

    if action == "lock":
        if lock is not None and lock.get("run_id") == run_id:
            module.exit_json(changed=False, lock=lock)
        if lock is not None and not p["force"]:
            module.fail_json(msg=f"deploy lock of {p['project']} is held", lock=lock, held=True)
        holder = dict(p["data"], run_id=run_id, locked_at=now())
        if module.check_mode:
            module.exit_json(changed=True, lock=holder, broken=lock)
        if lock is not None:
            os.unlink(lock_path)
        # Written whole beside it, then hard-linked into place: the link fails when a lock exists, and a
        # concurrent reader never sees a lock file without its content (an O_EXCL create, then a write,
        # let one read an empty file and fail with a traceback).
        tmp = f"{lock_path}.tmp.{os.getpid()}"
        write_file(tmp, json.dumps(holder, indent=2, sort_keys=True) + "\n")
        try:
            os.link(tmp, lock_path)
        except FileExistsError:
            os.unlink(tmp)
            module.fail_json(
                msg=f"deploy lock of {p['project']} was taken meanwhile", lock=read_json(lock_path, module.fail_json), held=True
            )
        os.unlink(tmp)
        module.exit_json(changed=True, lock=holder, broken=lock)

    if action == "unlock":
        if lock is None:
            module.exit_json(changed=False, lock=None)
        if lock.get("run_id") != run_id and not p["force"]:
            module.fail_json(msg=f"deploy lock of {p['project']} is held by run {lock.get('run_id')}, not {run_id}", lock=lock)
        if not module.check_mode:
            os.unlink(lock_path)
        module.exit_json(changed=True, lock=None, released=lock)

    # start / update / finish: the run record.
    # Each write below happens only when it changes something, and is reported (in check mode too):
    # the same call made twice is unchanged the second time.
    record = read_json(run_path, module.fail_json)
    if record is None and module.check_mode and action != "start" and p["check_record"].get("run_id") == run_id:
        record = dict(p["check_record"])  # a check-mode run: its start wrote nothing
    if record is None:
        if action != "start":
            module.fail_json(msg=f"run {run_id} has no record in {runs}")
        previous = (read_text(last_path) or "").strip()
        first = {"run_id": run_id, "created": now()}
        if ID_PATTERN.match(previous) and previous != run_id:
            first["previous_run"] = previous
        merged = merge_record(first, p["data"], p["stage"])
    else:
        merged = merge_record(record, p["data"], p["stage"])
    if action == "finish":
        stamp = now()
        merged.setdefault("finished", stamp)  # the first end of the run stays; a re-finish (rollback) adds a history line
        stages = dict(merged.get("stages") or {})
        current = merged.get("stage")
        if current in stages and "finished" not in stages[current]:
            stages[current] = dict(stages[current], finished=stamp)
        merged["stages"] = stages
    record_changed = merged != record
    point_last = action == "start" and read_text(last_path) != run_id + "\n"
    # A run that changed nothing gives the pointer back to the run before it.
    point_back = (
        action == "finish"
        and merged.get("changed_nothing") is True
        and ID_PATTERN.match(str(merged.get("previous_run", ""))) is not None
        and read_text(last_path) == run_id + "\n"
    )
    released = lock if action == "finish" and lock is not None and lock.get("run_id") == run_id else None
    if not module.check_mode:
        if record_changed:
            write_json_atomic(run_path, merged)
        if point_last:
            write_atomic(last_path, run_id + "\n")
        if point_back:
            write_atomic(last_path, merged["previous_run"] + "\n")
        if action == "finish" and record_changed:
            fd = os.open(history_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
            with os.fdopen(fd, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(merged, sort_keys=True) + "\n")
        if released is not None:
            os.unlink(lock_path)
    module.exit_json(changed=record_changed or point_last or point_back or released is not None, run=merged, released=released)


if __name__ == "__main__":
    main()
