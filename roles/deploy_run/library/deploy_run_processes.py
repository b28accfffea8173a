#!/usr/bin/python
"""Ansible module: find and stop the processes another run of the project left running on this host."""

from __future__ import annotations

DOCUMENTATION = r"""
module: deploy_run_processes
short_description: Stop the processes that another run of the project left running on this host
description:
  - Every command a run starts on a host (manage.py migrate in a transient unit, pg_dump, pg_restore,
    the two-phase runner) carries the run's marker in its environment as C(PGAPPNAME), which is also the
    C(application_name) of its database sessions. A controller killed mid-run leaves those commands
    running: a migration waiting for a lock applies later, under the old code, unless it is stopped.
  - Finds every process whose environment has C(PGAPPNAME) starting with I(prefix), other than I(keep)
    (the calling run's marker), adds their descendants, sends them SIGTERM, waits up to I(timeout)
    seconds, then sends SIGKILL to what is left. Never touches its own process or its ancestors.
  - Reports the TCP connections those processes held (read before any signal): a session they opened
    on a remote PostgreSQL is found there by its client address and port, whatever C(application_name)
    the project's settings give it, and can be ended (a backend waiting for a lock does not notice
    that its client died).
  - In check mode, only reports what it would stop.
options:
  prefix:
    description: Marker prefix of the project's runs (C(djm:<project>:)).
    type: str
    required: true
  keep:
    description: Marker of the calling run, whose processes are left alone.
    type: str
    default: ""
  timeout:
    description: Seconds to wait after SIGTERM before SIGKILL.
    type: int
    default: 10
"""

RETURN = r"""
processes:
  description: The processes found (pid, marker, args), stopped unless in check mode.
  type: list
  returned: always
killed:
  description: Pids that survived SIGTERM for I(timeout) seconds and got SIGKILL.
  type: list
  returned: always
connections:
  description: Established TCP connections of those processes (pid, local_addr, local_port, remote_addr, remote_port).
  type: list
  returned: always
"""

import contextlib  # noqa: E402
import ipaddress  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

VARIABLE = b"PGAPPNAME="


def read(path, default=b""):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:  # gone, or a kernel thread
        return default


def table(proc):
    """{pid: (ppid, marker or None, args)} of every process readable now."""
    processes = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        pid = int(name)
        stat = read(os.path.join(proc, name, "stat")).decode("utf-8", "replace")
        if ")" not in stat:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        marker = None
        for entry in read(os.path.join(proc, name, "environ")).split(b"\0"):
            if entry.startswith(VARIABLE):
                marker = entry[len(VARIABLE) :].decode("utf-8", "replace")
        args = read(os.path.join(proc, name, "cmdline")).replace(b"\0", b" ").strip().decode("utf-8", "replace")
        processes[pid] = (int(fields[1]), marker, args[:300])
    return processes


def address(hex_address):
    """'0100007F:1F90' (IPv4) or 32 hex digits (IPv6), as /proc/net/tcp writes them: (text, port)."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # The kernel prints the address as 32-bit words in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    # An IPv4 peer reached over an IPv6 socket: PostgreSQL shows the IPv4 address.
    return str(getattr(ip, "ipv4_mapped", None) or ip), int(port, 16)


def connections(pids):
    """Established TCP connections held by pids, read from their fds and their network namespace."""
    found = []
    for pid in pids:
        inodes = set()
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        for table_name in ("tcp", "tcp6"):
            for line in read(f"/proc/{pid}/net/{table_name}").decode("ascii", "replace").splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "01" and fields[9] in inodes:
                    local, remote = address(fields[1]), address(fields[2])
                    found.append({"pid": pid, "local_addr": local[0], "local_port": local[1],
                                  "remote_addr": remote[0], "remote_port": remote[1]})  # fmt: skip
    return found


def orphans(processes, prefix, keep, me):
    """Pids marked by another run of the project, with their descendants, never me nor my ancestors."""
    spared = set()
    pid = me
    while pid in processes and pid not in spared:
        spared.add(pid)
        pid = processes[pid][0]
    found = {pid for pid, (_, marker, _) in processes.items() if marker and marker.startswith(prefix) and marker != keep}
    children = {}
    for pid, (ppid, _, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found - spared)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose: it holds no lock and runs no code.
    return read(f"/proc/{pid}/stat").decode("utf-8", "replace").rsplit(")", 1)[-1].split()[:1] != ["Z"]


def signal_all(pids, signum):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def main():
    module = AnsibleModule(
        argument_spec={
            "prefix": {"type": "str", "required": True},
            "keep": {"type": "str", "default": ""},
            "timeout": {"type": "int", "default": 10},
        },
        supports_check_mode=True,
    )
    prefix, keep = module.params["prefix"], module.params["keep"]
    if not prefix:
        module.fail_json(msg="prefix must not be empty: it would match every marked process")
    processes = table("/proc")
    pids = orphans(processes, prefix, keep, os.getpid())
    found = [{"pid": pid, "marker": processes[pid][1], "args": processes[pid][2]} for pid in pids]
    held = connections(pids)
    if module.check_mode or not pids:
        module.exit_json(changed=bool(pids), processes=found, killed=[], connections=held)
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + module.params["timeout"]
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    killed = [pid for pid in pids if alive(pid)]
    signal_all(killed, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(pid) for pid in killed):
        time.sleep(0.2)
    left = [pid for pid in killed if alive(pid)]
    if left:
        message = f"processes {left} of another run survived SIGKILL"
        module.fail_json(msg=message, processes=found, killed=killed, connections=held)
    module.exit_json(changed=True, processes=found, killed=killed, connections=held)


if __name__ == "__main__":
    main()
