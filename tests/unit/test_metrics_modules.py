"""The Prometheus textfile writer (roles/prometheus_textfile) and the deploy state's metrics (roles/deploy_run).

Each module runs as Ansible runs it on a host (``python module.py args.json``); the text it writes
goes through ``promtool check metrics`` (installed by ``make setup`` into the virtualenv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TEXTFILE = REPO / "roles" / "prometheus_textfile" / "library" / "prometheus_textfile.py"
DEPLOY_METRICS = REPO / "roles" / "deploy_run" / "library" / "deploy_run_metrics.py"


def run_module(module: Path, tmp_path: Path, args: dict[str, Any], check: bool = False) -> dict[str, Any]:
    args_file = tmp_path / f"args-{len(list(tmp_path.glob('args-*')))}.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {**args, "_ansible_check_mode": check}}))
    proc = subprocess.run([sys.executable, str(module), str(args_file)], capture_output=True, text=True, timeout=60, check=False)
    result = json.loads(proc.stdout)
    assert (proc.returncode != 0) == bool(result.get("failed")), proc.stdout + proc.stderr
    return result


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run make setup")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr + text


METRICS = [
    {
        "name": "djm_example_info",
        "type": "gauge",
        "help": "A help text with a backslash \\ and\na newline.",
        "samples": [{"labels": {"release": 'v2 "quoted" \\ \n', "project": "shop"}, "value": 1}],
    },
    {"name": "djm_example_bytes", "help": "Bytes.", "samples": [{"value": "123456789"}, {"labels": {"x": "y"}, "value": 0.25}]},
    {"name": "djm_example_events_total", "type": "counter", "help": "Events.", "samples": [{"labels": {"p": "a"}, "value": 3}]},
]


def test_textfile_is_written_atomically_once_and_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "djm_example.prom"  # its directory made by the module
    first = run_module(TEXTFILE, tmp_path, {"path": str(path), "metrics": METRICS})
    assert first["changed"]
    text = path.read_text()
    assert 'djm_example_info{project="shop",release="v2 \\"quoted\\" \\\\ \\n"} 1' in text
    assert "# HELP djm_example_info A help text with a backslash \\\\ and\\na newline." in text
    assert "djm_example_bytes 123456789\n" in text and 'djm_example_bytes{x="y"} 0.25\n' in text
    assert "# TYPE djm_example_events_total counter" in text
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o755"
    promtool_check(text)
    # The same values again: nothing written (same inode), nothing left beside the file.
    inode = path.stat().st_ino
    assert not run_module(TEXTFILE, tmp_path, {"path": str(path), "metrics": METRICS})["changed"]
    assert path.stat().st_ino == inode
    # New values: a new file renamed over the old one (another inode), no temporary file left.
    changed = [dict(METRICS[2], samples=[{"labels": {"p": "a"}, "value": 4}])]
    assert run_module(TEXTFILE, tmp_path, {"path": str(path), "metrics": changed})["changed"]
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in path.parent.iterdir()) == ["djm_example.prom"]
    assert 'djm_example_events_total{p="a"} 4' in path.read_text()


def test_check_mode_reports_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "djm_example.prom"
    result = run_module(TEXTFILE, tmp_path, {"path": str(path), "metrics": METRICS}, check=True)
    assert result["changed"] and "djm_example_info" in result["diff"]["after"]
    assert not path.exists()
    # Nor its directory.
    missing = tmp_path / "missing" / "djm_example.prom"
    assert run_module(TEXTFILE, tmp_path, {"path": str(missing), "metrics": METRICS}, check=True)["changed"]
    assert not missing.parent.exists()


@pytest.mark.parametrize(
    ("path", "metrics", "message"),
    [
        ("x.txt", METRICS, "only files whose name ends in .prom"),
        ("file.prom/x.prom", METRICS, "cannot create"),
        ("x.prom", [{"name": "bad-name", "samples": []}], "is not a Prometheus metric name"),
        ("x.prom", [{"name": "djm_runs", "type": "counter", "samples": []}], "must end in _total"),
        ("x.prom", [{"name": "djm_a", "samples": [{"labels": {"__name": "x"}, "value": 1}]}], "label name '__name'"),
        ("x.prom", [{"name": "djm_a", "samples": [{"value": "many"}]}], "is not a number"),
        ("x.prom", [{"name": "djm_a", "samples": []}, {"name": "djm_a", "samples": []}], "given twice"),
    ],
)
def test_bad_input_is_refused_and_nothing_written(tmp_path: Path, path: str, metrics: list[dict[str, Any]], message: str) -> None:
    (tmp_path / "file.prom").write_text("a file where a directory should be")
    result = run_module(TEXTFILE, tmp_path, {"path": str(tmp_path / path), "metrics": metrics})
    assert result.get("failed") and message in result["msg"], result
    assert [p.name for p in tmp_path.glob("*.prom")] == ["file.prom"]


def record(run_id: str, result: str, **extra: Any) -> dict[str, Any]:
    stages = {
        "preflight": {"started": "2026-11-30T10:00:00Z", "finished": "2026-11-30T10:00:05Z"},
        "backup": {"started": "2026-11-30T10:00:05Z", "finished": "2026-11-30T10:01:45Z"},
        "finish": {"started": "2026-11-30T10:05:00Z", "finished": "2026-11-30T10:05:02Z"},
    }
    return {"run_id": run_id, "result": result, "from_release": "v1", "to_release": "v2", "strategy": "rolling",
            "stages": stages, "finished": "2026-11-30T10:05:02Z", **extra}  # fmt: skip


def test_deploy_metrics_from_the_history_and_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "state" / "shop"
    root.mkdir(parents=True)
    undone_by_converge = {"mode": "reverse", "by_run": "run-2", "finished": "2026-11-30T11:00:00Z", "result": "done"}
    undone_by_rollback = {"mode": "code", "by_run": "rollback-1", "finished": "2026-11-30T12:00:00Z", "result": "done"}
    history = [
        record("run-1", "succeeded"),
        record("run-2", "rolled_back", converge=undone_by_converge),
        record("run-3", "succeeded"),
        record("run-3", "rolled_back", converge=undone_by_rollback),  # rollback.yml finished run-3 again
        record("run-3", "rolled_back", converge=undone_by_rollback),  # ... and a re-run wrote it once more
        record("run-4", "failed", converge={"mode": "restore", "by_run": "run-4", "failed": "cut"}),
        record("run-5", "planned", changed_nothing=True),  # a plan-only run hides nothing
    ]
    (root / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history) + '{"cut in the mid')
    args = {"state_dir": str(tmp_path / "state"), "project": "shop"}
    metrics = {m["name"]: m for m in run_module(DEPLOY_METRICS, tmp_path, args)["metrics"]}

    def values(name: str) -> dict[str, float]:
        return {json.dumps(s["labels"], sort_keys=True): s["value"] for s in metrics[name]["samples"]}

    assert values("djm_deploy_lock_held") == {'{"project": "shop"}': 0}
    assert "djm_deploy_lock_acquired_timestamp_seconds" not in metrics
    assert metrics["djm_migrate_rollbacks_total"]["type"] == "counter"
    assert values("djm_migrate_rollbacks_total") == {'{"project": "shop"}': 2}
    result = {json.loads(k)["result"]: v for k, v in values("djm_migrate_last_result").items()}
    assert result == {"failed": 1, "rolled_back": 0, "succeeded": 0}
    assert [s["labels"]["run_id"] for s in metrics["djm_migrate_last_run_info"]["samples"]] == ["run-4"]
    stages = {json.loads(k)["stage"]: v for k, v in values("djm_migrate_last_run_stage_duration_seconds").items()}
    assert stages == {"backup": 100, "finish": 2, "preflight": 5}

    # The lock taken by run-6: held, since when; the text passes promtool.
    (root / "lock.json").write_text(json.dumps({"run_id": "run-6", "locked_at": "2026-11-30T13:00:00Z"}))
    listed = run_module(DEPLOY_METRICS, tmp_path, args)["metrics"]
    metrics = {m["name"]: m for m in listed}
    assert values("djm_deploy_lock_held") == {'{"project": "shop"}': 1}
    assert values("djm_deploy_lock_acquired_timestamp_seconds") == {'{"project": "shop", "run_id": "run-6"}': 1796043600}
    prom = tmp_path / "djm_deploy_shop.prom"
    run_module(TEXTFILE, tmp_path, {"path": str(prom), "metrics": listed})
    promtool_check(prom.read_text())


def test_deploy_metrics_of_a_project_without_runs(tmp_path: Path) -> None:
    listed = run_module(DEPLOY_METRICS, tmp_path, {"state_dir": str(tmp_path / "none"), "project": "shop"})["metrics"]
    assert [m["name"] for m in listed] == ["djm_deploy_lock_held", "djm_migrate_rollbacks_total"]
    assert os.listdir(tmp_path) == [p.name for p in tmp_path.glob("args-*")]


ROLE_TASKS = """
- name: The metric task files of pg_backup and django_release, on this machine
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Write the metrics of a verified backup
      ansible.builtin.include_role: {name: pg_backup, tasks_from: metrics.yml}
      vars:
        pg_backup_id: pre-v2
        pg_backup_database: shopdb
        pg_backup_metrics_dir: "{{ work }}/metrics"
        pg_backup_result:
          manifest: {started_at: "2026-11-30T19:00:00+00:00", finished_at: "2026-11-30T19:01:40+00:00",
                     dump_size_bytes: 12345, db_size_bytes: 99999, release_id: v2}
    - name: Write the metrics of the release this host serves
      ansible.builtin.include_role: {name: django_release, tasks_from: metrics.yml}
      vars:
        django_release_name: shop
        django_release_id: r7
        django_release_root: "{{ work }}/srv"
        django_release_metrics_dir: "{{ work }}/metrics"
"""


def test_backup_and_release_metric_files_from_the_role_tasks(tmp_path: Path) -> None:
    """pg_backup's and django_release's metrics.yml (what a backup and a switch include), run twice: valid, then unchanged."""
    (tmp_path / "srv" / "releases" / "r7").mkdir(parents=True)
    (tmp_path / "srv" / "current").symlink_to(tmp_path / "srv" / "releases" / "r7")
    (tmp_path / "play.yml").write_text(ROLE_TASKS)
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(REPO / "roles"), ANSIBLE_NOCOLOR="1")
    argv = ["ansible-playbook", "-i", "localhost,", "play.yml", "-e", f"work={tmp_path}"]
    argv += ["-e", f"ansible_python_interpreter={sys.executable}"]
    for changed in ("changed=2", "changed=0"):
        run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0 and changed in run.stdout, run.stdout[-3000:] + run.stderr
    backup = (tmp_path / "metrics" / "djm_backup_shopdb.prom").read_text()
    release = (tmp_path / "metrics" / "djm_release_shop.prom").read_text()
    for text in (backup, release):
        promtool_check(text)
    assert 'djm_backup_last_verified_timestamp_seconds{database="shopdb"} 1796065300\n' in backup
    assert 'djm_backup_last_verified_duration_seconds{database="shopdb"} 100\n' in backup
    assert 'djm_backup_last_verified_size_bytes{database="shopdb"} 12345\n' in backup
    assert 'djm_backup_last_verified_info{backup_id="pre-v2",database="shopdb",release="v2"} 1\n' in backup
    assert 'djm_release_info{project="shop",release="r7"} 1\n' in release
    switched = int(os.lstat(tmp_path / "srv" / "current").st_mtime)
    assert f'djm_release_switched_timestamp_seconds{{project="shop"}} {switched}\n' in release
    # A directory that cannot be made: reported, and the run goes on (a backup or a switch never fails for metrics).
    (tmp_path / "a-file").write_text("")
    broken = [f"{role}_metrics_dir={tmp_path / 'a-file' / 'metrics'}" for role in ("pg_backup", "django_release")]
    run = subprocess.run(
        [*argv, "-e", broken[0], "-e", broken[1]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0 and "rescued=2" in run.stdout, run.stdout[-3000:] + run.stderr
    assert run.stdout.count("Prometheus metrics not written to") == 2 and "The run goes on" in run.stdout
