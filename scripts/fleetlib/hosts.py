"""`fleet.py up|down|status`: the podman fleet (network, systemd containers, SSH access, inventory)."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fleetlib.common import (
    EXIT_MISSING_TOOL,
    EXIT_PORT,
    EXIT_USAGE,
    REPO_ROOT,
    FleetError,
    Timer,
    log,
    podman,
    podman_graphroot,
    port_is_free,
    require_free_disk,
    require_root,
    require_tools,
    run,
)
from fleetlib.inventory import LOCAL_SECRET_NAMES, HostSpec, host_sort_key, inventory_marker, plan_hosts, render_inventory
from fleetlib.recipe import IMAGE_REPO_PREFIX

FLEET_DIR = REPO_ROOT / ".fleet"
DEFAULT_INVENTORY = REPO_ROOT / "inventories" / "local" / "hosts.yml"
LABEL = "djm.fleet"
NET_LOCK = Path("/run/lock/djm-fleet-network.lock")
SSH_USER = "ansible"
WORKERS = 6
T = TypeVar("T")
R = TypeVar("R")

# Runs as root inside each host through `podman exec` (once, at `up`): the Ansible user, its key,
# passwordless sudo. Prints "changed" when it changed something, so a re-run reports nothing.
PROVISION_SCRIPT = r"""
set -eu
changed=0
if ! id ansible >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash ansible
  changed=1
fi
install -d -m 0700 -o ansible -g ansible /home/ansible/.ssh
printf '%s\n' "$DJM_PUBKEY" > /run/djm-authorized_keys
if ! cmp -s /run/djm-authorized_keys /home/ansible/.ssh/authorized_keys; then
  install -m 0600 -o ansible -g ansible /run/djm-authorized_keys /home/ansible/.ssh/authorized_keys
  changed=1
fi
rm -f /run/djm-authorized_keys
printf 'ansible ALL=(ALL) NOPASSWD: ALL\n' > /run/djm-sudoers
if ! cmp -s /run/djm-sudoers /etc/sudoers.d/ansible; then
  visudo -cqf /run/djm-sudoers
  install -m 0440 -o root -g root /run/djm-sudoers /etc/sudoers.d/ansible
  changed=1
fi
rm -f /run/djm-sudoers
[ "$changed" = 1 ] && echo changed
exit 0
"""


@dataclass
class FleetPaths:
    name: str

    @property
    def dir(self) -> Path:
        return FLEET_DIR / self.name

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def secrets(self) -> Path:
        return self.dir / "secrets.json"


def ensure_secrets(paths: FleetPaths) -> dict[str, str]:
    """Random per-fleet values for the local inventory's vault variables, stable across `up` runs."""
    current: dict[str, str] = json.loads(paths.secrets.read_text()) if paths.secrets.is_file() else {}
    # 48 random bytes = 64 characters: Django's check --deploy wants a SECRET_KEY of 50 or more.
    wanted = {
        name: value if len(value := current.get(name, "")) >= 64 else secrets.token_urlsafe(48) for name in LOCAL_SECRET_NAMES
    }
    write_if_changed(paths.secrets, json.dumps(wanted, indent=2, sort_keys=True) + "\n", 0o600)
    return wanted


def parallel(func: Callable[[T], R], items: Sequence[T]) -> list[R]:
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return list(pool.map(func, items))


def write_if_changed(path: Path, content: str, mode: int = 0o644) -> bool:
    if path.exists() and path.read_text() == content:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content)
    tmp.chmod(mode)
    tmp.replace(path)
    return True


def load_state(paths: FleetPaths) -> dict[str, Any]:
    if paths.state.is_file():
        loaded: dict[str, Any] = json.loads(paths.state.read_text())
        return loaded
    return {}


# ---------------------------------------------------------------- network


@contextmanager
def network_lock() -> Iterator[None]:
    NET_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(NET_LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def used_subnets() -> list[ipaddress.IPv4Network]:
    """Subnets of every podman network and every route/address on the host."""
    nets: list[ipaddress.IPv4Network] = []
    names = podman("network", "ls", "--format", "{{.Name}}").split()
    if names:
        for net in json.loads(podman("network", "inspect", *names)):
            for sub in net.get("subnets") or []:
                parsed = ipaddress.ip_network(sub["subnet"], strict=False)
                if isinstance(parsed, ipaddress.IPv4Network):
                    nets.append(parsed)
    routes = run(["ip", "-4", "route", "show"], check=False).stdout
    for line in routes.splitlines():
        dest = line.split()[0] if line.strip() else "default"
        if dest == "default":
            continue
        try:
            nets.append(ipaddress.IPv4Network(dest, strict=False))
        except ValueError:
            continue
    return nets


def choose_subnet(fleet: str, used: Sequence[ipaddress.IPv4Network]) -> str:
    """A /24 in 10.90.0.0/16 that overlaps nothing in use; `djm` starts at 10.90.0.0, others at a hash."""
    start = 0 if fleet == "djm" else (sum(fleet.encode()) * 7) % 250 + 1
    for step in range(256):
        candidate = ipaddress.ip_network(f"10.90.{(start + step) % 256}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return str(candidate)
    raise FleetError("no free /24 in 10.90.0.0/16 for the fleet network: pass --subnet")


def network_subnet(network: str) -> str | None:
    proc = run(["podman", "network", "inspect", network], check=False)
    if proc.returncode != 0:
        return None
    subnets = json.loads(proc.stdout)[0].get("subnets") or []
    return str(subnets[0]["subnet"]) if subnets else None


def ensure_network(fleet: str, requested: str | None) -> tuple[str, str, bool]:
    """Return (network name, subnet, created)."""
    network = f"{fleet}-net"
    with network_lock():
        existing = network_subnet(network)
        if existing:
            if requested and ipaddress.ip_network(requested) != ipaddress.ip_network(existing):
                raise FleetError(f"network {network} exists with subnet {existing}, not {requested}: run fleet.py down first")
            return network, existing, False
        used = used_subnets()
        if requested:
            wanted = ipaddress.ip_network(requested)
            clash = [str(net) for net in used if isinstance(wanted, ipaddress.IPv4Network) and wanted.overlaps(net)]
            if clash:
                raise FleetError(f"--subnet {requested} overlaps {clash[0]} already in use: pick another")
            subnet = str(wanted)
        else:
            subnet = choose_subnet(fleet, used)
        podman("network", "create", "--label", f"{LABEL}={fleet}", "--subnet", subnet, network)
    return network, subnet, True


# ---------------------------------------------------------------- containers


def fleet_containers(fleet: str) -> list[dict[str, Any]]:
    """`podman inspect` of every container labelled with this fleet."""
    names = podman("ps", "-a", "--filter", f"label={LABEL}={fleet}", "--format", "{{.Names}}").split()
    if not names:
        return []
    result: list[dict[str, Any]] = json.loads(podman("container", "inspect", *names))
    return result


def container_ip(info: dict[str, Any], network: str) -> str:
    nets = info.get("NetworkSettings", {}).get("Networks") or {}
    return str((nets.get(network) or {}).get("IPAddress") or "")


def image_ref(key: str) -> str:
    return f"{IMAGE_REPO_PREFIX}{key}:latest"


def create_container(fleet: str, network: str, host: HostSpec, http_port: int | None) -> None:
    argv = [
        "run",
        "--detach",
        "--name",
        host.container(fleet),
        "--hostname",
        host.name,
        "--systemd=always",
        # systemd's mount sandboxing (ProtectSystem=, PrivateTmp= of our gunicorn unit and of
        # Debian 12's haproxy.service) needs it inside a container; a real VM needs nothing.
        "--cap-add",
        "SYS_ADMIN",
        "--label",
        f"{LABEL}={fleet}",
        "--label",
        f"djm.host={host.name}",
        "--label",
        f"djm.role={host.role}",
        "--label",
        f"djm.image={host.image}",
        "--network",
        network,
        "--ip",
        host.ip,
        "--network-alias",
        host.name,
    ]
    if http_port is not None and host.role == "lb":
        argv += ["--publish", f"127.0.0.1:{http_port}:80"]
    argv += [image_ref(host.image), "/sbin/init"]
    podman(*argv)


def published_port(container: str) -> int | None:
    out = podman("port", container, "80/tcp", check=False).strip()
    return int(out.rsplit(":", 1)[-1]) if out else None


def configured_port(info: dict[str, Any]) -> int | None:
    """The host port a container was created to publish for 80/tcp, running or not."""
    bindings = (info.get("HostConfig", {}).get("PortBindings") or {}).get("80/tcp") or []
    ports = [int(b["HostPort"]) for b in bindings if str(b.get("HostPort") or "").isdigit()]
    return ports[0] if ports else None


# A container that never ran to completion of its start: what an interrupted or failed `up`
# leaves behind (e.g. `podman run` failing in netavark leaves it "created").
HALF_MADE_STATES = frozenset({"created", "configured", "initialized"})


def is_half_made(info: dict[str, Any]) -> bool:
    return str(info.get("State", {}).get("Status", "")).lower() in HALF_MADE_STATES


def wait_for_ssh(ip: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, 22), timeout=3) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise FleetError(f"sshd on {ip} did not answer within {timeout:.0f}s (see podman logs / journalctl -u ssh)")
        time.sleep(0.5)


def wait_for_systemd(container: str, timeout: float = 120.0) -> str:
    """Wait until systemd has finished booting; return its state (running, degraded...)."""
    deadline = time.monotonic() + timeout
    state = "unknown"
    while time.monotonic() < deadline:
        proc = run(
            ["podman", "exec", container, "timeout", "60", "systemctl", "is-system-running", "--wait"],
            check=False,
            timeout=90,
        )
        state = proc.stdout.strip() or "unknown"
        if state not in ("unknown", "offline", "initializing", "starting"):
            return state
        time.sleep(0.5)
    return state


def provision(container: str, pubkey: str) -> bool:
    out = podman("exec", "--env", f"DJM_PUBKEY={pubkey}", container, "/bin/sh", "-c", PROVISION_SCRIPT)
    return "changed" in out


def ensure_key(paths: FleetPaths, fleet: str) -> bool:
    if paths.key.is_file() and paths.key.with_suffix(".pub").is_file():
        return False
    paths.dir.mkdir(parents=True, exist_ok=True)
    paths.dir.chmod(0o700)
    for stale in (paths.key, paths.key.with_suffix(".pub")):
        stale.unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"djm-fleet-{fleet}", "-f", str(paths.key)])
    return True


def scan_host_keys(ips: Sequence[str]) -> str:
    proc = run(["ssh-keyscan", "-T", "10", *ips], check=False, timeout=60)
    lines = sorted({line for line in proc.stdout.splitlines() if line and not line.startswith("#")})
    found = {line.split()[0] for line in lines}
    missing = [ip for ip in ips if ip not in found]
    if missing:
        raise FleetError(f"ssh-keyscan got no host key from {', '.join(missing)}")
    return "\n".join(lines) + "\n"


def ssh_argv(paths: FleetPaths, ip: str, *command: str) -> list[str]:
    return [
        "ssh",
        "-i",
        str(paths.key),
        "-o",
        f"UserKnownHostsFile={paths.known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        f"{SSH_USER}@{ip}",
        *command,
    ]


def ssh_error(paths: FleetPaths, ip: str) -> str:
    """'' if `ansible@ip` answers over SSH with passwordless sudo, else the reason."""
    proc = run(ssh_argv(paths, ip, "sudo", "-n", "true"), check=False, timeout=60)
    if proc.returncode == 0:
        return ""
    return (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]


def check_dns(paths: FleetPaths, hosts: dict[str, tuple[str, str]], source: str, target: str) -> None:
    """The fleet network's DNS must give `target`'s address to `source` (aardvark-dns)."""
    proc = run(ssh_argv(paths, hosts[source][1], "getent", "hosts", target), check=False, timeout=60)
    answer = proc.stdout.split()[:1]
    if answer != [hosts[target][1]]:
        raise FleetError(f"DNS on the fleet network: {source} resolves {target} to {answer or 'nothing'}, not {hosts[target][1]}")


def check_inventory_owner(inventory: Path, fleet: str) -> None:
    """Never overwrite an inventory that another fleet (or a human) wrote."""
    if not inventory.exists():
        return
    first = inventory.read_text().split("\n", 1)[0]
    if first != inventory_marker(fleet):
        raise FleetError(
            f"{inventory} was not generated for fleet {fleet} (first line: {first[:60]!r}): pass another --inventory",
            EXIT_USAGE,
        )


def remove_generated_inventory(inventory: Path, fleet: str) -> bool:
    """Delete `inventory` only if `fleet.py up --name fleet` wrote it."""
    if inventory.is_file() and inventory.read_text().startswith(inventory_marker(fleet) + "\n"):
        inventory.unlink()
        return True
    return False


# ---------------------------------------------------------------- commands


def up(
    fleet: str,
    apps: int,
    image: str,
    image_map: dict[str, str],
    http_port: int | None,
    inventory: Path,
    subnet: str | None,
    extra_vars: dict[str, str] | None = None,
) -> None:
    timer = Timer()
    paths = FleetPaths(fleet)
    inventory = inventory.resolve()
    plan_hosts(apps, subnet or "10.90.0.0/24", image, image_map)  # argument errors first
    check_inventory_owner(inventory, fleet)
    require_root()
    require_tools(["podman", "runc", "iptables", "ssh", "ssh-keygen", "ssh-keyscan", "ip"])
    require_free_disk([podman_graphroot()])

    wanted_images = sorted({image, *image_map.values()})
    for key in wanted_images:
        if run(["podman", "image", "exists", image_ref(key)], check=False).returncode != 0:
            raise FleetError(f"image {image_ref(key)} is missing: run make images", EXIT_MISSING_TOOL)

    existing = {c["Config"]["Labels"].get("djm.host", c["Name"]): c for c in fleet_containers(fleet)}
    # Half-made hosts are replaced, so `up` after any failure just works when run again.
    replaced = sorted((name for name, info in existing.items() if is_half_made(info)), key=host_sort_key)
    for name in replaced:
        podman("rm", "--force", existing.pop(name)["Name"])
    lb_name = f"{fleet}-lb1"
    if http_port is not None:
        if "lb1" in existing:
            current = configured_port(existing["lb1"])
            if current != http_port:
                raise FleetError(
                    f"lb1 exists without 127.0.0.1:{http_port} published: run fleet.py down --name {fleet}, then up again",
                    EXIT_PORT,
                )
        elif not port_is_free(http_port):
            raise FleetError(f"port {http_port} on 127.0.0.1 is taken: pick another --http-port", EXIT_PORT)

    network, subnet, net_created = ensure_network(fleet, subnet)
    plan = plan_hosts(apps, subnet, image, image_map)
    planned = {host.name for host in plan}
    extra = sorted((name for name in existing if name not in planned), key=host_sort_key)
    if extra:
        log(f"keeping {', '.join(extra)} (already in the fleet; fleet.py down removes everything)")

    created: list[str] = []
    started: list[str] = []
    image_ids: dict[str, str] = {}
    for host in plan:
        info = existing.get(host.name)
        if info is None:
            create_container(fleet, network, host, http_port)
            created.append(host.name)
            continue
        if not info["State"]["Running"]:
            podman("start", host.container(fleet))
            started.append(host.name)
        if image_ids.get(host.image) is None:
            image_ids[host.image] = podman("image", "inspect", "--format", "{{.Id}}", image_ref(host.image)).strip()
        if info["Image"] != image_ids[host.image] or info["Config"]["Labels"].get("djm.image") != host.image:
            log(f"note: {host.name} runs an older or different image than {image_ref(host.image)}; down + up recreates it")

    key_created = ensure_key(paths, fleet)
    pubkey = paths.key.with_suffix(".pub").read_text().strip()

    if created or started:
        existing = {c["Config"]["Labels"].get("djm.host", c["Name"]): c for c in fleet_containers(fleet)}
    infos = existing
    hosts = {name: (info["Config"]["Labels"].get("djm.role", ""), container_ip(info, network)) for name, info in infos.items()}
    names = sorted(hosts, key=host_sort_key)
    ips = [hosts[name][1] for name in names]
    if not all(ips):
        raise FleetError(f"some containers have no address on {network}: see fleet.py status --name {fleet}")

    # New or restarted hosts: wait for boot, then create the ansible user. Hosts that were already
    # running are only checked over SSH (no podman exec), so a warm `up` takes a second or two.
    fresh = [name for name in names if key_created or name in created or name in started]
    for name, state in zip(fresh, parallel(wait_for_systemd, [f"{fleet}-{name}" for name in fresh])):
        if state != "running":
            failed = podman("exec", f"{fleet}-{name}", "systemctl", "--failed", "--no-legend", "--plain", check=False)
            units = [line.split()[0] for line in failed.splitlines() if line.strip()]
            log(f"warning: {name} systemd is {state}; failed units: {' '.join(units) or 'none'}")
    provisioned = [name for name, changed in zip(fresh, parallel(lambda n: provision(f"{fleet}-{n}", pubkey), fresh)) if changed]
    parallel(wait_for_ssh, ips)
    known_changed = write_if_changed(paths.known_hosts, scan_host_keys(ips), 0o644)
    errors = dict(zip(names, parallel(lambda ip: ssh_error(paths, ip), ips)))
    broken = [name for name in names if errors[name]]
    if broken:  # e.g. a host whose ansible user or key was changed by hand: provision it again
        provisioned += [name for name in broken if provision(f"{fleet}-{name}", pubkey)]
        still = [f"{name}: {error}" for name in broken if (error := ssh_error(paths, hosts[name][1]))]
        if still:
            raise FleetError(f"ssh as {SSH_USER} with sudo failed on {'; '.join(still)}")

    if created and len(names) > 1:
        check_dns(paths, hosts, names[0], names[-1])

    rendered = render_inventory(fleet, hosts, paths.key, paths.known_hosts, ensure_secrets(paths), extra_vars)
    inv_changed = write_if_changed(inventory, rendered, 0o600)
    previous = Path(load_state(paths).get("inventory") or inventory)
    if previous != inventory and remove_generated_inventory(previous, fleet):
        log(f"removed the fleet's previous inventory {previous}")
    state = {
        "name": fleet,
        "network": network,
        "subnet": subnet,
        "inventory": str(inventory),
        "http_port": published_port(lb_name),
    }
    write_if_changed(paths.state, json.dumps(state, indent=2, sort_keys=True) + "\n")

    changes = []
    if net_created:
        changes.append(f"network {network} ({subnet})")
    if replaced:
        changes.append(f"replaced half-made {', '.join(replaced)}")
    if created:
        changes.append(f"created {', '.join(created)}")
    if started:
        changes.append(f"started {', '.join(started)}")
    if key_created:
        changes.append("SSH key")
    if provisioned:
        changes.append(f"ansible user on {', '.join(provisioned)}")
    if known_changed:
        changes.append("known_hosts")
    if inv_changed:
        changes.append(f"inventory {inventory}")
    kind = "cold" if created else "warm"
    log(f"fleet {fleet}: {len(names)} hosts reachable over SSH ({', '.join(names)})")
    log(f"changed: {'; '.join(changes) if changes else 'nothing'}")
    if state["http_port"]:
        log(f"lb1:80 is published on http://127.0.0.1:{state['http_port']}/")
    log(f"inventory: {inventory}")
    log(f"up ({kind}): {timer.elapsed():.1f}s")


def down(fleet: str) -> None:
    timer = Timer()
    require_root()
    require_tools(["podman"])
    paths = FleetPaths(fleet)
    state = load_state(paths)
    containers = [c["Name"] for c in fleet_containers(fleet)]
    if containers:
        podman("rm", "--force", "--time", "5", *containers)
    networks = podman("network", "ls", "--filter", f"label={LABEL}={fleet}", "--format", "{{.Name}}").split()
    for network in networks:
        podman("network", "rm", network)
    inventory = Path(state["inventory"]) if state.get("inventory") else DEFAULT_INVENTORY
    removed_inventory = str(inventory) if remove_generated_inventory(inventory, fleet) else ""
    if paths.dir.exists():
        shutil.rmtree(paths.dir)
    log(
        f"fleet {fleet}: removed {len(containers)} container(s), {len(networks)} network(s)"
        + (f", inventory {removed_inventory}" if removed_inventory else "")
        + f", {paths.dir}"
    )
    log(f"down: {timer.elapsed():.1f}s")


def status(fleet: str) -> int:
    require_tools(["podman"])
    infos = fleet_containers(fleet)
    if not infos:
        log(f"fleet {fleet}: no containers (fleet.py up --name {fleet} creates them)")
        return 1
    network = f"{fleet}-net"
    rows = [("HOST", "GROUP", "IP", "STATE", "IMAGE", "CONTAINER")]
    for info in sorted(infos, key=lambda c: host_sort_key(c["Config"]["Labels"].get("djm.host", ""))):
        labels = info["Config"]["Labels"]
        rows.append(
            (
                labels.get("djm.host", "?"),
                labels.get("djm.role", "?"),
                container_ip(info, network) or "-",
                str(info["State"]["Status"]),
                str(info.get("ImageName") or labels.get("djm.image", "?")),
                str(info["Name"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        log("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def run_over_ssh(fleet: str, host: str, command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Helper for tests and humans: run a command on a fleet host over SSH."""
    paths = FleetPaths(fleet)
    infos = {c["Config"]["Labels"].get("djm.host"): c for c in fleet_containers(fleet)}
    if host not in infos:
        raise FleetError(f"{host} is not a host of fleet {fleet}")
    ip = container_ip(infos[host], f"{fleet}-net")
    return run(ssh_argv(paths, ip, *command), check=False, timeout=600)
