"""Is the process that serves the port the one that should: started after the switch, from `current`?

Run on the host by the role's health gate (python3 -c <this file> ARGS), as root; where root may
not read the service's /proc/<pid>/cwd and fd (no CAP_SYS_PTRACE, as in a container), it takes the
service's uid for those reads. Prints one JSON object: `problems` (a list of sentences,
the most telling first; empty when all is well) and what was found. Always exits 0 unless its
arguments are wrong: the gate judges `problems`.

What it checks, for the unit's MainPID (systemctl show) and the processes below it:
- the unit has a main process;
- it started after the reference moment: the later of the `current` link's own mtime (when the
  link was last switched) and --started-after (epoch seconds, 0: none). With --mode=reload a main
  process older than that is fine when one of its children (the workers a HUP starts) is newer;
- its working directory is the resolved target of `current` (+ --subdir, manage.py's directory);
- the release directory it runs from is named --expected-release, when one is given;
- the port is listened on by a socket that one of these processes holds, and by no process
  outside them.
Python 3.8+, standard library only (it runs on the managed host's system Python).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
TCP_LISTEN = "0A"
DELETED = " (deleted)"  # readlink of a cwd that was removed


def main_pid(unit: str) -> tuple[int, str]:
    out = subprocess.run(
        ["systemctl", "show", "--property=MainPID,ActiveState,SubState", unit],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return int(props.get("MainPID") or 0), f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}"


def stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def started_at(pid: int) -> float:
    """Start of a process in epoch seconds (to a clock tick)."""
    ticks = int(stat_fields(pid)[19])  # field 22, starttime: clock ticks after boot
    since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - since_start


def started_after(pid: int, reference: float) -> bool:
    try:
        return started_at(pid) >= reference
    except OSError:
        return False  # exited meanwhile


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        try:
            children.setdefault(int(stat_fields(pid)[1]), []).append(pid)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def listening_inodes(pid: int, port: int) -> set[str]:
    """Inodes of the TCP sockets listening on the port, in the network namespace of pid."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except FileNotFoundError:
            continue  # no IPv6
    return inodes


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def moment(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) + f".{int(epoch % 1 * 100):02d}"


def become_owner_of(pid: int) -> None:
    """Take the uid and gid of pid's owner, for the reads the kernel guards like ptrace.

    /proc/<pid>/cwd and /proc/<pid>/fd need the same uid or CAP_SYS_PTRACE, which root lacks in
    a container. The service runs without capabilities, so its own uid may read them.
    """
    ids = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, values = line.partition(":")
            if name in ("Uid", "Gid"):
                ids[name] = int(values.split()[0])
    os.setgroups([])
    os.setgid(ids["Gid"])
    os.setuid(ids["Uid"])


def guarded_read(pid: int, read: Callable[[], T]) -> T:
    """read(), or, refused as root, read() again as the owner of pid (for good: it cannot go back)."""
    try:
        return read()
    except PermissionError:
        if os.geteuid() != 0:
            raise
        become_owner_of(pid)
        return read()


def check(args: argparse.Namespace) -> dict[str, object]:
    problems: list[str] = []
    report: dict[str, object] = {"problems": problems}
    unit = args.unit
    pid, state = main_pid(unit)
    report["main_pid"] = pid
    if pid == 0:
        problems.append(f"{unit} has no main process ({state})")
        return report
    tree = descendants(pid)
    current_target = os.path.realpath(args.current)
    switched = os.lstat(args.current).st_mtime

    # Runs from the release current points at.
    cwd = guarded_read(pid, lambda: os.readlink(f"/proc/{pid}/cwd"))
    expected_cwd = os.path.normpath(os.path.join(current_target, args.subdir))
    release_dir = cwd[: -len(DELETED)] if cwd.endswith(DELETED) else cwd
    for _ in [part for part in args.subdir.split("/") if part not in ("", ".")]:
        release_dir = os.path.dirname(release_dir)  # the release is above manage.py's directory
    release = os.path.basename(release_dir)
    report.update(cwd=cwd, expected_cwd=expected_cwd, release=release)
    if cwd != expected_cwd:
        problems.append(f"main process {pid} runs from {cwd}, current is {expected_cwd}")
    if args.expected_release and release != args.expected_release:
        problems.append(f"main process {pid} runs release '{release}' ({release_dir}), expected '{args.expected_release}'")

    # Started after the switch (or the moment the caller gave).
    reference, reference_name = switched, f"{args.current} was switched"
    if args.started_after > switched:
        reference, reference_name = args.started_after, "django_service_started_after"
    started = started_at(pid)
    report.update(started=moment(started), reference=moment(reference), reference_name=reference_name)
    if started < reference:
        newer_workers = [child for child in tree if started_after(child, reference)]
        if not (args.mode == "reload" and newer_workers):
            problems.append(
                f"main process {pid} started at {moment(started)}, before {reference_name} at {moment(reference)}"
                + (" (and none of its workers is newer)" if args.mode == "reload" else "")
            )

    # The port is listened on by the service's processes, and by nothing else.
    listening = listening_inodes(pid, args.port)
    ours = set()
    for member in [pid, *tree]:
        try:
            ours |= guarded_read(member, lambda member=member: socket_inodes(member)) & listening
        except FileNotFoundError:
            continue  # a worker that exited meanwhile
    # Best effort: processes whose fds this uid may not read (root's, in a container) are skipped;
    # a stale gunicorn of the same app runs as the same user and is seen.
    others = []
    for other in sorted(set(all_pids()) - {pid, *tree, os.getpid()}):
        try:
            if socket_inodes(other) & listening:
                others.append(f"{other} ({process_name(other)})")
        except (FileNotFoundError, PermissionError):
            continue
    report.update(listening=sorted(listening), listening_ours=sorted(ours))
    if not listening:
        problems.append(f"nothing listens on port {args.port}")
    elif not ours:
        problems.append(f"port {args.port} is not listened on by main process {pid} of {unit} or its children")
    if others:
        problems.append(f"port {args.port} is also listened on by process {', '.join(others)}, outside {unit}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(prog="check_serving_process", description="Check the process serving a Django release.")
    parser.add_argument("--unit", required=True, help="systemd unit, e.g. acme.service")
    parser.add_argument("--current", required=True, help="the current link, e.g. /srv/acme/current")
    parser.add_argument("--subdir", default="", help="manage.py's directory inside a release ('' for its root)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--expected-release", default="", help="release id the process must run ('' for any)")
    parser.add_argument("--started-after", type=float, default=0.0, help="epoch seconds (0: the switch alone)")
    parser.add_argument(
        "--mode",
        choices=["restart", "reload"],
        default="restart",
        help="what follows a switch: a restart (new main process) or a HUP (new workers)",
    )
    args = parser.parse_args()
    try:
        report = check(args)
    except (OSError, subprocess.CalledProcessError, ValueError) as error:
        report = {"problems": [f"cannot check the process behind {args.unit}: {error}"]}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
