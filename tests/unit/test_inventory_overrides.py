"""Every role variable that the playbooks map from project_* can be overridden from the inventory.

Each entry point is loaded with an inventory that overrides every variable of
group_vars/all/project_roles.yml (in group_vars/all, as a new project would), and
`--tags config` prints what the plays see: each override must have taken effect.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MAPPING = REPO / "group_vars" / "all" / "project_roles.yml"
ENTRY_POINTS = ["migrate.yml", "rollback.yml", "playbooks/deploy.yml"]
PROJECT = {
    "project_name": "shop",
    "project_release_id": "r7",
    "project_release_artifact": "/tmp/shop-r7.tar.gz",
    "project_settings_module": "shop.settings.prod",
    "project_wsgi_app": "shop.wsgi:application",
    "project_healthz_path": "/up",
    "project_http_port": 8001,
    "project_db_name": "shopdb",
    "project_db_user": "shop",
    "project_db_password": "pw-never-shown-3141",
    "project_secret_key": "key-never-shown-2718",
}


def mapped_variables() -> list[str]:
    return [name for name in yaml.safe_load(MAPPING.read_text()) if not name.startswith("__")]


def write_inventory(root: Path, all_vars: dict[str, object]) -> Path:
    (root / "group_vars" / "all").mkdir(parents=True)
    hosts = {
        "all": {"children": {group: {"hosts": {f"{group}1": {"ansible_connection": "local"}}} for group in ("lb", "app", "db")}}
    }
    (root / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (root / "group_vars" / "all" / "project.yml").write_text(yaml.safe_dump(all_vars))
    return root / "hosts.yml"


def effective_config(entry_point: str, inventory: Path, config: Path | None = None) -> dict[str, dict[str, object]]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(config or REPO / "ansible.cfg"), ANSIBLE_STDOUT_CALLBACK="ansible.posix.json")
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), entry_point, "--tags", "config", "--skip-tags", "always"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    for secret in ("pw-never-shown-3141", "key-never-shown-2718"):
        assert secret not in proc.stdout + proc.stderr
    run = json.loads(proc.stdout)
    shown: dict[str, dict[str, object]] = {}
    for play in run["plays"]:
        for task in play["tasks"]:
            for result in task["hosts"].values():
                if str(result.get("msg", "")).startswith('{"host"'):
                    values = json.loads(result["msg"])
                    shown[str(values["host"])] = values
    assert set(shown) == {"lb1", "app1", "db1"}, shown
    return shown


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_mapped_variable_takes_the_inventory_value(tmp_path: Path, entry_point: str) -> None:
    names = mapped_variables()
    assert len(names) > 20, names
    overrides = {name: f"inventory-{name}" for name in names if not name.endswith("_environment")}
    overrides["django_release_environment"] = {"ONLY_THIS": "1"}
    shown = effective_config(entry_point, write_inventory(tmp_path, {**PROJECT, **overrides}))
    for host, values in shown.items():
        plain = [name for name in overrides if not name.endswith("_environment")]
        wrong = {name: values.get(name) for name in plain if values.get(name) != overrides[name]}
        assert not wrong, f"{host}: not overridden from the inventory: {wrong}"
        assert values["django_release_environment (names only)"] == ["ONLY_THIS"]


def test_without_overrides_the_mapping_applies(tmp_path: Path) -> None:
    shown = effective_config("migrate.yml", write_inventory(tmp_path, PROJECT))
    app = shown["app1"]
    assert app["django_release_root"] == "/srv/shop"
    assert app["django_service_port"] == 8001
    assert app["pg_backup_database"] == "shopdb"
    assert app["loadbalancer_health_path"] == "/up"
    assert "DATABASE_PASSWORD" in app["django_release_environment (names only)"]


def test_a_foreign_ansible_cfg_is_refused(tmp_path: Path) -> None:
    """Without the project's precedence lines the mapping would beat the inventory: refuse, say why."""
    foreign = tmp_path / "ansible.cfg"
    foreign.write_text(f"[defaults]\nroles_path = {REPO / 'roles'}\n")
    inventory = write_inventory(tmp_path / "inv", PROJECT)
    env = dict(os.environ, ANSIBLE_CONFIG=str(foreign), ANSIBLE_NOCOLOR="1")
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), "migrate.yml", "--tags", "validate"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode != 0
    assert "would override the inventory silently" in proc.stdout
