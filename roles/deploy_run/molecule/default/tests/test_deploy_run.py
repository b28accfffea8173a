"""The state files converge.yml and side_effect.yml left on each host.

molecule_shop: run molecule-run-1 finished (record, history line, last-run), molecule-run-2 holds
the lock; the refusals and the check-mode pass of side_effect.yml changed nothing there.
molecule_stale: the lock of a dead run was broken by molecule-cleanup, which then finished.
The whole state dir is read once per host, in one remote call.
"""

from __future__ import annotations

import json
import shutil
import subprocess
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


METRICS_DIR = "/var/lib/prometheus/node-exporter"


def metric_samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value, for the sample lines of a .prom file."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def test_deploy_metrics_follow_the_lock_and_the_history_and_pass_promtool(host: Any) -> None:
    """lock.yml, finish.yml and unlock.yml rewrote djm_deploy_<project>.prom; promtool (controller) checks it."""
    listing = host.run("ls -a %s", METRICS_DIR)
    assert listing.rc == 0, listing.stderr
    names = set(listing.stdout.split())
    # One file per project, no temporary file left; check mode wrote none.
    assert names == {".", "..", "djm_deploy_molecule_shop.prom", "djm_deploy_molecule_stale.prom"}, names
    assert host.file(METRICS_DIR).mode == 0o755
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run make setup"
    texts = {}
    for project in ("molecule_shop", "molecule_stale"):
        prom = host.file(f"{METRICS_DIR}/djm_deploy_{project}.prom")
        assert prom.mode == 0o644 and prom.user == "root"
        texts[project] = prom.content_string
        check = subprocess.run([promtool, "check", "metrics"], input=texts[project], capture_output=True, text=True, check=False)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr

    shop = metric_samples(texts["molecule_shop"])
    lock = json.loads(content(host, "molecule_shop/lock.json"))
    assert shop['djm_deploy_lock_held{project="molecule_shop"}'] == 1
    since = f'djm_deploy_lock_acquired_timestamp_seconds{{project="molecule_shop",run_id="{SECOND}"}}'
    assert since in shop and lock["run_id"] == SECOND
    assert shop['djm_migrate_last_result{project="molecule_shop",result="succeeded"}'] == 1
    assert shop['djm_migrate_last_result{project="molecule_shop",result="failed"}'] == 0
    assert shop['djm_migrate_rollbacks_total{project="molecule_shop"}'] == 0
    stages = {s for s in shop if s.startswith("djm_migrate_last_run_stage_duration_seconds")}
    assert {s.split('stage="')[1].split('"')[0] for s in stages} == {"prepare", "backup", "migrate", "finish"}
    # molecule_stale: the lock released by the finish of the run that broke it.
    stale = metric_samples(texts["molecule_stale"])
    assert stale['djm_deploy_lock_held{project="molecule_stale"}'] == 0
    assert not any(s.startswith("djm_deploy_lock_acquired_timestamp_seconds") for s in stale)
