"""The state files converge.yml and side_effect.yml left on each host.

molecule_shop: run molecule-run-1 finished (record, history line, last-run), molecule-run-2 holds
the lock; the refusals and the check-mode pass of side_effect.yml changed nothing there.
molecule_stale: the lock of a dead run was broken by molecule-cleanup, which then finished.
The whole state dir is read once per host, in one remote call.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

STATE = "/var/lib/djm"
FIRST, SECOND = "molecule-run-1", "molecule-run-2"

# Run by the host's python3: every path under the state dir, with type, mode, owner and content.
SNAPSHOT = r"""
import json, os, pwd, grp, stat, sys
root = sys.argv[1]
out = {}
for base, dirs, files in os.walk(root):
    for name in dirs + files:
        path = os.path.join(base, name)
        st = os.lstat(path)
        entry = {"dir": stat.S_ISDIR(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                 "user": pwd.getpwuid(st.st_uid).pw_name, "group": grp.getgrgid(st.st_gid).gr_name}
        if stat.S_ISREG(st.st_mode):
            with open(path, encoding="utf-8") as handle:
                entry["content"] = handle.read()
        out[os.path.relpath(path, root)] = entry
print(json.dumps(out))
"""


@cache
def state(host: Any) -> dict[str, dict[str, Any]]:
    cmd = host.run("python3 -c %s %s", SNAPSHOT, STATE)
    assert cmd.rc == 0, cmd.stderr
    return json.loads(cmd.stdout)


def content(host: Any, path: str) -> str:
    return state(host)[path]["content"]


def history(host: Any, project: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in content(host, f"{project}/history.jsonl").splitlines()]


def test_state_is_private_to_root(host: Any) -> None:
    entries = state(host)
    assert {path for path in entries if "/" not in path} == {"molecule_shop", "molecule_stale"}
    for path, entry in entries.items():
        assert (entry["user"], entry["group"]) == ("root", "root"), path
        assert entry["mode"] == (0o750 if entry["dir"] else 0o640), f"{path}: {oct(entry['mode'])}"
    assert not [path for path in entries if ".tmp" in path]


def test_lock_is_held_by_the_second_run(host: Any) -> None:
    lock = json.loads(content(host, "molecule_shop/lock.json"))
    assert lock == {
        "run_id": SECOND,
        "owner": "molecule",
        "controller": "ci-controller-2",
        "pid": 4343,
        "playbook": "rollback",
        "target": "v1",
        "locked_at": lock["locked_at"],
    }
    assert lock["locked_at"] >= json.loads(content(host, f"molecule_shop/runs/{FIRST}.json"))["finished"]


def test_first_run_record_went_through_its_stages(host: Any) -> None:
    assert sorted(p for p in state(host) if p.startswith("molecule_shop/runs/")) == [f"molecule_shop/runs/{FIRST}.json"]
    record = json.loads(content(host, f"molecule_shop/runs/{FIRST}.json"))
    assert {k: record[k] for k in ("run_id", "playbook", "from_release", "to_release", "result", "stage")} == {
        "run_id": FIRST,
        "playbook": "migrate",
        "from_release": "v1",
        "to_release": "v2",
        "result": "succeeded",
        "stage": "finish",
    }
    assert record["hosts"] == ["app1", "app2"] and record["switched"] == ["app1", "app2"]
    assert record["backup_id"] == "pre-v2" and record["applied"] == ["shop.0002_orders"]
    stages = record["stages"]
    assert set(stages) == {"prepare", "backup", "migrate", "finish"}
    assert {k: stages["backup"][k] for k in ("bytes", "verified", "files")} == {"bytes": 52428800, "verified": True, "files": 12}
    assert stages["migrate"]["migrations"] == 1
    order = ["prepare", "backup", "migrate", "finish"]
    stamps = [record["created"]] + [stages[s][edge] for s in order for edge in ("started", "finished")] + [record["finished"]]
    assert stamps == sorted(stamps), stamps
    for before, after in zip(order, order[1:]):
        assert stages[before]["finished"] == stages[after]["started"], (before, after)


def test_history_has_one_line_per_finish(host: Any) -> None:
    record = json.loads(content(host, f"molecule_shop/runs/{FIRST}.json"))
    assert history(host, "molecule_shop") == [record]
    assert content(host, "molecule_shop/last-run") == f"{FIRST}\n"


def test_stale_lock_was_broken_and_its_breaker_finished(host: Any) -> None:
    entries = state(host)
    assert "molecule_stale/lock.json" not in entries  # released by the finish of molecule-cleanup
    assert "molecule_check" not in entries  # check mode made nothing
    dead = json.loads(content(host, "molecule_stale/runs/molecule-dead.json"))
    assert dead["stage"] == "migrate" and "finished" not in dead and "result" not in dead
    cleanup = json.loads(content(host, "molecule_stale/runs/molecule-cleanup.json"))
    assert cleanup["result"] == "succeeded" and cleanup["broke_lock_of"] == "molecule-dead"
    assert set(cleanup["stages"]) == {"cleanup", "finish"}
    assert history(host, "molecule_stale") == [cleanup]
    assert content(host, "molecule_stale/last-run") == "molecule-cleanup\n"


# Run by the host's python3: the unit (from its cgroup) of every `sleep 600` the side effect started.
SLEEPERS = r"""
import json, os, re
units = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
        if os.path.basename(argv[0]) != b"sleep" or argv[1:2] != [b"600"]:
            continue
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as handle:
            units.append(re.findall(r"([^/]+)\.service", handle.read())[-1])
    except (OSError, IndexError):
        continue
print(json.dumps(sorted(units)))
"""


def test_only_what_other_runs_of_the_project_left_running_was_stopped(host: Any) -> None:
    # The promise is about processes: those of run-1 are gone, the others still run. (How soon systemd
    # then calls their units inactive is its own business: in a loaded container it was over 60 s.)
    sleepers = host.run("python3 -c %s", SLEEPERS)
    assert sleepers.rc == 0, sleepers.stderr
    assert json.loads(sleepers.stdout) == ["molecule-orphan-other-project", "molecule-orphan-own"]
    active = {
        unit: host.run("systemctl is-active %s", unit).stdout.strip()
        for unit in ("molecule-orphan-unit", "molecule-orphan-tree", "molecule-orphan-own", "molecule-orphan-other-project")
    }
    assert active["molecule-orphan-own"] == active["molecule-orphan-other-project"] == "active", active
    assert "active" not in (active["molecule-orphan-unit"], active["molecule-orphan-tree"]), active
