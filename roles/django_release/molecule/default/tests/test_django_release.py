"""Checks of the django_release scenario: releases r1 and r2 of the fixture app, r2 current."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

ROOT = "/srv/acme"
EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
ARTIFACT = EPHEMERAL / "releases" / "acme-v1.tar.gz"
SECRET = "molecule-s3cret-$HOME-\"quoted\"-`tick`-\\back-'single'-0123456789abcdefghijklmnop"  # noqa: S105 - a test value, not a credential


def system_python_version(host) -> str:
    return host.check_output("python3 -c 'import platform; print(platform.python_version())'")


def manifest(host, release: str) -> dict:
    return json.loads(host.file(f"{ROOT}/releases/{release}/RELEASE.json").content_string)


def test_user_and_layout(host):
    user = host.user("acme")
    assert user.shell == "/usr/sbin/nologin"
    assert user.home == ROOT
    for release in ("r1", "r2"):
        assert host.file(f"{ROOT}/releases/{release}/manage.py").is_file
        assert host.file(f"{ROOT}/releases/{release}/manage.py").user == "root"


@pytest.mark.parametrize("release", ["r1", "r2"])
def test_venv_uses_the_requested_interpreter(host, release):
    venv_python = f"{ROOT}/releases/{release}/venv/bin/python"
    version = host.check_output(f"{venv_python} -c 'import platform; print(platform.python_version())'")
    assert version == system_python_version(host)
    django = host.check_output(f"{venv_python} -c 'import django; print(django.get_version())'")
    assert django == "3.2.25"
    assert "gunicorn" in host.check_output(f"{venv_python} -m pip list --format=freeze")


def test_installed_offline_and_wheelhouse_removed(host):
    marker = host.file(f"{ROOT}/releases/r2/venv/.django_release_installed")
    assert marker.is_file
    key = marker.content_string.strip()
    major, minor = system_python_version(host).split(".")[:2]
    distro = host.system_info.release.split(".")[0]
    assert key.endswith(f"-cp{major}{minor}-x86_64-debian{distro}")
    assert not host.file(f"{ROOT}/wheelhouse/{key}").exists
    # The controller cache holds that wheelhouse as one tarball, with its checksum.
    cached = EPHEMERAL / "wheelhouses" / f"{key}.tar"
    checksum = (EPHEMERAL / "wheelhouses" / f"{key}.tar.sha256").read_text().split()[0]
    assert hashlib.sha1(cached.read_bytes()).hexdigest() == checksum  # noqa: S324 - Ansible's fetch checksum
    with tarfile.open(cached) as tar:
        wheels = [Path(name).name.lower() for name in tar.getnames()]
    assert "django-3.2.25-py3-none-any.whl" in wheels
    assert any(name.startswith("psycopg2_binary-2.9.10-cp") for name in wheels)


def test_manifest(host):
    data = manifest(host, "r2")
    assert data["release"] == "r2"
    assert data["source_type"] == "artifact"
    assert data["source"] == hashlib.sha256(ARTIFACT.read_bytes()).hexdigest()
    assert data["python_version"] == system_python_version(host)
    assert data["django_version"] == "3.2.25"
    assert data["settings_module"] == "acme.settings"
    leaves = data["migration_leaves"]
    assert leaves["customers"] == ["0001_initial"]
    assert "auth" in leaves and "contenttypes" in leaves


def test_env_file_mode_and_content(host):
    env = host.file(f"{ROOT}/shared/env/r2.env")
    assert env.user == "root"
    assert env.group == "acme"
    assert env.mode == 0o640
    assert host.file(f"{ROOT}/releases/r2/.env").linked_to == f"{ROOT}/shared/env/r2.env"


def test_env_file_round_trips_special_characters(host):
    """systemd (which runs manage.py and gunicorn) reads the secret back unchanged."""
    out = host.check_output(
        f"systemd-run --quiet --pipe --wait --collect -p EnvironmentFile={ROOT}/releases/r2/.env "
        "/usr/bin/printenv DJANGO_SECRET_KEY STATIC_ROOT DJANGO_SETTINGS_MODULE"
    )
    assert out.splitlines() == [SECRET, f"{ROOT}/releases/r2/static", "acme.settings"]


def test_shared_and_writable_dirs(host):
    for name in ("media", "logs"):
        shared = host.file(f"{ROOT}/shared/{name}")
        assert shared.is_directory and shared.user == "acme" and shared.mode == 0o750
        assert host.file(f"{ROOT}/releases/r2/{name}").linked_to == f"{ROOT}/shared/{name}"
    static = host.file(f"{ROOT}/releases/r2/static")
    assert static.is_directory and static.user == "acme"
    # collectstatic ran in the release, as the app user.
    css = host.file(f"{ROOT}/releases/r2/static/acme/site.css")
    assert css.is_file and css.user == "acme"


def test_switch_and_previous(host):
    assert host.file(f"{ROOT}/current").is_symlink
    assert host.file(f"{ROOT}/current").linked_to == f"{ROOT}/releases/r2"
    assert host.file(f"{ROOT}/previous").linked_to == f"{ROOT}/releases/old-1"
    # The swap goes through a temporary link renamed over the old one: none may be left.
    assert not host.file(f"{ROOT}/.current.tmp").exists
    assert not host.file(f"{ROOT}/.previous.tmp").exists


def test_keep_n_never_removes_current_or_previous(host):
    releases = set(host.check_output(f"ls -1 {ROOT}/releases").split())
    # keep=2 and old-1 was current then previous, the oldest of all: it survives.
    assert releases == {"old-1", "r1", "r2"}
    assert not host.file(f"{ROOT}/shared/env/old-3.env").exists


def test_failed_deploy_check_is_never_switched_to(host):
    assert host.file("/srv/badcheck/releases/r-bad/manage.py").is_file
    assert not host.file("/srv/badcheck/releases/r-bad/RELEASE.json").exists
    assert not host.file("/srv/badcheck/current").exists


def test_verbose_runs_never_logged_the_secret(host):
    """converge and idempotence ran at -v (molecule.yml) into ansible.log: the secret is never in it.

    Molecule's idempotence step already failed the scenario if the second converge changed anything.
    """
    if host.backend.get_hostname() != "djrelease-debian12":
        pytest.skip("one log covers both hosts")
    log = (EPHEMERAL / "ansible.log").read_text()
    # The log is the real one: both converges of both hosts, with the -v result of each task.
    assert log.count("TASK [django_release : Write the environment file of the release") >= 2
    for name in ("djrelease-debian11", "djrelease-debian12"):
        assert len(re.findall(rf"{name}\s+: ok=\d+\s+changed=0 ", log)) >= 1, f"no idempotent recap of {name}"
        assert f"ok: [{name}] =>" in log, "the log was not written at -v"
    assert "s3cret" not in log
