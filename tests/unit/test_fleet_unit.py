"""Unit tests of scripts/fleet.py and scripts/fleetlib: no containers, no network, no root needed."""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import fleet  # noqa: E402
from fleetlib import common, hosts, inventory, recipe  # noqa: E402
from fleetlib.common import EXIT_DISK, EXIT_MISSING_TOOL, EXIT_NOT_ROOT, EXIT_USAGE, FleetError  # noqa: E402

CA_A = bytes(range(0, 120))
CA_B = bytes(range(100, 250))
CA_C = b"\x30\x82" + bytes(200)


def pem(der: bytes, width: int = 64) -> str:
    b64 = base64.b64encode(der).decode()
    body = "\n".join(b64[i : i + width] for i in range(0, len(b64), width))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"


# ---------------------------------------------------------------- recipe hash


def test_recipe_hash_is_stable_and_per_image() -> None:
    bundle = pem(CA_A).encode()
    d11 = recipe.RECIPES["debian11"]
    assert d11.digest(bundle) == d11.digest(bundle)
    assert d11.digest(bundle) == replace(d11).digest(bundle)
    assert len(d11.digest(bundle)) == 64
    assert d11.digest(bundle) != recipe.RECIPES["debian12"].digest(bundle)


@pytest.mark.parametrize(
    "change",
    [
        {"suite": "trixie"},
        {"mirror": "http://mirror.example/debian"},
        {"security_mirror": "http://mirror.example/debian-security"},
        {"packages": (*recipe.PACKAGES, "vim-tiny")},
        {"script": recipe.CUSTOMISE_SCRIPT + "true\n"},
        {"files": {**recipe.STATIC_FILES, "/etc/pip.conf": "[global]\n"}},
        {"import_changes": ('CMD ["/bin/bash"]',)},
    ],
    ids=lambda change: next(iter(change)),
)
def test_recipe_hash_changes_with_each_input(change: dict[str, object]) -> None:
    bundle = pem(CA_A).encode()
    base = recipe.RECIPES["debian11"]
    assert replace(base, **change).digest(bundle) != base.digest(bundle)  # type: ignore[arg-type]


def test_recipe_hash_changes_with_the_controller_ca_bundle() -> None:
    base = recipe.RECIPES["debian12"]
    assert base.digest(pem(CA_A).encode()) != base.digest((pem(CA_A) + pem(CA_B)).encode())


def test_fixture_image_hash_follows_its_base_and_its_own_inputs() -> None:
    pg11 = recipe.FIXTURES["debian11-pg"]
    base = recipe.RECIPES[pg11.base].digest(b"")
    assert pg11.base == "debian11" and recipe.FIXTURES["debian12-pg"].base == "debian12"
    assert pg11.digest(base) == replace(pg11).digest(base)
    assert pg11.digest(base) != recipe.FIXTURES["debian12-pg"].digest(base)
    # A rebuilt base (another recipe hash) means a rebuilt fixture image.
    assert pg11.digest(base) != pg11.digest(recipe.RECIPES["debian11"].digest(pem(CA_A).encode()))
    assert replace(pg11, packages=(*pg11.packages, "vim-tiny")).digest(base) != pg11.digest(base)
    assert replace(pg11, script=pg11.script + "true\n").digest(base) != pg11.digest(base)
    assert replace(pg11, packages=tuple(reversed(pg11.packages))).digest(base) == pg11.digest(base)


def test_fixture_build_script_installs_without_starting_the_server() -> None:
    script = recipe.FIXTURES["debian12-pg"].build_script()
    assert "apt-get install --yes postgresql postgresql-client\n" in script
    assert script.index("exit 101") < script.index("apt-get install") < script.index("rm -f /usr/sbin/policy-rc.d")
    assert "rm -rf /var/lib/apt/lists/*" in script
    # Emptied lists must look stale to the apt module's cache_valid_time (stamp gone, directory dated 1970).
    assert script.index("rm -rf /var/lib/apt/lists/*") < script.index("touch -d @0 /var/lib/apt/lists")
    assert "rm -f /var/lib/apt/periodic/update-success-stamp" in script


def test_recipe_hash_ignores_package_order() -> None:
    base = recipe.RECIPES["debian11"]
    shuffled = replace(base, packages=tuple(reversed(base.packages)))
    assert shuffled.digest(b"") == base.digest(b"")


def test_recipe_contents_match_a_cloud_vm_without_the_roles_work() -> None:
    packages = set(recipe.PACKAGES)
    assert {"systemd", "openssh-server", "python3", "python3-apt", "sudo", "acl", "locales"} <= packages
    assert not packages & {"python3-venv", "python3-pip", "postgresql", "gunicorn", "haproxy"}
    files = recipe.RECIPES["debian11"].all_files()
    assert "deb http://deb.debian.org/debian bullseye main" in files["/etc/apt/sources.list"]
    assert "bullseye-security" in files["/etc/apt/sources.list"]
    assert files["/etc/pip.conf"] == "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
    assert "ExecStartPre=/usr/bin/ssh-keygen -A" in files["/etc/systemd/system/ssh.service.d/djm-host-keys.conf"]
    assert "rm -f /etc/ssh/ssh_host_*" in recipe.CUSTOMISE_SCRIPT
    assert ": > /etc/machine-id" in recipe.CUSTOMISE_SCRIPT


# ---------------------------------------------------------------- CA diffing


def test_split_pem_reads_each_certificate_and_skips_garbage() -> None:
    bundle = "junk\n" + pem(CA_A) + "-----BEGIN CERTIFICATE-----\n!!notbase64!!\n-----END CERTIFICATE-----\n" + pem(CA_B)
    assert recipe.split_pem(bundle) == [CA_A, CA_B]


def test_missing_certificates_lists_only_what_the_image_lacks() -> None:
    controller = pem(CA_A) + pem(CA_B) + pem(CA_C) + pem(CA_A)
    image = pem(CA_B, width=76)  # same certificate, different line wrapping
    missing = recipe.missing_certificates(controller, image)
    assert [recipe.split_pem(p)[0] for p in missing] == [CA_A, CA_C]
    assert all(p.startswith("-----BEGIN CERTIFICATE-----\n") and p.endswith("-----END CERTIFICATE-----\n") for p in missing)
    assert recipe.missing_certificates(pem(CA_B), image) == []


def test_to_pem_round_trips() -> None:
    assert recipe.split_pem(recipe.to_pem(CA_C)) == [CA_C]
    assert all(len(line) <= 64 for line in recipe.to_pem(CA_C).splitlines())


# ---------------------------------------------------------------- fleet plan and inventory


def test_plan_hosts_gives_fixed_addresses_and_images() -> None:
    plan = inventory.plan_hosts(3, "10.90.7.0/24", "debian11", {"app2": "debian12"})
    assert [(h.name, h.role, h.image, h.ip) for h in plan] == [
        ("lb1", "lb", "debian11", "10.90.7.10"),
        ("app1", "app", "debian11", "10.90.7.101"),
        ("app2", "app", "debian12", "10.90.7.102"),
        ("app3", "app", "debian11", "10.90.7.103"),
        ("db1", "db", "debian11", "10.90.7.11"),
    ]
    assert plan[0].container("djmtest") == "djmtest-lb1"


def test_plan_hosts_maps_images_per_group_and_host() -> None:
    plan = inventory.plan_hosts(3, "10.90.7.0/24", "debian11", {"app": "debian12", "app3": "debian11", "db": "debian12"})
    assert {h.name: h.image for h in plan} == {
        "lb1": "debian11",
        "app1": "debian12",
        "app2": "debian12",
        "app3": "debian11",
        "db1": "debian12",
    }


@pytest.mark.parametrize(
    ("apps", "subnet", "image_map", "message"),
    [
        (0, "10.90.0.0/24", {}, "--apps 0"),
        (151, "10.90.0.0/24", {}, "--apps 151"),
        (3, "10.90.0.0/25", {}, "smaller than a /24"),
        (3, "not-a-net", {}, "--subnet"),
        (2, "10.90.0.0/24", {"app3": "debian12"}, "app3"),
    ],
)
def test_plan_hosts_rejects_bad_arguments(apps: int, subnet: str, image_map: dict[str, str], message: str) -> None:
    with pytest.raises(FleetError, match=message) as err:
        inventory.plan_hosts(apps, subnet, "debian11", image_map)
    assert err.value.code == EXIT_USAGE


def test_parse_image_map() -> None:
    known = ["debian11", "debian12"]
    assert inventory.parse_image_map(["app2=debian12", "db1=debian11"], known) == {"app2": "debian12", "db1": "debian11"}
    for bad in ("app2", "app2=", "=debian12", "app2=debian13"):
        with pytest.raises(FleetError) as err:
            inventory.parse_image_map([bad], known)
        assert err.value.code == EXIT_USAGE


@pytest.mark.parametrize("name", ["djm", "djmtest", "a-1"])
def test_fleet_name_accepts(name: str) -> None:
    assert inventory.validate_fleet_name(name) == name


@pytest.mark.parametrize("name", ["", "DJM", "1djm", "djm_x", "a" * 21, "djm/../x"])
def test_fleet_name_rejects(name: str) -> None:
    with pytest.raises(FleetError):
        inventory.validate_fleet_name(name)


def test_render_inventory_is_valid_yaml_with_groups_and_hostvars(tmp_path: Path) -> None:
    key = tmp_path / ".fleet" / "djm" / "id_ed25519"
    known = tmp_path / ".fleet" / "djm" / "known_hosts"
    fleet_hosts = {
        "db1": ("db", "10.90.0.11"),
        "app10": ("app", "10.90.0.110"),
        "app2": ("app", "10.90.0.102"),
        "lb1": ("lb", "10.90.0.10"),
    }
    text = inventory.render_inventory("djm", fleet_hosts, key, known)
    assert text.splitlines()[0] == inventory.inventory_marker("djm")
    data = yaml.safe_load(text)
    children = data["all"]["children"]
    assert list(children) == ["lb", "app", "db"]
    assert list(children["app"]["hosts"]) == ["app2", "app10"]
    app10 = children["app"]["hosts"]["app10"]
    assert app10["ansible_host"] == "10.90.0.110"
    assert app10["ansible_user"] == "ansible"
    assert app10["ansible_ssh_private_key_file"] == str(key)
    assert app10["ansible_ssh_common_args"] == f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes"
    assert children["db"]["hosts"]["db1"]["ansible_host"] == "10.90.0.11"


def test_render_inventory_puts_local_secrets_in_all_vars(tmp_path: Path) -> None:
    secrets = {"vault_project_db_password": 'p"w:1', "vault_project_secret_key": "k#2"}
    text = inventory.render_inventory("djm", {"lb1": ("lb", "10.90.0.10")}, tmp_path / "k", tmp_path / "kh", secrets)
    assert yaml.safe_load(text)["all"]["vars"] == secrets


def test_fleet_vars_go_to_all_vars_beside_the_secrets_which_win(tmp_path: Path) -> None:
    extra = inventory.parse_vars(["django_service_workers=2", "note=a b:c", "vault_project_db_password=not-this"])
    assert extra == {"django_service_workers": "2", "note": "a b:c", "vault_project_db_password": "not-this"}
    secrets = {"vault_project_db_password": "pw"}
    text = inventory.render_inventory("djm", {"lb1": ("lb", "10.90.0.10")}, tmp_path / "k", tmp_path / "kh", secrets, extra)
    expected = {"django_service_workers": "2", "note": "a b:c", "vault_project_db_password": "pw"}
    assert yaml.safe_load(text)["all"]["vars"] == expected


@pytest.mark.parametrize("item", ["noequals", "=1", "bad name=1", "1x=2", "x=a\nb"])
def test_a_malformed_fleet_var_is_refused_in_one_line(item: str) -> None:
    with pytest.raises(FleetError, match=r"--var .*expected NAME=VALUE"):
        inventory.parse_vars([item])


def test_local_secrets_are_random_per_fleet_and_stable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetlib import hosts

    monkeypatch.setattr(hosts, "FLEET_DIR", tmp_path)
    first = hosts.ensure_secrets(hosts.FleetPaths("djm"))
    assert set(first) == set(inventory.LOCAL_SECRET_NAMES)
    assert all(len(value) >= 64 for value in first.values())
    assert hosts.ensure_secrets(hosts.FleetPaths("djm")) == first
    assert hosts.ensure_secrets(hosts.FleetPaths("other")) != first
    assert (tmp_path / "djm" / "secrets.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(shutil.which("ansible-inventory") is None, reason="ansible-inventory not on PATH")
def test_rendered_inventory_reads_in_ansible(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    path.write_text(
        inventory.render_inventory(
            "djm", {"lb1": ("lb", "10.90.0.10"), "app1": ("app", "10.90.0.101")}, tmp_path / "k", tmp_path / "kh"
        )
    )
    proc = subprocess.run(
        ["ansible-inventory", "-i", str(path), "--list"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"},
    )
    data = yaml.safe_load(proc.stdout)
    assert sorted(data["lb"]["hosts"]) == ["lb1"]
    assert data["_meta"]["hostvars"]["app1"]["ansible_host"] == "10.90.0.101"


def test_inventory_owner_check(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    hosts.check_inventory_owner(path, "djm")  # absent: fine
    path.write_text(inventory.render_inventory("djm", {"lb1": ("lb", "10.90.0.10")}, tmp_path / "k", tmp_path / "kh"))
    hosts.check_inventory_owner(path, "djm")
    with pytest.raises(FleetError, match="not generated for fleet djmtest") as err:
        hosts.check_inventory_owner(path, "djmtest")
    assert err.value.code == EXIT_USAGE
    path.write_text("all:\n  hosts: {}\n")
    with pytest.raises(FleetError):
        hosts.check_inventory_owner(path, "djm")


def test_host_sort_key_orders_groups_then_numbers() -> None:
    names = ["db1", "app10", "lb1", "app2", "app1"]
    assert sorted(names, key=inventory.host_sort_key) == ["lb1", "app1", "app2", "app10", "db1"]


# ---------------------------------------------------------------- subnet choice


def test_choose_subnet_avoids_every_used_network() -> None:
    used = [ipaddress.IPv4Network("10.88.0.0/16"), ipaddress.IPv4Network("10.90.0.0/24")]
    assert hosts.choose_subnet("djm", used) == "10.90.1.0/24"
    assert hosts.choose_subnet("djm", []) == "10.90.0.0/24"
    other = hosts.choose_subnet("djmtest", [])
    assert other != "10.90.0.0/24"
    assert hosts.choose_subnet("djmtest", []) == other  # stable for a name
    with pytest.raises(FleetError, match="--subnet"):
        hosts.choose_subnet("djm", [ipaddress.IPv4Network("10.90.0.0/16")])


# ---------------------------------------------------------------- prerequisites and the command line


def test_require_root_fails_with_its_own_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(FleetError, match="root") as err:
        common.require_root()
    assert err.value.code == EXIT_NOT_ROOT


def test_require_tools_says_run_make_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FleetError, match="missing podman, debootstrap: run make setup") as err:
        common.require_tools(["podman", "debootstrap"])
    assert err.value.code == EXIT_MISSING_TOOL
    assert "\n" not in str(err.value)


def test_require_tools_checks_containers_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "sh").symlink_to("/bin/sh")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CONTAINERS_CONF", str(tmp_path / "absent.conf"))
    with pytest.raises(FleetError, match="CONTAINERS_CONF") as err:
        common.require_tools(["sh"])
    assert err.value.code == EXIT_MISSING_TOOL


def test_require_free_disk(tmp_path: Path) -> None:
    common.require_free_disk([tmp_path / "not" / "yet"], minimum=1)
    with pytest.raises(FleetError, match="free") as err:
        common.require_free_disk([tmp_path], minimum=1 << 62)
    assert err.value.code == EXIT_DISK


def test_port_is_free_sees_a_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not common.port_is_free(port)
    assert common.port_is_free(port)


def test_write_if_changed(tmp_path: Path) -> None:
    path = tmp_path / "d" / "f"
    assert hosts.write_if_changed(path, "a\n", 0o600)
    assert not hosts.write_if_changed(path, "a\n", 0o600)
    assert path.stat().st_mode & 0o777 == 0o600
    assert hosts.write_if_changed(path, "b\n")
    assert path.read_text() == "b\n"


def test_containers_conf_defaults_to_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONTAINERS_CONF", raising=False)
    common.setup_environment()
    assert os.environ["CONTAINERS_CONF"] == str(REPO / ".config" / "containers" / "containers.conf")


@pytest.mark.parametrize(
    "argv",
    [
        ["images", "--only", "debian13"],
        ["up", "--apps", "three"],
        ["up", "--http-port", "70000"],
        ["up", "--image", "ubuntu"],
        ["frobnicate"],
        [],
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        fleet.main(argv)
    assert exc.value.code == EXIT_USAGE
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--apps", "0"], "--apps 0: use 1 to 150"),
        (["up", "--image-map", "app9=debian12"], "app9, which is not a host"),
        (["up", "--image-map", "app1"], "expected HOST=IMAGE"),
        # A fixture image (packages preinstalled) is an image too: the error lists it.
        (["up", "--image-map", "db=debian11-pgx"], "debian11-app, debian11-pg, debian12, debian12-pg"),
        (["down", "--name", "Bad Name"], "--name"),
    ],
)
def test_cli_argument_errors_are_one_line_before_any_work(argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fleet.py"), *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PATH": "/nonexistent"},  # would fail differently if it reached podman
        timeout=30,
    )
    assert proc.returncode == EXIT_USAGE
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert message in proc.stderr


def test_remove_generated_inventory_only_removes_its_own(tmp_path: Path) -> None:
    ours = tmp_path / "ours.yml"
    ours.write_text(inventory.render_inventory("djm", {"lb1": ("lb", "10.90.0.10")}, tmp_path / "k", tmp_path / "kh"))
    other = tmp_path / "other.yml"
    other.write_text(inventory.render_inventory("djmtest", {"lb1": ("lb", "10.90.1.10")}, tmp_path / "k", tmp_path / "kh"))
    handwritten = tmp_path / "hand.yml"
    handwritten.write_text("all:\n  hosts: {}\n")
    assert not hosts.remove_generated_inventory(other, "djm")
    assert not hosts.remove_generated_inventory(handwritten, "djm")
    assert not hosts.remove_generated_inventory(tmp_path / "absent.yml", "djm")
    assert hosts.remove_generated_inventory(ours, "djm")
    assert not ours.exists() and other.exists() and handwritten.exists()
