"""galaxy.yml: the roles build into the collection djm.fleet offline, install from the tarball, and run from it.

Built into tmp_path (``ansible-galaxy collection build``), installed with ``--offline`` into a
collections directory of its own, then a playbook that knows nothing of this repository (its own
ansible.cfg: no roles_path; cwd outside the repository) runs ``djm.fleet.deploy_run`` on localhost:
lock, record, finish, unlock, each writing the deploy metrics through ``prometheus_textfile``,
which deploy_run includes by its short name (found in the collection). The state and the metric
file it leaves are checked, the metric file by promtool.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

PLAYBOOK = """
- name: One run of djm.fleet.deploy_run from the installed collection
  hosts: localhost
  connection: local
  gather_facts: false
  vars:
    deploy_run_project: shop
    deploy_run_state_dir: "{{ work }}/state"
    deploy_run_metrics_dir: "{{ work }}/metrics"
    deploy_run_controller_dir: ""
    deploy_run_id: run-1
  tasks:
    - name: Take the lock
      ansible.builtin.include_role: {name: djm.fleet.deploy_run, tasks_from: lock.yml}
      vars: {deploy_run_lock_data: {owner: test}}
    - name: Start the record
      ansible.builtin.include_role: {name: djm.fleet.deploy_run, tasks_from: record.yml}
      vars: {deploy_run_start: true, deploy_run_stage: migrate, deploy_run_data: {from_release: v1, to_release: v2}}
    - name: Finish the run
      ansible.builtin.include_role: {name: djm.fleet.deploy_run, tasks_from: finish.yml}
      vars: {deploy_run_stage: finish, deploy_run_data: {result: succeeded}}
    - name: Read the state
      ansible.builtin.include_role: {name: djm.fleet.deploy_run}
    - name: Check what the role read
      ansible.builtin.assert:
        that:
          - deploy_run_status.lock is none
          - deploy_run_status.last_run.result == 'succeeded'
"""


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("collection")
    proc = subprocess.run(
        ["ansible-galaxy", "collection", "build", "--output-path", str(out), str(REPO)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    built = out / f"{galaxy['namespace']}-{galaxy['name']}-{galaxy['version']}.tar.gz"
    assert built.is_file(), list(out.iterdir())
    return built


def test_tarball_holds_the_roles_and_no_local_state(tarball: Path) -> None:
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("MANIFEST.json"))  # type: ignore[arg-type]
    roles = {p.name for p in (REPO / "roles").iterdir() if (p / "tasks" / "main.yml").is_file()}
    assert {n.split("/")[1] for n in names if n.startswith("roles/") and n.count("/") >= 2} == roles
    for role in roles:
        assert f"roles/{role}/meta/argument_specs.yml" in names
    assert "playbooks/migrate.yml" in names and "monitoring/alerts.yml" in names
    assert "roles/prometheus_textfile/library/prometheus_textfile.py" in names
    # The roles' files that are links into scripts/ have their target in the tarball.
    assert "scripts/db_fingerprint.py" in names
    top = {n.split("/")[0] for n in names}
    for local in (".venv", "build", ".cache", ".fleet", ".git", "examples", "tests", "molecule"):
        assert local not in top, local
    assert not [n for n in names if n.endswith((".tar.gz", ".pyc", ".log")) or "/molecule/" in n or "__pycache__" in n]
    # Nothing to download when it is installed.
    assert manifest["collection_info"]["dependencies"] == {}
    assert tarball.stat().st_size < 2 * 1024 * 1024


def test_a_role_runs_from_the_installed_collection(tarball: Path, tmp_path: Path) -> None:
    collections = tmp_path / "collections"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    # No Galaxy server reachable, none needed.
    env["ANSIBLE_GALAXY_SERVER"] = "http://127.0.0.1:9/"
    env["ANSIBLE_COLLECTIONS_PATH"] = str(collections)
    install = subprocess.run(
        ["ansible-galaxy", "collection", "install", "--offline", "--force", "-p", str(collections), str(tarball)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    installed = collections / "ansible_collections" / "djm" / "fleet"
    assert (installed / "roles" / "deploy_run" / "tasks" / "finish.yml").is_file()

    # A controller that has the collection and nothing of this repository.
    (tmp_path / "ansible.cfg").write_text(f"[defaults]\ncollections_path = {collections}\nroles_path = {tmp_path / 'none'}\n")
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    env.update(ANSIBLE_CONFIG=str(tmp_path / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    extra = ["-e", f"work={tmp_path}", "-e", f"ansible_python_interpreter={sys.executable}"]
    run = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", "play.yml", *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
    assert "djm.fleet.deploy_run" in run.stdout and "djm.fleet.prometheus_textfile" in run.stdout

    history = (tmp_path / "state" / "shop" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["result"] for line in history] == ["succeeded"]
    prom = (tmp_path / "metrics" / "djm_deploy_shop.prom").read_text()
    assert 'djm_deploy_lock_held{project="shop"} 0' in prom
    assert 'djm_migrate_last_result{project="shop",result="succeeded"} 1' in prom
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run make setup"
    check = subprocess.run([promtool, "check", "metrics"], input=prom, capture_output=True, text=True, check=False)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr


def test_execution_environment_installs_this_collection_version_offline() -> None:
    """execution-environment.yml (ansible-builder 3): the tarball galaxy.yml builds, the pinned ansible-core, requirements.yml."""
    ee = yaml.safe_load((REPO / "execution-environment.yml").read_text())
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    tarball = f"{galaxy['namespace']}-{galaxy['name']}-{galaxy['version']}.tar.gz"
    assert ee["version"] == 3
    assert [f["src"] for f in ee["additional_build_files"]] == [f"build/collection/{tarball}"]
    assert any(tarball in step and "--offline" in step for step in ee["additional_build_steps"]["append_final"])
    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line)
    assert ee["dependencies"]["ansible_core"]["package_pip"] == f"ansible-core=={pins['ansible-core']}"
    assert ee["dependencies"]["ansible_runner"]["package_pip"] == f"ansible-runner=={pins['ansible-runner']}"
    assert (REPO / ee["dependencies"]["galaxy"]).is_file()
