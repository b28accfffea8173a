#!/usr/bin/env python3
"""Benchmark: the same deploy, migrate and rollback on 3 and on 10 app hosts, side by side, in one run.

For each size, on a new local fleet (lb1, app1..appN, db1; Debian 11), the operator's commands:

    ansible-playbook playbooks/deploy.yml                                   # v1 on new hosts
    ansible-playbook migrate.yml -e project_release_id=v2 -e project_python_version=3.11.2
    ansible-playbook rollback.yml

with the controller's caches warm (the CPython build and the release artefacts are made once,
before the first size) and the same small generated data set. Prints per-command seconds and the
migrate's per-stage seconds (from its run record on db1) side by side with their ratio, so what
grows with the number of hosts and what stays flat shows.

Then, on the smallest fleet and under steady mixed traffic through lb1 (scripts/loadgen.py at
--load-rate requests/s, every acknowledged order looked up afterwards): a capacity probe (rising
rates, --probe-seconds each), and each rollback mode after its own migrate: migrate + rollback
(auto: reverse), migrate + rollback restore (users' writes exported), migrate with the contract
left pending + rollback (auto: code); per command and per stage of its run record: requests,
failures by status, p50/p95/p99.

The raw figures go to build/bench/scale-<time>/results.json, and docs/benchmarks.md is written
again from the newest figures (scripts/bench_report.py).

    scripts/bench_scale.py [--sizes 3,10] [--size 3MB] [--fleet djmbench] [--http-port 18300]
                           [--load-rate 20] [--probe-seconds 20] [--serial 25%] [--keep] [--no-doc]

The fleet is removed at the end (--keep keeps the last one). Needs `make setup`; about 45 minutes
on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bench_report  # scripts/bench_report.py: docs/benchmarks.md from the latest figures
import cpu_usage  # scripts/cpu_usage.py: busy CPU seconds of the machine and of the containers per window
import demo  # scripts/demo.py, beside this file: environment() and the data loader
import loadgen  # scripts/loadgen.py: the traffic, its records and percentiles
from fleetlib.hosts import LABEL
from run_record import stage_seconds, stage_windows

REPO = Path(__file__).resolve().parent.parent
PYTHON_VERSION = "3.11.2"


def log(message: str) -> None:
    sys.stderr.write(f"[{datetime.datetime.now():%H:%M:%S}] {message}\n")
    sys.stderr.flush()


def timed(argv: list[str], logfile: Path) -> float:
    """Run argv from the repository root, its output into logfile; seconds, or exit on failure."""
    log("$ " + shlex.join(argv))
    started = time.monotonic()
    with logfile.open("w") as out:
        env = {**demo.environment(), "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks"}  # per-task times in the logs
        rc = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.monotonic() - started
    if rc != 0:
        raise SystemExit(f"bench_scale: {shlex.join(argv)} exited {rc} after {seconds:.0f}s; see {logfile}")
    log(f"  {seconds:.1f}s")
    return seconds


def ssh_db1(fleet: str, inventory: Path) -> list[str]:
    """ssh to db1 of the fleet, as the fleet's own key and known_hosts allow."""
    db = demo.inventory_hosts(inventory)["db1"]
    fleet_dir = REPO / ".fleet" / fleet
    known = f"UserKnownHostsFile={fleet_dir / 'known_hosts'}"
    return ["ssh", "-i", str(fleet_dir / "id_ed25519"), "-o", "BatchMode=yes", "-o", known, "-o", "StrictHostKeyChecking=yes",
            f"{db['ansible_user']}@{db['ansible_host']}"]  # fmt: skip


def run_record(fleet: str, inventory: Path) -> dict[str, Any]:
    """The record of the last run, read on db1 over SSH."""
    command = "sudo sh -c 'cat /var/lib/djm/acme/runs/$(cat /var/lib/djm/acme/last-run).json'"
    out = subprocess.run([*ssh_db1(fleet, inventory), command], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


@contextlib.contextmanager
def under_load(args: argparse.Namespace, inventory: Path, logs: Path, name: str) -> Iterator[dict[str, Any]]:
    """Steady mixed traffic through lb1 (scripts/loadgen.py, --load-rate) for the block; afterwards the dict
    holds the summary, every request's record file and the acknowledged orders not found in the database."""
    out, stop, summary = (logs / f"load-{name}.{ext}" for ext in ("jsonl", "stop", "json"))
    stop.unlink(missing_ok=True)
    argv = [sys.executable, "scripts/loadgen.py", "run", "--url", f"http://127.0.0.1:{args.http_port}",
            "--rate", str(args.load_rate), "--duration", "3600", "--stop-file", str(stop), "--out", str(out),
            "--summary", str(summary)]  # fmt: skip
    with (logs / f"load-{name}.log").open("w") as log_file:
        proc = subprocess.Popen(argv, cwd=REPO, env=demo.environment(), stdout=log_file, stderr=subprocess.STDOUT)
    load: dict[str, Any] = {"records": str(out)}
    time.sleep(3)  # the preflight, then traffic before the operation starts
    if proc.poll() is not None:
        raise SystemExit(f"bench_scale: loadgen stopped early; see {logs / f'load-{name}.log'}")
    try:
        yield load
    finally:
        time.sleep(3)
        stop.touch()
        proc.wait(timeout=120)
    load["summary"] = json.loads(summary.read_text())
    missing = missing_orders(args, inventory, out, "acme")
    load["missing_orders"], load["missing_ids"] = (len(missing), missing) if missing is not None else (None, [])


def missing_orders(args: argparse.Namespace, inventory: Path, records: Path, database: str) -> list[int] | None:
    """The acknowledged order ids of a load's records that `database` on db1 does not hold (None: not checked)."""
    psql = shlex.join([*ssh_db1(args.fleet, inventory), f"sudo -u postgres psql -X -At -d {shlex.quote(database)}"])
    verify = subprocess.run(
        [sys.executable, "scripts/loadgen.py", "verify", str(records), "--json", "--min-orders", "0", "--psql-cmd", psql],
        cwd=REPO, env=demo.environment(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    return list(json.loads(verify.stdout)["missing"]) if verify.stdout.strip() else None


def phase_figures(records: list[dict[str, Any]], windows: dict[str, tuple[float, float]]) -> dict[str, dict[str, Any]]:
    """Requests due in each window (epoch start <= t_start < end): how many, failed by status, latency percentiles (ms)."""
    figures = {}
    for name, (start, end) in windows.items():
        inside = [r for r in records if start <= r["t_start"] < end]
        latency = sorted(float(r["duration_ms"]) for r in inside)
        failed: dict[str, int] = {}
        for r in inside:
            if not r["ok"]:
                failed[str(r["status"])] = failed.get(str(r["status"]), 0) + 1
        figures[name] = {
            "start": start,
            "seconds": round(end - start, 1),
            "requests": len(inside),
            "failed": sum(failed.values()),
            "failed_by_status": failed,
            **{f"p{pct}_ms": loadgen.percentile(latency, pct) for pct in (50, 95, 99)},
        }
    return figures


def loaded_operation(args: argparse.Namespace, inventory: Path, logs: Path, name: str, argv: list[str]) -> dict[str, Any]:
    """One operator command under load: its seconds, its run record's stages and mode, the load figures of the
    whole command and of each stage of the record that ran inside it."""
    with under_load(args, inventory, logs, name) as load:
        started = time.time()
        seconds = timed(argv, logs / f"{name}.log")
        ended = time.time()
    record = run_record(args.fleet, inventory)
    records = list(loadgen.read_records(Path(load["records"])))
    stages = {k: v for k, v in stage_windows(record).items() if v[0] >= started - 1 and v[1] <= ended + 1}
    maintenance = record.get("maintenance") or {}
    windows = {"whole command": (started, ended), **stages}
    if maintenance.get("opened_epoch") and maintenance.get("seconds") is not None:
        opened = float(maintenance["opened_epoch"])
        if started - 1 <= opened <= ended:
            windows["maintenance window"] = (opened, opened + float(maintenance["seconds"]))
    summary = load["summary"]
    # A restore discards the writes made since the backup (exported first with rollback_on_unsafe_restore=export):
    # the acknowledged orders the live database lacks must be in the replaced database the restore kept.
    restored = record.get("restored") or {}
    kept = None
    if restored.get("failed_db") and load["missing_ids"]:
        lacking = missing_orders(args, inventory, Path(load["records"]), restored["failed_db"])
        kept = None if lacking is None else len(set(load["missing_ids"]) - set(lacking))
    return {
        "command": shlex.join(argv),
        "seconds": seconds,
        "strategy": record.get("strategy"),
        "mode": (record.get("converge") or {}).get("mode"),
        "stages": {k: round(v[1] - v[0], 1) for k, v in stages.items()},
        "maintenance_seconds": round(maintenance["seconds"], 1) if "maintenance window" in windows else 0.0,
        "load": {
            "rate": args.load_rate,
            "total": summary["total"],
            "failed": summary["failed"],
            "failures_by_status": summary["failures_by_status"],
            "orders_acknowledged": summary["orders_acknowledged"],
            "orders_missing": load["missing_orders"],
            "orders_missing_kept_in_replaced_db": kept,
            "replaced_db": restored.get("failed_db"),
            "exported_rows": (restored.get("export") or {}).get("rows"),
            "phases": phase_figures(records, windows),
        },
    }


def capacity_probe(args: argparse.Namespace, logs: Path) -> list[dict[str, Any]]:
    """Rising steady rates through lb1 for --probe-seconds each (v1 serving, nothing else running): what the
    fleet answers, for the extrapolation to a production rate. Stops after the first rate with failures."""
    steps = []
    for rate in (25, 50, 100, 200):
        out, summary = logs / f"probe-{rate}.jsonl", logs / f"probe-{rate}.json"
        argv = [sys.executable, "scripts/loadgen.py", "run", "--url", f"http://127.0.0.1:{args.http_port}",
                "--rate", str(rate), "--duration", str(args.probe_seconds), "--workers", "64",
                "--out", str(out), "--summary", str(summary)]  # fmt: skip
        timed(argv, logs / f"probe-{rate}.log")
        figures = json.loads(summary.read_text())
        latency = sorted(float(r["duration_ms"]) for r in loadgen.read_records(out))
        steps.append({
            "rate": rate, "total": figures["total"], "failed": figures["failed"],
            "achieved_per_s": figures["requests_per_s"],
            **{f"p{pct}_ms": loadgen.percentile(latency, pct) for pct in (50, 95, 99)},
        })  # fmt: skip
        if figures["failed"]:
            break
    return steps


def load_runs(args: argparse.Namespace, inventory: Path, logs: Path) -> dict[str, Any]:
    """On the fleet left on v1: the capacity probe, then each rollback mode after its own migrate, all under load."""
    inv = ["-i", str(inventory)]
    to_v2 = ["migrate.yml", "-e", "project_release_id=v2", "-e", f"project_python_version={PYTHON_VERSION}"]
    operations = {}
    probe = capacity_probe(args, logs)
    plan = [
        ("migrate", to_v2),
        ("rollback (auto: reverse)", ["rollback.yml"]),
        ("migrate again", to_v2),
        ("rollback (restore, users' writes exported)",
         ["rollback.yml", "-e", "rollback_mode=restore", "-e", "rollback_on_unsafe_restore=export"]),
        ("migrate, contract left pending", [*to_v2, "--skip-tags", "contract"]),
        ("rollback (auto: code)", ["rollback.yml"]),
    ]  # fmt: skip
    for number, (name, argv) in enumerate(plan, 1):
        operations[name] = loaded_operation(args, inventory, logs, f"op-{number}", ["ansible-playbook", *inv, *argv])
    return {"probe": probe, "operations": operations}


def available_mib() -> int:
    """MemAvailable of this machine, MiB (what the fleet takes shows as its drop)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def cpython_cached() -> bool:
    """The controller's cache holds a CPython build (python_runtime builds it on the first host that
    needs it, once, and every later run installs it from there)."""
    cache = Path.home() / ".cache" / "djm" / "python" / "builds"  # the fleets' python_runtime_cache_dir
    return cache.is_dir() and any(cache.iterdir())


def fleet_containers(fleet: str) -> list[str]:
    """The names of the fleet's containers (its hosts: lb1, app1..appN, db1)."""
    out = subprocess.run(["podman", "ps", "--filter", f"label={LABEL}={fleet}", "--format", "{{.Names}}"],
                         env=demo.environment(), check=True, capture_output=True, text=True).stdout  # fmt: skip
    return out.split()


def measure(apps: int, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    fleet, py = args.fleet, sys.executable
    inventory = REPO / "inventories" / "local" / f"{fleet}-hosts.yml"
    inv = ["-i", str(inventory)]
    result: dict[str, Any] = {"apps": apps, "serial": args.serial, "cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    subprocess.run(
        [py, "scripts/fleet.py", "down", "--name", fleet], cwd=REPO, env=demo.environment(), check=False, capture_output=True
    )
    available_before = available_mib()
    up = ["up", "--name", fleet, "--apps", str(apps), "--http-port", str(args.http_port), "--inventory", str(inventory)]
    result["fleet up"] = timed([py, "scripts/fleet.py", *up], logs / f"{apps}-fleet-up.log")
    # CPU seconds of the machine and of the fleet's containers for each command and migrate stage.
    sampler = cpu_usage.CpuSampler(cpu_usage.container_usage_files(fleet_containers(fleet))).start()
    windows: dict[str, tuple[float, float]] = {}

    def command(key: str, argv: list[str], logfile: Path) -> float:
        started = time.time()
        seconds = timed(argv, logfile)
        windows[key] = (started, time.time())
        return seconds

    try:
        result["deploy v1"] = command(
            "deploy v1", ["ansible-playbook", *inv, "playbooks/deploy.yml"], logs / f"{apps}-deploy.log"
        )
        result["fleet memory MiB"] = available_before - available_mib()  # serving v1, idle
        demo.fill_database(fleet, inventory, args.size)
        to_v2 = ["-e", "project_release_id=v2", "-e", f"project_python_version={PYTHON_VERSION}"]
        result["migrate v1 -> v2"] = command(
            "migrate v1 -> v2", ["ansible-playbook", *inv, "migrate.yml", *to_v2], logs / f"{apps}-migrate.log"
        )
        record = run_record(fleet, inventory)
        result["strategy"] = record.get("strategy")
        result["migrate stages"] = stage_seconds(record)
        windows.update({f"migrate: {name}": window for name, window in stage_windows(record).items()})
        result["rollback"] = command("rollback", ["ansible-playbook", *inv, "rollback.yml"], logs / f"{apps}-rollback.log")
    finally:
        sampler.stop()
    result["cpu"] = {key: sampler.window(*window) for key, window in windows.items()}
    record = run_record(fleet, inventory)
    result["rollback mode"] = record.get("converge", {}).get("mode")
    if args.serial and apps == max(int(n) for n in args.sizes.split(",")):
        # The same switch in batches of migrate_serial hosts (v2 is prepared by now: only the switch compares).
        serial = ["-e", f"migrate_serial={args.serial}"]
        result["serial migrate"] = timed(
            ["ansible-playbook", *inv, "migrate.yml", *to_v2, *serial], logs / f"{apps}-migrate-serial.log"
        )
        result["serial stages"] = stage_seconds(run_record(fleet, inventory))
        timed(["ansible-playbook", *inv, "rollback.yml"], logs / f"{apps}-rollback-serial.log")
    if args.load_rate and apps == min(int(n) for n in args.sizes.split(",")):
        result["load"] = load_runs(args, inventory, logs)
    result["load_average_after"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3,10", help="app host counts, smallest first (default 3,10)")
    parser.add_argument("--size", default="3MB", help="generated data (default 3MB)")
    parser.add_argument("--fleet", default="djmbench", help="fleet name (default djmbench)")
    parser.add_argument("--http-port", type=int, default=18300, help="lb1:80 on 127.0.0.1:PORT (default 18300)")
    parser.add_argument(
        "--serial", default="25%", help="also switch the largest fleet in batches of this migrate_serial ('' for no)"
    )
    parser.add_argument(
        "--load-rate",
        type=float,
        default=20.0,
        help="requests/s through lb1 for the runs under load on the smallest fleet (0: none)",
    )
    parser.add_argument("--probe-seconds", type=int, default=20, help="seconds of each rate of the capacity probe (default 20)")
    parser.add_argument("--keep", action="store_true", help="keep the last fleet")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    if len(sizes) < 2 or sizes != sorted(sizes) or sizes[0] < 1:
        parser.error("--sizes: at least two app host counts, smallest first, e.g. 3,10")

    started = datetime.datetime.now()
    stamp = started.strftime("%Y%m%dT%H%M%S")
    logs = REPO / "build" / "bench" / f"scale-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    timed([py, "scripts/fleet.py", "images"], logs / "images.log")
    timed([py, "scripts/build_release.py", "all"], logs / "releases.log")
    timed(["ansible-playbook", "playbooks/local/cpython_source.yml"], logs / "cpython-source.log")
    results = []
    try:
        if not cpython_cached():
            # The first fleet's migrate would build it (200 of a 348 s 3-host migrate on a new machine).
            log("no CPython build in the controller's cache: the same run on one app host builds it first (not counted)")
            (logs / "warm-up").mkdir(exist_ok=True)
            measure(1, args, logs / "warm-up")
        for apps in sizes:
            results.append(measure(apps, args, logs))
    finally:
        if not args.keep:
            subprocess.run([py, "scripts/fleet.py", "down", "--name", args.fleet], cwd=REPO, env=demo.environment(), check=False)
    raw = logs / "results.json"
    raw.write_text(json.dumps(results, indent=2))
    print(bench_report.scale_table(results))
    if not args.no_doc:
        bench_report.write()
        log(f"wrote {bench_report.DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
