#!/usr/bin/env python3
"""docs/benchmarks.md, written from the newest figures of the benchmark scripts; never typed by hand.

    scripts/bench_report.py            # rewrite docs/benchmarks.md from the newest results
    scripts/bench_report.py --print    # print it instead

Reads the newest build/bench/backup-*.json (scripts/bench_backup.py) and the newest
build/bench/scale-*/results.json (scripts/bench_scale.py); `make bench` runs both, then this. Every
figure and every ratio in the document is computed here from those files; a benchmark not run yet
is said to be missing. The benchmark scripts call write() themselves at their end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "build" / "bench"
DOC = REPO / "docs" / "benchmarks.md"
ACME_BYTES = 50e9  # the customer's database: 50 GB
ACME_RATE = 500  # requests/s at peak
TARGETS = {"dump_throughput": 0.90, "overhead_vs_dump": 0.30, "restore_vs_raw": 1.20, "scale": 1.50}
STAGES = ["prepare", "plan", "backup", "migrate", "switch", "contract", "verify", "finish"]


def newest(pattern: str) -> Path | None:
    found = sorted(BENCH.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def load(path: Path | None) -> Any:
    return json.loads(path.read_text()) if path else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def verdict(value: float, target: float, at_most: bool = True) -> str:
    met = value <= target if at_most else value >= target
    return f"target {'<=' if at_most else '>='} {target:.2f}: **{'met' if met else 'missed'}**"


# --- backup and restore -----------------------------------------------------------------------------------------


def backup_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, key, ratio text) of the backup table, in order."""
    r = result["ratios"]
    return [
        ("raw `pg_dump -Fd -j N`", "raw_dump", ""),
        ("our dump phase (`pg_dump --snapshot`)", "our_dump_phase",
         f"{r['dump_phase_throughput_vs_raw']:.2f}x raw throughput, "
         f"{verdict(r['dump_phase_throughput_vs_raw'], TARGETS['dump_throughput'], False)}"),
        ("our fingerprints (in the snapshot)", "our_fingerprints", ""),
        ("our checksums + manifest", "our_checksums", ""),
        ("our verification (checksums, `pg_restore --list`)", "our_verify", ""),
        ("fingerprints + checksums + verification", "our_overhead",
         f"{r['fingerprints_plus_verification_vs_dump']:.2f}x dump time, "
         f"{verdict(r['fingerprints_plus_verification_vs_dump'], TARGETS['overhead_vs_dump'])}"),
        ("our whole backup, no test restore", "our_backup_total", f"{r['whole_backup_vs_raw_dump']:.2f}x raw dump"),
        ("our verification with the test restore", "our_verify_test_restore", ""),
        ("our whole backup with the test restore", "our_backup_total_with_test_restore",
         f"{r['whole_backup_with_test_restore_vs_raw_dump']:.2f}x raw dump"),
        ("raw `pg_restore -j N`", "raw_restore", ""),
        ("our restore: checksum check", "our_restore_check", ""),
        ("our restore: pg_restore + fingerprints + ANALYZE", "our_restore_restore", ""),
        ("our restore: live comparison + swap", "our_restore_swap", ""),
        ("our whole restore", "our_restore_total",
         f"{r['restore_vs_raw']:.2f}x raw, {verdict(r['restore_vs_raw'], TARGETS['restore_vs_raw'])}"),
    ]  # fmt: skip


def backup_table(result: dict[str, Any]) -> str:
    gib = result["db_size_bytes"] / 2**30
    scale = ACME_BYTES / result["db_size_bytes"]
    lines = [
        f"Database {gib:.2f} GiB (`pg_database_size`), jobs {result['jobs']}, gzip level {result['compress']}, "
        f"{result['machine']['cpus']} CPUs, PostgreSQL {result['machine']['postgresql']}; dump "
        f"{result['raw_dump_bytes'] / 2**20:.0f} MiB raw, {result['our_dump_bytes'] / 2**20:.0f} MiB ours. "
        f"Median of {result['repeat']} rounds (best round in brackets); ratios from the medians.",
        "",
        "| phase | seconds, median (best) | GiB/min | ratio | minutes at 50 GB |",
        "|---|---:|---:|---|---:|",
    ]
    for label, key, ratio_text in backup_rows(result):
        seconds = result["seconds"][key]
        rate = gib / (seconds / 60) if seconds else 0.0
        lines.append(
            f"| {label} | {seconds:.1f} ({result['best_seconds'][key]:.1f}) | {rate:.2f} | {ratio_text} | "
            f"{seconds * scale / 60:.1f} |"
        )
    return "\n".join(lines)


def backup_section(result: dict[str, Any] | None, source: Path | None) -> str:
    head = "## Backup and restore: our roles' programs vs raw `pg_dump` / `pg_restore`\n\n"
    if not result:
        return head + "Not measured yet: `make bench` (or `scripts/bench_backup.py`) writes it.\n"
    rounds = "\n".join(
        f"| {n} | {r['raw_dump']:.1f} | {r['our_dump_phase']:.1f} | {r['our_overhead']:.1f} | {r['raw_restore']:.1f} | "
        f"{r['our_restore_total']:.1f} |"
        for n, r in enumerate(result["rounds"], 1)
    )
    restore, swap = result["breakdown"]["restore"], result["breakdown"]["swap"]
    return (
        head + f"`scripts/bench_backup.py`, run of {result['date']} (load average before: "
        f"{fmt((result.get('load_average_before') or [None])[0])}). A throwaway PostgreSQL cluster on the controller, "
        "the fixture's v1 schema filled by `scripts/gen_data.py`; raw `pg_dump`/`pg_restore` against the programs the "
        "roles ship, called with the roles' arguments. Figures: "
        f"`{source.relative_to(REPO) if source else '-'}` (not committed)." + "\n\n" + backup_table(result) + "\n\n"
        "Per round, seconds:\n\n"
        "| round | raw dump | our dump phase | fingerprints + verification | raw restore | our restore |\n"
        "|---|---:|---:|---:|---:|---:|\n" + rounds + "\n\n"
        f"Inside our restore (last round): `pg_restore` {fmt(restore.get('pg_restore_s'))} s, fingerprints of the restored "
        f"database {fmt(restore.get('fingerprint_s'))} s, `ANALYZE` {fmt(restore.get('analyze_s'))} s; live comparison "
        f"{fmt(swap.get('compare_seconds'))} s of a swap of {fmt(swap.get('total'))} s.\n"
    )


# --- load, rollback modes, overhead ------------------------------------------------------------------------------


def load_section(loaded: dict[str, Any] | None, apps: int | None) -> str:
    head = "## Users' traffic through the load balancer, per operation and per stage\n\n"
    if not loaded:
        return head + "Not measured yet: `make bench` (`scripts/bench_scale.py`) writes it.\n"
    ops = loaded["operations"]
    rate = next(iter(ops.values()))["load"]["rate"] if ops else 0
    lines = [
        head + f"`scripts/loadgen.py` at {rate:g} requests/s (60 % CMS pages, 25 % profiles, 15 % checkouts, each an "
        f"order and a payment) through lb1 during each command, on the fleet of {apps} app hosts; every acknowledged "
        "order looked up in the database afterwards. Each rollback follows its own migrate.",
        "",
        "| command | seconds | requests | failed (by status) | orders acknowledged | orders missing | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, op in ops.items():
        load_ = op["load"]
        whole = load_["phases"]["whole command"]
        failed = ", ".join(f"{n} x {s}" for s, n in sorted(load_["failures_by_status"].items())) or "0"
        lines.append(
            f"| {name} | {op['seconds']:.1f} | {load_['total']} | {failed} | {load_['orders_acknowledged']} | "
            f"{fmt(load_['orders_missing'], 0) if load_['orders_missing'] is not None else 'not checked'} | "
            f"{fmt(whole['p50_ms'], 0)} | {fmt(whole['p95_ms'], 0)} | {fmt(whole['p99_ms'], 0)} |"
        )
    restores = [op for op in ops.values() if op["load"]["orders_missing"] and op.get("mode") == "restore"]
    for op in restores:
        load_ = op["load"]
        kept = load_.get("orders_missing_kept_in_replaced_db")
        lines += [
            "",
            f"The {load_['orders_missing']} orders missing after the restore were acknowledged after the backup the restore "
            "went back to: a restore discards the writes made since its backup, by design; with "
            "`rollback_on_unsafe_restore=export` every row that differs is exported first "
            f"({load_.get('exported_rows', 'n/a')} rows), and the replaced database is kept"
            + (f" (`{load_['replaced_db']}`)" if load_.get("replaced_db") else "")
            + (
                f": {kept} of the {load_['orders_missing']} are in it."
                if kept is not None
                else "; not looked up in it in this run."
            ),
        ]
    lines += ["", "Per stage (requests due while the stage ran, from the run record's stamps, 1 s resolution):", ""]
    lines += [
        "| command | stage | seconds | requests | failed | p50 ms | p95 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, op in ops.items():
        phases = sorted(op["load"]["phases"].items(), key=lambda item: item[1].get("start", 0))  # chronological when known
        for phase, f in phases:
            if phase == "whole command":
                continue
            failed = ", ".join(f"{n} x {s}" for s, n in sorted(f["failed_by_status"].items())) or "0"
            lines.append(
                f"| {name} | {phase} | {f['seconds']:.0f} | {f['requests']} | {failed} | "
                f"{fmt(f['p50_ms'], 0)} | {fmt(f['p95_ms'], 0)} | {fmt(f['p99_ms'], 0)} |"
            )
    lines += [
        "",
        "503 answers during a maintenance window are the maintenance page HAProxy serves while the schema is changed "
        "under the old code (reverse) or the database is swapped (restore); a rolling or two-phase migrate and a code "
        "rollback open no window.",
    ]
    return "\n".join(lines) + "\n"


def rollback_section(loaded: dict[str, Any] | None) -> str:
    head = "## Rollback times per mode\n\n"
    if not loaded:
        return head + "Not measured yet.\n"
    lines = [
        head + "Each after its own migrate v1 -> v2 on the same fleet, under the load above.",
        "",
        "| command | mode | seconds | maintenance window, s | failed requests |",
        "|---|---|---:|---:|---:|",
    ]
    for name, op in loaded["operations"].items():
        if op.get("mode") and name.startswith("rollback"):
            lines.append(
                f"| {name} | {op['mode']} | {op['seconds']:.1f} | {op['maintenance_seconds']:.1f} | {op['load']['failed']} |"
            )
    return "\n".join(lines) + "\n"


def overhead(seconds: float, stages: dict[str, float]) -> dict[str, float]:
    """Orchestration overhead of a migrate: its wall time less the backup, the migrations and the switch
    (drain, restart, readiness, back in rotation)."""
    work = {k: stages.get(k, 0.0) for k in ("backup", "migrate", "switch")}
    rest = seconds - sum(work.values())
    return {**work, "total": seconds, "overhead": rest, "overhead_share": rest / seconds if seconds else 0.0}


def overhead_section(scale: list[dict[str, Any]] | None) -> str:
    head = "## Orchestration overhead of a migrate\n\n"
    if not scale:
        return head + "Not measured yet.\n"
    lines = [
        head + "Wall time of `migrate.yml` less the backup, the migrations and the switch (drain, restart, readiness, "
        "back in rotation, one host at a time), from the run record's stages; the rest is Ansible's own work: the "
        "preflight, the lock and the record, preparing the release on every host beside the live one (virtualenv, "
        "wheels, CPython), the plan and the checks. Unloaded runs of the scale benchmark.",
        "",
        "| app hosts | migrate, s | backup | migrate stage | switch | overhead, s | overhead share |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in scale:
        o = overhead(size["migrate v1 -> v2"], size["migrate stages"])
        lines.append(
            f"| {size['apps']} | {o['total']:.1f} | {o['backup']:.1f} | {o['migrate']:.1f} | {o['switch']:.1f} | "
            f"{o['overhead']:.1f} | {o['overhead_share']:.0%} |"
        )
    return "\n".join(lines) + "\n"


# --- scale ------------------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.2f}x" if a and b is not None else ""


def scale_table(results: list[dict[str, Any]]) -> str:
    small, large = results[0], results[-1]
    lines = [f"| step | {small['apps']} app hosts, s | {large['apps']} app hosts, s | ratio |", "|---|---:|---:|---:|"]
    for key in ["fleet up", "deploy v1", "migrate v1 -> v2", "rollback"]:
        a, b = small.get(key), large.get(key)
        label = f"**{key}**" if key.startswith("migrate") else key
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio(a, b)} |")
    for stage in STAGES:
        a, b = small["migrate stages"].get(stage), large["migrate stages"].get(stage)
        if a is None and b is None:
            continue
        lines.append(f"| migrate: {stage} | {a or 0:.1f} | {b or 0:.1f} | {ratio(a, b)} |")
    if "serial stages" in large:
        a, b = small["migrate stages"].get("switch"), large["serial stages"].get("switch")
        lines.append(f"| migrate: switch, migrate_serial={large['serial']} | {a or 0:.1f} | {b or 0:.1f} | {ratio(a, b)} |")
    return "\n".join(lines)


CPU_KEYS = ["deploy v1", "migrate v1 -> v2", *(f"migrate: {stage}" for stage in STAGES), "rollback"]


def cpu_table(results: list[dict[str, Any]]) -> str:
    """Busy CPU seconds of the machine per command and migrate stage (scripts/cpu_usage.py), the hosts' share
    (the fleet's containers) and how busy the CPUs were, side by side."""
    small, large = results[0], results[-1]
    lines = [f"| step | {small['apps']} app hosts: CPU s (hosts + controller), busy | "
             f"{large['apps']} app hosts: CPU s (hosts + controller), busy | CPU ratio |", "|---|---:|---:|---:|"]  # fmt: skip

    def cell(c: dict[str, Any] | None) -> str:
        if not c:
            return "-"
        share = f"{c['busy_share'] * 100:.0f} %" if c["busy_share"] is not None else "-"
        return f"{c['cpu_s']:.0f} ({c['hosts_cpu_s']:.0f} + {c['controller_cpu_s']:.0f}), {share}"

    for key in CPU_KEYS:
        a, b = small["cpu"].get(key), large["cpu"].get(key)
        if a or b:
            lines.append(f"| {key} | {cell(a)} | {cell(b)} | {ratio(a and a['cpu_s'], b and b['cpu_s']) or '-'} |")
    return "\n".join(lines)


def cpu_floor(results: list[dict[str, Any]]) -> str:
    """What the CPU time of the large fleet's migrate allows on this machine, against the scale target."""
    small, large = results[0], results[-1]
    c = large["cpu"]["migrate v1 -> v2"]
    cpus = large.get("cpus") or 1
    floor = c["cpu_s"] / cpus
    target = TARGETS["scale"] * small["migrate v1 -> v2"]
    per_app = c["hosts_cpu_s"] / large["apps"]
    floor_ratio = floor / small["migrate v1 -> v2"]
    return (
        f"* CPU: the {large['apps']}-host migrate kept the {cpus} CPUs {c['busy_share'] * 100:.0f} % busy and used "
        f"{c['cpu_s']:.0f} CPU s ({c['hosts_cpu_s']:.0f} on the hosts, {c['controller_cpu_s']:.0f} on the controller's "
        f"side); with that work no schedule on {cpus} CPUs takes less than {floor:.0f} s = **{floor_ratio:.2f}x** "
        f"the {small['apps']}-host time, {'above' if floor > target else 'below'} the {TARGETS['scale']}x target "
        f"({target:.0f} s). On hosts with CPUs of their own, the hosts' share ({per_app:.0f} CPU s per app host, on "
        f"average, db1 and lb1 included) would run beside the controller's instead of on the same {cpus} CPUs: an "
        "inference from this table, not a measurement.\n"
    )


def scale_section(scale: list[dict[str, Any]] | None, source: Path | None) -> str:
    head = "## Scale: the same migrate on a small and a large fleet\n\n"
    if not scale:
        return head + "Not measured yet: `make bench` (`scripts/bench_scale.py`) writes it.\n"
    small, large = scale[0], scale[-1]
    migrate_ratio = large["migrate v1 -> v2"] / small["migrate v1 -> v2"]
    both = [s for s in STAGES if s in small["migrate stages"] and s in large["migrate stages"]]
    grows = [s for s in both if small["migrate stages"][s] and large["migrate stages"][s] / small["migrate stages"][s] >= 1.3]
    flat = [s for s in both if s not in grows]
    return (
        head + f"`scripts/bench_scale.py`: new fleets of {small['apps']} and {large['apps']} app hosts (Debian 11) one after "
        f"the other, the controller's caches warm, the same data; migrate strategy {small['strategy']} / {large['strategy']}, "
        f"rollback by {small['rollback mode']} / {large['rollback mode']}. Load average before each: "
        f"{small['load_average_before'][0]:.1f} / {large['load_average_before'][0]:.1f}. Memory the fleet took serving v1 "
        f"(drop of MemAvailable): {small['fleet memory MiB']} / {large['fleet memory MiB']} MiB. Figures: "
        f"`{source.relative_to(REPO) if source else '-'}` (not committed).\n\n" + scale_table(scale) + "\n\n"
        f"* Migrate on {large['apps']} app hosts: **{migrate_ratio:.2f}x** the {small['apps']}-host time; "
        f"{verdict(migrate_ratio, TARGETS['scale'])}.\n"
        f"* Grew with the host count (>= 1.3x): {', '.join(grows) or 'none'}. Stayed flat: {', '.join(flat) or 'none'}.\n"
        f"* The hosts here are containers sharing the controller's {small.get('cpus', '2')} CPUs: the per-host work of "
        "the parallel stages (prepare) runs on the same CPUs for every host, as it would not on VMs with CPUs of their "
        "own; the switch is one host at a time by design (`migrate_serial`, default 1).\n"
        + (
            "\nCPU time per step (`scripts/cpu_usage.py`: the machine's busy CPU seconds from /proc/stat, the hosts' "
            "from their containers' cgroups, the rest is the controller's side: ansible, ssh, podman), and how busy "
            "the CPUs were over the step:\n\n" + cpu_table(scale) + "\n\n" + cpu_floor(scale)
            if "cpu" in small and "cpu" in large
            else ""
        )
    )


# --- extrapolation ----------------------------------------------------------------------------------------------


def capacity(probe: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest probed rate answered without a failure and with p99 under 1 s."""
    good = [p for p in probe if p["failed"] == 0 and (p["p99_ms"] or 0) < 1000]
    return max(good, key=lambda p: p["rate"]) if good else None


def migrate_under_load(loaded: dict[str, Any]) -> str:
    op = loaded["operations"].get("migrate")
    if not op:
        return ""
    load_ = op["load"]
    return (
        f" The migrate under load above: {load_['failed']} of {load_['total']} requests failed at {load_['rate']:g}/s; "
        f"as long a migrate at 500 requests/s would serve about {ACME_RATE * op['seconds']:.0f} requests."
    )


def extrapolation_section(
    backup: dict[str, Any] | None, scale: list[dict[str, Any]] | None, loaded: dict[str, Any] | None
) -> str:
    head = "## Extrapolation to ACME: 50 GB, 500 requests/s\n\n"
    lines = [head.rstrip("\n"), ""]
    if backup:
        k = ACME_BYTES / backup["db_size_bytes"]
        s = backup["seconds"]

        def minutes(seconds: float, digits: int = 0) -> str:
            return f"{seconds * k / 60:.{digits}f}"

        lines += [
            "* **Data** (linear in the database size from the backup benchmark, "
            f"{backup['db_size_bytes'] / 2**30:.2f} GiB -> 50 GB, x{k:.1f}; assumes the same throughput per byte, "
            f"the same {backup['machine']['cpus']} CPUs and `-j`, and a database that stays in the page cache, which "
            "50 GB would not on this machine: an I/O-bound host is slower on both sides): verified backup "
            f"{minutes(s['our_backup_total'])} min ({minutes(s['our_backup_total_with_test_restore'])} min with the "
            f"test restore) against {minutes(s['raw_dump'])} min for a raw dump; restore "
            f"{minutes(s['our_restore_total'])} min against {minutes(s['raw_restore'])} min raw, of which "
            f"{minutes(s['our_restore_swap'], 1)} min with "
            "connections to the live database blocked (live comparison and swap).",
        ]
        if scale:
            small = scale[0]
            stages = small["migrate stages"]
            rest = small["migrate v1 -> v2"] - stages.get("backup", 0.0)
            lines.append(
                f"* **A rolling migrate** at 50 GB: the measured run on {small['apps']} app hosts less its backup "
                f"({rest:.0f} s) plus the verified backup at 50 GB: about {(rest + s['our_backup_total'] * k) / 60:.0f} min, "
                "the site serving throughout. Assumes the migrations themselves stay schema-only and fast (the plan's "
                "classes); a data migration's time grows with the rows it touches and is not extrapolated here."
            )
            if loaded and "rollback (restore, users' writes exported)" in loaded["operations"]:
                op = loaded["operations"]["rollback (restore, users' writes exported)"]
                window = op["maintenance_seconds"] + (s["our_restore_swap"] * (k - 1))
                inside = op["maintenance_seconds"] + (s["our_restore_total"] * (k - 1))
                lines.append(
                    f"* **A restore rollback** at 50 GB, undoing a migrate that had finished: the backup is restored "
                    "beside the live database while the site serves; the window holds the live comparison and the swap. "
                    f"The measured window ({op['maintenance_seconds']:.0f} s) plus the extra live comparison of the larger "
                    f"database: about {window / 60:.1f} min of maintenance page (the rows users wrote since the backup, "
                    "exported in the window, are not extrapolated). The undo of a failed run restores inside the window "
                    f"(what serves may be failing): about {inside / 60:.0f} min. A reverse or code rollback does not grow "
                    "with the data."
                )
    else:
        lines.append("* Data: the backup benchmark has not run yet.")
    if loaded and loaded.get("probe"):
        best = capacity(loaded["probe"])
        apps = scale[0]["apps"] if scale else 3
        probe = ", ".join(f"{p['rate']}/s: {p['failed']} failed, p99 {fmt(p['p99_ms'], 0)} ms" for p in loaded["probe"])
        if best:
            per_host = best["rate"] / apps
            hosts = math.ceil(ACME_RATE / per_host)
            lines.append(
                f"* **Traffic**: rising steady rates through lb1 on the fleet of {apps} app hosts ({probe}). The highest "
                f"answered without failure and with p99 under 1 s: {best['rate']}/s, so at least {per_host:.0f} requests/s per "
                f"app host of this machine (a lower bound: the load generator, HAProxy, PostgreSQL and every app host share "
                f"its CPUs). 500 requests/s would need {hosts} such hosts serving, so {hosts + 1} with `migrate_serial: 1` (one "
                "out of rotation during its switch)." + migrate_under_load(loaded)
            )
        else:
            lines.append(f"* Traffic: no probed rate was answered cleanly ({probe}).")
    return "\n".join(lines) + "\n"


# --- the document -----------------------------------------------------------------------------------------------


def render() -> str:
    backup_path, scale_path = newest("backup-*.json"), newest("scale-*/results.json")
    backup, scale = load(backup_path), load(scale_path)
    loaded = next((size.get("load") for size in scale or [] if size.get("load")), None)
    apps = next((size["apps"] for size in scale or [] if size.get("load")), None)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return "\n".join([
        "# Benchmarks",
        "",
        f"Generated by `scripts/bench_report.py` ({when}) from the newest results of `make bench`; do not edit by hand.",
        "Every figure below is a measurement of a script in one run, side by side with what it is compared to; the",
        "ratios are computed from them. The machine is shared: single figures move by up to +-20 % between runs.",
        "",
        "    make bench                # scripts/bench_scale.py, scripts/bench_backup.py, then this report",
        "",
        backup_section(backup, backup_path),
        load_section(loaded, apps),
        rollback_section(loaded),
        overhead_section(scale),
        scale_section(scale, scale_path.parent / "results.json" if scale_path else None),
        extrapolation_section(backup, scale, loaded),
    ])  # fmt: skip


def write() -> None:
    DOC.write_text(render().rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the document instead of writing docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(render())
    else:
        write()
        sys.stderr.write(f"wrote {DOC.relative_to(REPO)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
