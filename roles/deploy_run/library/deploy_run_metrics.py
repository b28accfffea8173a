#!/usr/bin/python
"""Ansible module: the Prometheus metrics of one environment's deploy state (read only)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: deploy_run_metrics
short_description: Metrics of the deploy lock, the last run and the rollbacks of one environment
description:
  - Reads what the deploy_run module keeps under I(state_dir)/I(project)/ (C(lock.json),
    C(history.jsonl)) and returns the metric families for the prometheus_textfile role. Writes nothing.
  - The last run is the newest history line that changed something (a plan-only or unchanged run
    does not hide a failed one). The rollbacks counter counts the distinct undos in the whole history
    (a run and the run that undid it), so it survives re-runs and never goes down.
options:
  state_dir:
    description: Directory that holds every project's state.
    type: path
    required: true
  project:
    description: Project name (a directory under I(state_dir)); the C(project) label of every metric.
    type: str
    required: true
"""

import calendar  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

# Every result a finished record can carry, so an alert on one of them sees 0 as well as 1.
RESULTS = ("succeeded", "failed", "rolled_back")


def epoch(stamp):
    """Seconds since the epoch of a record's %Y-%m-%dT%H:%M:%SZ stamp (None when unreadable)."""
    try:
        return calendar.timegm(time.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None


def read_history(path):
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue  # a line cut by a crash: the next finish appends a whole one
    except FileNotFoundError:
        return


def gauge(name, help_text, samples, kind="gauge"):
    return {"name": name, "type": kind, "help": help_text, "samples": samples}


def deploy_metrics(state_dir, project):
    root = os.path.join(state_dir, project)
    label = {"project": project}
    try:
        with open(os.path.join(root, "lock.json"), encoding="utf-8") as handle:
            lock = json.load(handle)
    except (FileNotFoundError, ValueError):
        lock = None
    last = None
    undos = set()
    for record in read_history(os.path.join(root, "history.jsonl")):
        if record.get("changed_nothing") is not True:
            last = record
        converge = record.get("converge") or {}
        if converge.get("finished") and not converge.get("failed"):
            undos.add((record.get("run_id"), converge.get("by_run"), converge.get("finished")))
    metrics = [
        gauge(
            "djm_deploy_lock_held",
            "1 while a run holds the deploy lock of the project.",
            [{"labels": label, "value": int(lock is not None)}],
        )
    ]
    locked_at = epoch(lock.get("locked_at")) if lock else None
    if locked_at is not None:
        metrics.append(
            gauge(
                "djm_deploy_lock_acquired_timestamp_seconds",
                "When the run holding the deploy lock took it (present only while it is held).",
                [{"labels": dict(label, run_id=lock.get("run_id", "")), "value": locked_at}],
            )
        )
    # Distinct undos: a run and the run that undid it (converge.by_run), at the time it finished.
    metrics.append(
        gauge(
            "djm_migrate_rollbacks_total",
            "Runs undone (by converge.yml in the failed run, or by rollback.yml), counted over the whole history.",
            [{"labels": label, "value": len({(run, by) for run, by, _ in undos})}],
            kind="counter",
        )
    )
    if last is None:
        return metrics
    result = str(last.get("result") or "failed")
    stages = last.get("stages") or {}
    ends = [epoch(s.get("finished")) for s in stages.values() if isinstance(s, dict)]
    ends = [e for e in [*ends, epoch(last.get("finished"))] if e is not None]
    durations = []
    for name, times in sorted(stages.items()):
        start, end = epoch((times or {}).get("started")), epoch((times or {}).get("finished"))
        if start is not None and end is not None:
            durations.append({"labels": dict(label, stage=name), "value": max(0, end - start)})
    metrics += [
        gauge(
            "djm_migrate_last_result",
            "Result of the last run that changed something: 1 for its result, 0 for the others.",
            [{"labels": dict(label, result=r), "value": int(r == result)} for r in sorted(set(RESULTS) | {result})],
        ),
        gauge(
            "djm_migrate_last_run_info",
            "The last run that changed something: its id, releases and strategy (value 1).",
            [
                {
                    "labels": dict(
                        label,
                        run_id=str(last.get("run_id", "")),
                        from_release=str(last.get("from_release") or ""),
                        to_release=str(last.get("to_release") or ""),
                        strategy=str(last.get("strategy") or ""),
                    ),
                    "value": 1,
                }
            ],
        ),
        gauge(
            "djm_migrate_last_run_finished_timestamp_seconds",
            "When the last run that changed something ended.",
            [{"labels": label, "value": max(ends)}] if ends else [],
        ),
        gauge("djm_migrate_last_run_stage_duration_seconds", "Seconds the last run spent in each of its stages.", durations),
    ]
    return [m for m in metrics if m["samples"]]


def main():
    module = AnsibleModule(
        argument_spec={"state_dir": {"type": "path", "required": True}, "project": {"type": "str", "required": True}},
        supports_check_mode=True,
    )
    module.exit_json(changed=False, metrics=deploy_metrics(module.params["state_dir"], module.params["project"]))


if __name__ == "__main__":
    main()
