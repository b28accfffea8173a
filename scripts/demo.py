#!/usr/bin/env python3
"""The README's demo: the ACME fixture app on the local podman fleet, served through lb1.

Steps (each idempotent, so a second run only checks):
  1. fleet up: lb1, app1..appN, db1 over SSH (scripts/fleet.py), lb1:80 published on 127.0.0.1:PORT;
  2. build the fixture release artifacts (scripts/build_release.py);
  3. first deploy of release v1 (playbooks/deploy.yml): PostgreSQL, releases, gunicorn, HAProxy;
  4. fill the database with generated data (scripts/gen_data.py through an SSH tunnel to db1),
     unless it already holds data;
  5. ask /healthz through lb1;
  6. migrate to v2 (migrate.yml): Python 3.11 built once and distributed, v2 prepared beside v1,
     the migration plan (v2 drops a column the old code reads: two_phase), verified backup,
     expand, app hosts switched one at a time, contract, smoke checks through lb1;
  7. roll back (rollback.yml): from the run record, v2's migrations reversed with v2's code in a
     short maintenance window (writes kept), proven against the backup, the app hosts switched
     back to v1.
--stop-after v1|v2 ends the demo earlier.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


def log(message: str) -> None:
    print(f"demo: {message}", flush=True)


def run(argv: list[str], **kwargs: object) -> None:
    log("$ " + " ".join(argv))
    started = time.monotonic()
    subprocess.run(argv, cwd=REPO, check=True, **kwargs)  # type: ignore[call-overload]
    log(f"  ({time.monotonic() - started:.1f}s)")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.setdefault("CONTAINERS_CONF", str(REPO / ".config" / "containers" / "containers.conf"))
    env.setdefault("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def ssh_tunnel(fleet: str, host_ip: str, remote_port: int) -> Iterator[int]:
    """Forward a local port to db1's own 127.0.0.1:5432 over the fleet's SSH key."""
    fleet_dir = REPO / ".fleet" / fleet
    local_port = free_port()
    proc = subprocess.Popen(
        [
            "ssh", "-N", "-i", str(fleet_dir / "id_ed25519"),
            "-o", f"UserKnownHostsFile={fleet_dir / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}", f"ansible@{host_ip}",
        ]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local_port), timeout=1):
                break
            if proc.poll() is not None:
                raise SystemExit(f"demo: the SSH tunnel to {host_ip} failed (exit {proc.returncode})")
            time.sleep(0.3)
        yield local_port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def inventory_hosts(inventory: Path) -> dict[str, dict[str, str]]:
    out = subprocess.run(
        ["ansible-inventory", "-i", str(inventory), "--list"], env=environment(), check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)["_meta"]["hostvars"]


def fill_database(fleet: str, inventory: Path, size: str) -> None:
    import psycopg  # the controller's venv has it; imported late so --help works without it

    hostvars = inventory_hosts(inventory)
    db = hostvars["db1"]
    secrets = json.loads((REPO / ".fleet" / fleet / "secrets.json").read_text())
    with ssh_tunnel(fleet, db["ansible_host"], 5432) as port:
        # The password travels in PGPASSWORD, never on a command line or in the log.
        dsn = psycopg.conninfo.make_conninfo(
            host="127.0.0.1", port=port, dbname=db["project_db_name"], user=db["project_db_user"]
        )
        env = dict(environment(), PGPASSWORD=secrets["vault_project_db_password"])
        with psycopg.connect(dsn, password=env["PGPASSWORD"]) as conn:
            rows = conn.execute("SELECT count(*) FROM customers").fetchone()
        if rows and rows[0] > 0:
            log(f"database already holds {rows[0]} customers: not generating data again")
            return
        log(f"generating {size} of ACME data in db1 (scripts/gen_data.py)")
        run([sys.executable, "scripts/gen_data.py", "--dsn", dsn, "--size", size, "--jobs", "2"], env=env)


def show_health(port: int, requests: int) -> None:
    url = f"http://127.0.0.1:{port}/healthz"
    log(f"GET {url} x{requests} (through HAProxy on lb1)")
    for _ in range(requests):
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
            log(f"  {response.status} {json.dumps(body, sort_keys=True)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", type=int, default=3, help="app hosts (default 3)")
    parser.add_argument("--http-port", type=int, default=8080, help="lb1:80 published on 127.0.0.1:PORT (default 8080)")
    parser.add_argument("--size", default="50MB", help="generated data size (default 50MB)")
    parser.add_argument("--stop-after", choices=["v1", "v2", "rollback"], default="rollback", help="last step (default rollback)")
    args = parser.parse_args(argv)

    fleet = "djm"
    inventory = REPO / "inventories" / "local" / "hosts.yml"
    env = environment()
    started = time.monotonic()
    run([sys.executable, "scripts/fleet.py", "images"], env=env)
    run([sys.executable, "scripts/fleet.py", "up", "--apps", str(args.apps), "--http-port", str(args.http_port)], env=env)
    run([sys.executable, "scripts/build_release.py", "all"], env=env)
    run(["ansible-playbook", "-i", str(inventory), "playbooks/deploy.yml"], env=env)
    fill_database(fleet, inventory, args.size)
    show_health(args.http_port, requests=args.apps + 1)
    if args.stop_after != "v1":
        run(["ansible-playbook", "playbooks/local/cpython_source.yml"], env=env)
        to_v2 = ["-e", "project_release_id=v2", "-e", "project_python_version=3.11.2"]
        run(["ansible-playbook", "-i", str(inventory), "migrate.yml", *to_v2], env=env)
        show_health(args.http_port, requests=args.apps + 1)
    if args.stop_after == "rollback":
        # From the run record: v2's migrations are all reversible, so they are migrated back (writes kept).
        run(["ansible-playbook", "-i", str(inventory), "rollback.yml"], env=env)
        show_health(args.http_port, requests=args.apps + 1)
    log(f"done in {time.monotonic() - started:.0f}s: the fixture app serves on http://127.0.0.1:{args.http_port}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
