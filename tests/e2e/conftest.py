"""End-to-end tests of migrate.yml and rollback.yml on one shared local fleet.

The session fixture `e2e` brings up its own fleet (lb1, app1..appN on Debian 11, db1; N = DJM_E2E_APPS,
default 2) named by
DJM_E2E_FLEET (default `djme2e`; two sessions running at once need two names), lb1 on host port
DJM_E2E_HTTP_PORT (default: a free one), deploys the fixture's v1 with playbooks/deploy.yml, loads
a little generated data (DJM_E2E_REUSE=1 takes the fleet DJM_E2E_FLEET as it is instead, idle on v1
with its data: `make test` hands over the root Molecule scenario's, and app hosts past N are taken
out of it), and hands the tests helpers to
run the operator's commands, send steady traffic through lb1 (scripts/loadgen.py) and look at the
hosts over SSH. Every test leaves the fleet serving v1 (through the product's own rollback), so the
tests share it. `DJM_E2E_KEEP=1` keeps the fleet afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import demo  # noqa: E402 - the demo's data loader, through the path set above

# Under pytest-xdist (`make test-e2e E2E_WORKERS=2`) the first worker takes DJM_E2E_FLEET and every
# other worker makes a fleet of its own, named after it: the tests never share a fleet at once.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
FIRST_WORKER = WORKER in ("", "gw0")
FLEET = os.environ.get("DJM_E2E_FLEET", "djme2e") + ("" if FIRST_WORKER else f"-{WORKER}")
# Reuse the fleet FLEET as it is (serving v1 with data, idle) instead of making one: `make test` hands
# the tests the fleet of the root Molecule scenario. It is removed afterwards all the same.
REUSE = os.environ.get("DJM_E2E_REUSE") == "1" and FIRST_WORKER
INVENTORY = REPO / "inventories" / "local" / f"{FLEET}-hosts.yml"
LOGS = REPO / "build" / "e2e" / ("" if FIRST_WORKER else FLEET)
# How this worker's fleet is made, and made whole again by a test that stopped a host (fleet.py up
# writes the inventory again: without the same arguments the fleet would lose its variables).
# Two gunicorn workers per app host, not the role's default for the 2 vCPUs a container sees (5):
# every switch, rollback and restore starts them again, each importing Django (about 1 CPU-s each,
# measured in the whole run of dcdde8b, where gunicorn was the largest share of the e2e tier's CPU).
# The root scenario makes its fleet the same way (molecule/default/prepare.yml). A second worker's
# fleet starts from the images with the roles' packages preinstalled (app hosts: venv support and
# nginx; db1: PostgreSQL), saving their apt installs (scripts/fleetlib/recipe.py); the first worker's
# fleet, like the root scenario's, installs them on fresh hosts.
#
# Two app hosts by default (DJM_E2E_APPS): enough for every rolling, canary and half-way case the
# tests make (a first host switched, a second one failing), and a third of the app-host work of each
# of the tier's 40-odd runs less on a CPU-bound machine. The root scenario keeps its three; a reused
# fleet is cut down to DJM_E2E_APPS (the fixture `e2e`).
APPS = int(os.environ.get("DJM_E2E_APPS", "2"))
APP_HOSTS = tuple(f"app{i}" for i in range(1, APPS + 1))
FLEET_UP_ARGS = ("--apps", str(APPS), "--inventory", str(INVENTORY), "--var", "django_service_workers=2") + (
    () if FIRST_WORKER else ("--image-map", "app=debian11-app", "--image-map", "db=debian11-pg")
)
# Held while a worker builds the releases and, for a new fleet, deploys v1: the controller's caches
# (wheelhouses, the CPython build) are filled by one deploy at a time, never written by two at once.
SETUP_LOCK = REPO / "build" / "e2e" / ".setup.lock"
PYTHON_VERSION = "3.11.2"
# The longest tests first (in this order; the rest as written), so that two pytest-xdist workers, which
# take tests in collection order, end together: by their durations (call + teardown) in the whole run
# of 2a65a3f (2026-12-01 19:38-20:24, two workers): 1719, 544, 500, 449, 365, 302, 292, 247, 238, 235
# and 233 s; every other test took under 120 s.
LONGEST_FIRST = (
    "test_two_phase_failed_health_gate_switches_back_and_the_next_run_finishes_the_contract",
    "test_a_project_not_written_for_the_tool_deploys_migrates_and_rolls_back_from_its_inventory_alone",
    "test_rollback_modes_refuse_what_would_break_or_lose_and_restore_keeps_the_replaced_database",
    "test_failed_migration_restores_automatically_without_flags",
    "test_check_mode_changes_nothing_and_shows_the_plan",
    "test_a_lock_held_on_products_trips_the_lock_timeout_and_the_run_goes_back_without_blocking_the_site",
    "test_maintenance_migrate_failing_its_smoke_check_is_reversed_and_proven_without_users_seeing_v2",
    "test_forced_rolling_run_failing_half_way_exports_users_writes_then_restores",
    "test_controller_killed_mid_switch_is_finished_by_rollback_without_a_failed_request",
    "test_controller_killed_mid_migration_leaves_nothing_running_that_could_apply_it_later",
    "test_bad_input_is_refused_in_one_line_and_nothing_served_changes",
    "test_the_runtime_failing_to_install_on_one_host_switches_no_host",
)
ENV = {
    **os.environ,
    "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / ".config" / "containers" / "containers.conf")),
    "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    "ANSIBLE_FORCE_COLOR": "0",
    "ANSIBLE_NOCOLOR": "1",
    # Each task's start time and duration in the logs under build/e2e/ (where a run spends its time).
    "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sh(argv: list[str], timeout: float = 1800, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout, check=False, cwd=REPO, **kwargs)
    if check and proc.returncode != 0:
        pytest.fail(f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return proc


@dataclass
class Run:
    """One ansible-playbook run: its exit status, output, duration."""

    argv: list[str]
    rc: int
    output: str
    seconds: float

    @property
    def failed_line(self) -> str:
        """The message of the last failed task, as an operator reads it."""
        lines = [line for line in self.output.splitlines() if "msg:" in line or line.lstrip().startswith("msg")]
        return lines[-1] if lines else ""


@dataclass
class Load:
    out: Path
    summary: dict[str, Any] = field(default_factory=dict)
    missing_orders: int = -1
    verify_output: str = ""


@dataclass
class E2E:
    http_port: int
    hostvars: dict[str, dict[str, Any]]
    secrets: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ commands
    def playbook(
        self, name: str, *args: str, check: bool = False, log: str = "", timeout: float = 1800, inventory: Path = INVENTORY
    ) -> Run:
        argv = ["ansible-playbook", "-i", str(inventory), name, *args]
        started = time.monotonic()
        proc = subprocess.run(
            argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False
        )
        run = Run(argv, proc.returncode, proc.stdout, time.monotonic() - started)
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / f"{log or Path(name).stem}-{int(time.time())}.log").write_text(proc.stdout)
        if check and run.rc != 0:
            pytest.fail(f"{shlex.join(argv)} exited {run.rc} after {run.seconds:.0f}s:\n{run.output[-8000:]}")
        return run

    def migrate(self, release: str, *args: str, check: bool = True, log: str = "") -> Run:
        return self.playbook(
            "migrate.yml", "-e", f"project_release_id={release}", "-e", f"project_python_version={PYTHON_VERSION}",
            *args, check=check, log=log or f"migrate-{release}",
        )  # fmt: skip

    def rollback(self, *args: str, check: bool = True, log: str = "") -> Run:
        return self.playbook("rollback.yml", *args, check=check, log=log or "rollback")

    # ------------------------------------------------------------------ hosts
    def ssh(self, host: str, command: str, timeout: float = 600, check: bool = True) -> str:
        hv = self.hostvars[host]
        argv = [
            "ssh", "-i", hv["ansible_ssh_private_key_file"], "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={REPO / '.fleet' / FLEET / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
            f"{hv['ansible_user']}@{hv['ansible_host']}", command,
        ]  # fmt: skip
        proc = sh(argv, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"{host}: {command!r} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout.strip()

    def sql(self, query: str) -> str:
        return self.ssh("db1", f"sudo -u postgres psql -X -At -d acme -c {shlex.quote(query)}")

    def serving(self) -> dict[str, str]:
        return {h: self.ssh(h, "basename $(readlink /srv/acme/current)") for h in APP_HOSTS}

    def haproxy_states(self) -> dict[str, str]:
        out = self.ssh("lb1", "echo 'show stat' | sudo socat -t 5 STDIO UNIX-CONNECT:/run/haproxy/admin.sock")
        states = {}
        for line in out.splitlines():
            cols = line.split(",")
            if len(cols) > 17 and cols[0] == "acme_app" and cols[1] not in ("BACKEND", "FRONTEND"):
                states[cols[1]] = cols[17]
        return states

    def wait_all_up(self, seconds: float) -> None:
        """Until every server is UP in HAProxy (its health checks passing again), at most `seconds`."""
        deadline = time.monotonic() + seconds
        while set(self.haproxy_states().values()) != {"UP"} and time.monotonic() < deadline:
            time.sleep(2)

    def redeploy_loadbalancer(self, log: str) -> None:
        """HAProxy's configuration from acme's inventory again (the loadbalancer play of deploy.yml), then
        every server UP: after the fleet lost app hosts, or after another project took lb1."""
        self.playbook("playbooks/deploy.yml", "--tags", "loadbalancer", check=True, log=log)
        self.wait_all_up(60)

    def run_record(self) -> dict[str, Any]:
        """The record of the last migrate.yml run ({} before the first)."""
        last = self.ssh("db1", "sudo cat /var/lib/djm/acme/last-run 2>/dev/null || true")
        return dict(json.loads(self.ssh("db1", f"sudo cat /var/lib/djm/acme/runs/{last}.json"))) if last else {}

    def lock(self) -> dict[str, Any] | None:
        out = self.ssh("db1", "sudo cat /var/lib/djm/acme/lock.json 2>/dev/null || true")
        return json.loads(out) if out else None

    def backup_matches_live(self, backup_id: str) -> bool:
        """The live database's fingerprints equal those recorded in the backup (pg_restore's compare-live)."""
        out = self.ssh(
            "db1",
            "cd /tmp && sudo -u postgres /opt/pg-tools/venv/bin/python /opt/pg-tools/venv/bin/pg_snapshot_restore.py compare-live"
            f" --dsn 'dbname=postgres port=5432' --database acme --backup-dir /var/backups/postgresql --id {backup_id}"
            " --writes-blocked; echo rc=$?",
        )
        report = json.loads(out.rsplit("rc=", 1)[0])
        return bool(out.endswith("rc=0")) and not report.get("diffs")

    def get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def checkout_works(self) -> bool:
        import urllib.request

        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/smoke/checkout", data=b"{}", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - http://127.0.0.1 only
                return 200 <= response.status < 300 and "order_id" in json.loads(response.read())
        except OSError:
            return False

    # ------------------------------------------------------------------ load
    @contextlib.contextmanager
    def load(self, name: str, rate: int = 5, max_seconds: int = 3600, preflight: bool = True) -> Iterator[Load]:
        """Steady mixed traffic through lb1 for the duration of the block; then every acknowledged order is looked up.
        5 requests/s: every response is still checked, at a quarter of the CPU of the root scenario's 20/s, which
        stays the proof under load (measured on this 2-core machine: 20/s took 12 % of it, 10/s 6 %; two workers
        each run their own load, on a machine CPU-bound through the whole tier).
        preflight=False: the site may answer 503 when the load starts (a maintenance window left open)."""
        LOGS.mkdir(parents=True, exist_ok=True)
        out = LOGS / f"load-{name}.jsonl"
        stop = LOGS / f"load-{name}.stop"
        stop.unlink(missing_ok=True)
        summary_file = LOGS / f"load-{name}.json"
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "loadgen.py"), "run", "--url", f"http://127.0.0.1:{self.http_port}",
             "--rate", str(rate), "--duration", str(max_seconds), "--stop-file", str(stop), "--out", str(out),
             "--summary", str(summary_file), *([] if preflight else ["--no-preflight"])],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        load = Load(out)
        time.sleep(3)  # preflight requests, then a few seconds of traffic before the operation
        if proc.poll() is not None:
            pytest.fail(f"loadgen stopped early: {proc.stdout.read() if proc.stdout else ''}")
        try:
            yield load
        finally:
            time.sleep(3)
            stop.touch()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            load.summary = json.loads(summary_file.read_text())
            # The traffic must cover the whole operation: a load cut by its own bound proves nothing after it.
            assert load.summary["window"]["seconds"] < max_seconds - 1, f"load {name} hit its {max_seconds} s bound"
            verify = subprocess.run(
                [sys.executable, str(REPO / "scripts" / "loadgen.py"), "verify", str(out), "--json", "--min-orders", "0",
                 "--psql-cmd", self.psql_cmd()],
                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            load.verify_output = verify.stdout + verify.stderr
            with contextlib.suppress(ValueError):
                load.missing_orders = len(json.loads(verify.stdout)["missing"])

    @contextlib.contextmanager
    def products_held(self) -> Iterator[None]:
        """A long transaction that has read products (ACCESS SHARE) for the duration of the block: any
        ALTER TABLE on it waits, and so does every query queued behind that ALTER."""
        blocker = subprocess.Popen(shlex.split(self.psql_cmd()), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, text=True, env=ENV)  # fmt: skip
        assert blocker.stdin is not None
        blocker.stdin.write("BEGIN; SELECT count(*) FROM products; SELECT pg_sleep(1800);\n")
        blocker.stdin.flush()
        try:
            yield
        finally:
            self.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                     " WHERE query LIKE '%pg_sleep(1800)%' AND pid <> pg_backend_pid()")  # fmt: skip
            blocker.kill()
            blocker.wait()

    def psql_cmd(self) -> str:
        hv = self.hostvars["db1"]
        return shlex.join(
            ["ssh", "-i", hv["ansible_ssh_private_key_file"], "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={REPO / '.fleet' / FLEET / 'known_hosts'}",
             f"{hv['ansible_user']}@{hv['ansible_host']}", "sudo -u postgres psql -X -At -d acme"]
        )  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the tests longest first (LONGEST_FIRST), so that the two workers end together: a long test
    taken last keeps one worker busy alone (in the whole run of 2a65a3f the second project's test, then
    kept last, ran 5 minutes after the other worker had ended). Every worker collects the same order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.name, len(rank)))


@pytest.fixture(scope="session")
def e2e() -> Iterator[E2E]:
    if os.geteuid() != 0 or shutil.which("podman") is None:
        pytest.fail("the end-to-end tests need root and podman: run `make setup`")
    started = time.monotonic()
    state = REPO / ".fleet" / FLEET / "state.json"
    SETUP_LOCK.parent.mkdir(parents=True, exist_ok=True)
    setup_lock = SETUP_LOCK.open("w")
    surplus: list[str] = []
    if REUSE:
        # The lock at once: this worker only checks the caches (filled by the root scenario), seconds,
        # while a new fleet's worker brings its fleet up first and then deploys under the lock. In the
        # whole run of dcdde8b the reusing worker took the lock second and waited 200 s for that deploy.
        fcntl.flock(setup_lock, fcntl.LOCK_EX)
        # `make test`: the fleet the root Molecule scenario left (DJM_MOLECULE_KEEP=1), v1 with its data.
        if not state.is_file():
            pytest.fail(f"DJM_E2E_REUSE=1: no fleet {FLEET} to reuse ({state} is missing)")
        port = int(json.loads(state.read_text())["http_port"])
        # The root scenario's fleet has three app hosts: the ones past APPS leave it (their containers
        # removed, the inventory written again; HAProxy's list follows once the caches are checked).
        apps = yaml.safe_load(INVENTORY.read_text())["all"]["children"]["app"].get("hosts") or {}
        surplus = [host for host in apps if host not in APP_HOSTS]
        for host in surplus:
            sh(["podman", "rm", "--force", f"{FLEET}-{host}"])
        if surplus:
            sh([sys.executable, "scripts/fleet.py", "up", "--name", FLEET, *FLEET_UP_ARGS])
    else:
        port = int((os.environ.get("DJM_E2E_HTTP_PORT") if FIRST_WORKER else None) or free_port())
        sh([sys.executable, "scripts/fleet.py", "images"])
        # Always a new fleet: one left by an interrupted session holds that session's releases and runs.
        sh([sys.executable, "scripts/fleet.py", "down", "--name", FLEET], check=False)
        sh([sys.executable, "scripts/fleet.py", "up", "--name", FLEET, "--http-port", str(port), *FLEET_UP_ARGS])
        fcntl.flock(setup_lock, fcntl.LOCK_EX)
    timings = {"fleet up": time.monotonic() - started}
    try:
        sh([sys.executable, "scripts/build_release.py", "all"])
        sh(["ansible-playbook", "playbooks/local/cpython_source.yml"])
        inventory = yaml.safe_load(INVENTORY.read_text())
        hostvars: dict[str, dict[str, Any]] = {}
        for group in inventory["all"]["children"].values():
            for host, values in (group.get("hosts") or {}).items():
                hostvars[host] = {**inventory["all"].get("vars", {}), **(values or {})}
        fleet = E2E(port, hostvars, json.loads((REPO / ".fleet" / FLEET / "secrets.json").read_text()), timings)
        if REUSE:
            if surplus:
                t = time.monotonic()
                fleet.redeploy_loadbalancer(log=f"without-{'-'.join(surplus)}")
                timings[f"without {', '.join(surplus)}"] = time.monotonic() - t
            serving, lock = fleet.serving(), fleet.lock()
            if set(serving.values()) != {"v1"} or lock is not None or not fleet.checkout_works():
                pytest.fail(f"DJM_E2E_REUSE=1: fleet {FLEET} is not idle on v1 (serving {serving}, lock {lock})")
        else:
            t = time.monotonic()
            fleet.playbook("playbooks/deploy.yml", check=True, log="deploy-v1")
            timings["deploy v1"] = time.monotonic() - t
            t = time.monotonic()
            demo.fill_database(FLEET, INVENTORY, "3MB")
            timings["data"] = time.monotonic() - t
        fcntl.flock(setup_lock, fcntl.LOCK_UN)
        yield fleet
    finally:
        setup_lock.close()
        print(f"\ne2e timings ({FLEET}): " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
        if not os.environ.get("DJM_E2E_KEEP"):
            sh([sys.executable, "scripts/fleet.py", "down", "--name", FLEET], check=False)
