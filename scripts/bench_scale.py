#!/usr/bin/env python3
"""Benchmark: the same deploy, migrate and rollback on 3 and on 10 app hosts, side by side, in one run.

For each size, on a new local fleet (lb1, app1..appN, db1; Debian 11), the operator's commands:

    ansible-playbook playbooks/deploy.yml                                   # v1 on new hosts
    ansible-playbook migrate.yml -e project_release_id=v2 -e project_python_version=3.11.2
    ansible-playbook rollback.yml

with the controller's caches warm (the CPython build and the release artefacts are made once,
before the first size) and the same small generated data set. Prints per-command seconds and the
migrate's per-stage seconds (from its run record on db1) side by side with their ratio, so what
grows with the number of hosts and what stays flat shows; writes them into docs/benchmarks.md
(between the bench_scale markers) and the raw figures as JSON under build/bench/.

    scripts/bench_scale.py [--sizes 3,10] [--size 3MB] [--fleet djmbench] [--http-port 18300]

The fleet is removed at the end (--keep keeps the last one). Needs `make setup`; about 25 minutes
on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import demo  # scripts/demo.py, beside this file: environment() and the data loader
from run_record import stage_seconds

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
START, END = "<!-- bench_scale:start -->", "<!-- bench_scale:end -->"
PYTHON_VERSION = "3.11.2"
STAGES = ["prepare", "plan", "backup", "migrate", "switch", "contract", "verify", "finish"]


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


def run_record(fleet: str, inventory: Path) -> dict[str, Any]:
    """The record of the last run, read on db1 over SSH."""
    db = demo.inventory_hosts(inventory)["db1"]
    fleet_dir = REPO / ".fleet" / fleet
    command = "sudo sh -c 'cat /var/lib/djm/acme/runs/$(cat /var/lib/djm/acme/last-run).json'"
    known = f"UserKnownHostsFile={fleet_dir / 'known_hosts'}"
    out = subprocess.run(
        ["ssh", "-i", str(fleet_dir / "id_ed25519"), "-o", "BatchMode=yes", "-o", known, "-o", "StrictHostKeyChecking=yes",
         f"{db['ansible_user']}@{db['ansible_host']}", command],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return dict(json.loads(out))


def available_mib() -> int:
    """MemAvailable of this machine, MiB (what the fleet takes shows as its drop)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def measure(apps: int, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    fleet, py = args.fleet, sys.executable
    inventory = REPO / "inventories" / "local" / f"{fleet}-hosts.yml"
    inv = ["-i", str(inventory)]
    result: dict[str, Any] = {"apps": apps, "serial": args.serial, "load_average_before": os.getloadavg()}
    subprocess.run(
        [py, "scripts/fleet.py", "down", "--name", fleet], cwd=REPO, env=demo.environment(), check=False, capture_output=True
    )
    available_before = available_mib()
    up = ["up", "--name", fleet, "--apps", str(apps), "--http-port", str(args.http_port), "--inventory", str(inventory)]
    result["fleet up"] = timed([py, "scripts/fleet.py", *up], logs / f"{apps}-fleet-up.log")
    result["deploy v1"] = timed(["ansible-playbook", *inv, "playbooks/deploy.yml"], logs / f"{apps}-deploy.log")
    result["fleet memory MiB"] = available_before - available_mib()  # serving v1, idle
    demo.fill_database(fleet, inventory, args.size)
    to_v2 = ["-e", "project_release_id=v2", "-e", f"project_python_version={PYTHON_VERSION}"]
    result["migrate v1 -> v2"] = timed(["ansible-playbook", *inv, "migrate.yml", *to_v2], logs / f"{apps}-migrate.log")
    record = run_record(fleet, inventory)
    result["strategy"] = record.get("strategy")
    result["migrate stages"] = stage_seconds(record)
    result["rollback"] = timed(["ansible-playbook", *inv, "rollback.yml"], logs / f"{apps}-rollback.log")
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
    result["load_average_after"] = os.getloadavg()
    return result


def ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.2f}x" if a and b is not None else ""


def table(results: list[dict[str, Any]]) -> str:
    small, large = results[0], results[-1]
    head = f"| step | {small['apps']} app hosts, s | {large['apps']} app hosts, s | ratio |"
    lines = [head, "|---|---:|---:|---:|"]
    for key in ["fleet up", "deploy v1", "migrate v1 -> v2", "rollback"]:
        a, b = small.get(key), large.get(key)
        label = f"**{key}**" if key.startswith("migrate") else key
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {ratio(a, b)} |")
    for stage in STAGES:
        a, b = small["migrate stages"].get(stage), large["migrate stages"].get(stage)
        if a is None and b is None:
            continue
        lines.append(f"| migrate: {stage} | {a or 0:.1f} | {b or 0:.1f} | {ratio(a, b)} |")
    if "serial stages" in large:
        a, b = small["migrate stages"].get("switch"), large["serial stages"].get("switch")
        lines.append(f"| migrate: switch, migrate_serial={large['serial']} | {a or 0:.1f} | {b or 0:.1f} | {ratio(a, b)} |")
    return "\n".join(lines)


def write_doc(results: list[dict[str, Any]], text: str, raw: Path, started: datetime.datetime) -> None:
    small, large = results[0], results[-1]
    when = started.strftime("%Y-%m-%d %H:%M")
    section = "\n".join([
        START,
        f"### Run of {when} (`scripts/bench_scale.py`)",
        "",
        f"New fleets of {small['apps']} and {large['apps']} app hosts (Debian 11) one after the other, the controller's",
        f"caches warm, the same data; migrate strategy {small['strategy']} / {large['strategy']},",
        f"rollback by {small['rollback mode']} / {large['rollback mode']}. Load average before each:",
        f"{small['load_average_before'][0]:.1f} / {large['load_average_before'][0]:.1f}.",
        f"Memory the fleet took once serving v1 (drop of MemAvailable): {small['fleet memory MiB']} /"
        f" {large['fleet memory MiB']} MiB; machine: {os.cpu_count()} CPUs.",
        f"Raw figures: `{raw.relative_to(REPO)}` (not committed).",
        "",
        text,
        "",
        END,
    ])  # fmt: skip
    doc = DOC.read_text()
    if START in doc and END in doc:
        doc = doc[: doc.index(START)] + section + doc[doc.index(END) + len(END) :]
    else:
        doc = doc.rstrip("\n") + "\n\n## Scale: the same migrate on 3 and on 10 app hosts\n\n" + section + "\n"
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3,10", help="app host counts, smallest first (default 3,10)")
    parser.add_argument("--size", default="3MB", help="generated data (default 3MB)")
    parser.add_argument("--fleet", default="djmbench", help="fleet name (default djmbench)")
    parser.add_argument("--http-port", type=int, default=18300, help="lb1:80 on 127.0.0.1:PORT (default 18300)")
    parser.add_argument(
        "--serial", default="25%", help="also switch the largest fleet in batches of this migrate_serial ('' for no)"
    )
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
        for apps in sizes:
            results.append(measure(apps, args, logs))
    finally:
        if not args.keep:
            subprocess.run([py, "scripts/fleet.py", "down", "--name", args.fleet], cwd=REPO, env=demo.environment(), check=False)
    raw = logs / "results.json"
    raw.write_text(json.dumps(results, indent=2))
    text = table([results[0], results[-1]])
    print(text)
    if not args.no_doc:
        write_doc([results[0], results[-1]], text, raw, started)
        log(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
