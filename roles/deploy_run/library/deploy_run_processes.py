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
  - With I(peer_port), also reports, after the processes are gone, this host's addresses and the TCP
    sockets to that port whose client side is still open (read from the network namespace, which
    needs no access to other users' file descriptors). On the database host, a session from one of
    these addresses whose client port is not among them has a dead client: a backend waiting for a
    lock does not notice that its client died, and it keeps the lock queue blocked. The project's
    own settings may give its sessions any C(application_name), so the marker alone cannot find them.
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
  peer_port:
    description: Report the sockets of this host to this remote port (the database's); 0 for none.
    type: int
    default: 0
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
addresses:
  description: This host's IP addresses (with I(peer_port)).
  type: list
  returned: always
sockets:
  description: The sockets to I(peer_port) whose client side is open, as [address, port] (with I(peer_port)).
  type: list
  returned: always
read_at:
  description: When the sockets were read (seconds since the epoch); a session younger than that is left alone.
  type: float
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


# The client side is still open: established, connecting, or the server closed first. A client that
# closed or died leaves FIN_WAIT1/2, CLOSING, TIME_WAIT or nothing.
OPEN_STATES = {"01", "02", "08", "09"}  # ESTABLISHED, SYN_SENT, CLOSE_WAIT, LAST_ACK


def sockets(peer_port):
    """[address, port] of this network namespace's TCP sockets to peer_port whose client side is open."""
    found = []
    for table_name in ("tcp", "tcp6"):
        for line in read(f"/proc/net/{table_name}").decode("ascii", "replace").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] in OPEN_STATES:
                local, remote = address(fields[1]), address(fields[2])
                if remote[1] == peer_port:
                    found.append(list(local))
    return found


def addresses():
    """This host's IPv4 (/proc/net/fib_trie: the LOCAL /32 entries) and IPv6 (/proc/net/if_inet6) addresses."""
    found = set()
    previous = ""
    for line in read("/proc/net/fib_trie").decode("ascii", "replace").splitlines():
        text = line.strip()
        if text.startswith("/32 host LOCAL") and previous:
            found.add(previous)
        previous = text[4:] if text.startswith("|-- ") else ""
    for line in read("/proc/net/if_inet6").decode("ascii", "replace").splitlines():
        fields = line.split()
        if fields:
            found.add(str(ipaddress.ip_address(bytes.fromhex(fields[0]))))
    return sorted(found)


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
            "peer_port": {"type": "int", "default": 0},
        },
        supports_check_mode=True,
    )
    prefix, keep = module.params["prefix"], module.params["keep"]
    if not prefix:
        module.fail_json(msg="prefix must not be empty: it would match every marked process")
    processes = table("/proc")
    pids = orphans(processes, prefix, keep, os.getpid())
    found = [{"pid": pid, "marker": processes[pid][1], "args": processes[pid][2]} for pid in pids]

    def done(**result):
        peer_port = module.params["peer_port"]
        read_at = time.time()
        network = {"addresses": addresses(), "sockets": sockets(peer_port)} if peer_port else {"addresses": [], "sockets": []}
        module.exit_json(processes=found, read_at=read_at, **network, **result)

    if module.check_mode or not pids:
        done(changed=bool(pids), killed=[])
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
        module.fail_json(msg=f"processes {left} of another run survived SIGKILL", processes=found, killed=killed)
    done(changed=True, killed=killed)


if __name__ == "__main__":
    main()
