"""The first play of every entry point stops bad inventories with a message that says what to fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GOOD_VARS = {
    "project_name": "shop",
    "project_release_id": "r2024.1",
    "project_release_artifact": "/tmp/shop-r2024.1.tar.gz",
    "project_settings_module": "shop.settings.prod",
    "project_wsgi_app": "shop.wsgi:application",
    "project_healthz_path": "/health/",
    "project_http_port": 8000,
    "project_db_name": "shop",
    "project_db_user": "shop",
    "project_db_password": "s3cret-db-password",
    "project_secret_key": "s3cret-django-key",
}


def inventory(groups: dict[str, list[str]], variables: dict[str, object]) -> dict:
    return {
        "all": {
            "children": {name: {"hosts": {h: {"ansible_connection": "local"} for h in hosts}} for name, hosts in groups.items()},
            "vars": variables,
        }
    }


def run_validate(tmp_path: Path, inv: dict) -> subprocess.CompletedProcess[str]:
    inv_file = tmp_path / "hosts.yml"
    inv_file.write_text(yaml.safe_dump(inv))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        ["ansible-playbook", "-i", str(inv_file), str(REPO / "playbooks" / "validate.yml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


FULL = {"app": ["app1", "app2"], "db": ["db1"], "lb": ["lb1"]}


def test_good_inventory_passes(tmp_path: Path) -> None:
    result = run_validate(tmp_path, inventory(FULL, GOOD_VARS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed=0" in result.stdout
    for secret in ("s3cret-django-key", "s3cret-db-password"):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ({"app": ["app1"], "db": ["db1"]}, "Inventory group 'lb' is missing"),
        ({"app": ["app1"], "db": [], "lb": ["lb1"]}, "Inventory group 'db' is"),
        ({}, "Inventory group 'app' is missing"),
    ],
)
def test_missing_or_empty_group_is_named(tmp_path: Path, groups: dict[str, list[str]], expected: str) -> None:
    result = run_validate(tmp_path, inventory(groups, GOOD_VARS))
    assert result.returncode != 0
    assert expected in result.stdout


def test_missing_variable_is_named(tmp_path: Path) -> None:
    variables = {k: v for k, v in GOOD_VARS.items() if k != "project_settings_module"}
    result = run_validate(tmp_path, inventory(FULL, variables))
    assert result.returncode != 0
    assert "Variable 'project_settings_module' is not set" in result.stdout


def test_missing_secret_fails_without_printing_secrets(tmp_path: Path) -> None:
    variables = dict(GOOD_VARS, project_db_password="{{ vault_project_db_password }}")
    result = run_validate(tmp_path, inventory(FULL, variables))
    assert result.returncode != 0
    assert "Secret 'project_db_password' is not set" in result.stdout
    for secret in ("s3cret-django-key", "s3cret-db-password"):
        assert secret not in result.stdout + result.stderr


def test_unsafe_release_id_is_refused(tmp_path: Path) -> None:
    result = run_validate(tmp_path, inventory(FULL, dict(GOOD_VARS, project_release_id="../etc")))
    assert result.returncode != 0
    assert "project_release_id made of letters" in result.stdout


def test_release_source_is_required(tmp_path: Path) -> None:
    result = run_validate(tmp_path, inventory(FULL, dict(GOOD_VARS, project_release_artifact="")))
    assert result.returncode != 0
    assert "Set project_release_artifact" in result.stdout


@pytest.mark.parametrize("name", ["migrate_on_unsafe_restore", "rollback_on_unsafe_restore"])
def test_what_to_do_with_writes_a_restore_would_discard_is_export_or_stop(tmp_path: Path, name: str) -> None:
    assert run_validate(tmp_path, inventory(FULL, dict(GOOD_VARS, **{name: "stop"}))).returncode == 0
    result = run_validate(tmp_path, inventory(FULL, dict(GOOD_VARS, **{name: "discard"})))
    assert result.returncode != 0
    assert f"{name} ('discard')" in result.stdout and "must be export or stop" in result.stdout


@pytest.mark.parametrize(
    "bad",
    [{"project_static_port": 8000}, {"project_static_port": "eighty"}, {"project_static_url": "static"}],
)
def test_static_files_on_the_app_port_or_a_url_without_slashes_is_refused(tmp_path: Path, bad: dict[str, object]) -> None:
    result = run_validate(tmp_path, inventory(FULL, {**GOOD_VARS, **bad}))
    assert result.returncode != 0
    assert "must be 0 (the project serves its own static files) or a" in result.stdout
    # 0: the project serves its own.
    assert run_validate(tmp_path, inventory(FULL, {**GOOD_VARS, "project_static_port": 0})).returncode == 0


def test_debug_toolbar_is_refused_for_an_inventory_marked_production(tmp_path: Path) -> None:
    # Staging (not marked): allowed.
    assert run_validate(tmp_path, inventory(FULL, {**GOOD_VARS, "project_debug_toolbar": True})).returncode == 0
    # Marked production: refused, naming the mark; without the toolbar it passes.
    marked = {**GOOD_VARS, "project_production": True}
    result = run_validate(tmp_path, inventory(FULL, {**marked, "project_debug_toolbar": True}))
    assert result.returncode != 0
    assert "project_debug_toolbar is true but this inventory is production (project_production: true)" in result.stdout
    assert run_validate(tmp_path, inventory(FULL, marked)).returncode == 0


def test_debug_toolbar_is_refused_for_an_inventory_in_a_production_directory(tmp_path: Path) -> None:
    """./production links to inventories/production: an inventory there is production without any mark."""
    inv_dir = tmp_path / "production"
    inv_dir.mkdir()
    result = run_validate(inv_dir, inventory(FULL, {**GOOD_VARS, "project_debug_toolbar": True}))
    assert result.returncode != 0
    assert "a source in a directory named production" in result.stdout


def test_the_repository_inventories_mark_production_and_turn_the_toolbar_on_in_staging() -> None:
    production = yaml.safe_load((REPO / "inventories/production/group_vars/all/project.yml").read_text())
    staging = yaml.safe_load((REPO / "inventories/staging/group_vars/all/project.yml").read_text())
    assert production["project_production"] is True
    assert production.get("project_debug_toolbar", False) is False
    assert staging["project_debug_toolbar"] is True
    assert staging.get("project_production", False) is False


def test_the_production_inventory_refuses_the_toolbar_before_anything_else() -> None:
    """The repository's ./production, toolbar asked on the command line: refused first (its vault is not even needed)."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    result = subprocess.run(
        ["ansible-playbook", "-i", "production", "migrate.yml", "--tags", "validate", "-e", "project_debug_toolbar=true"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "project_debug_toolbar is true but this inventory is production (project_production: true)" in result.stdout
