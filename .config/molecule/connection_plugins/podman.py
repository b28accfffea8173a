"""Molecule's `podman` connection with pipelining: one `podman exec` per module instead of five.

The Molecule podman driver writes `ansible_connection: podman` for every instance. The shared
Molecule settings (.config/molecule/config.yml) put this directory first on
ANSIBLE_CONNECTION_PLUGINS, so that short name finds this plugin, a subclass of
containers.podman.podman that differs in two ways only:

* pipelining: the module goes to the container's python on `podman exec -i`'s standard input (what
  the SSH fleet does with `pipelining = True` in ansible.cfg). containers.podman turned pipelining off
  because its `podman exec` lacked `-i`; with `-i` it works.
* the container's file system is mounted the first time a file is copied or fetched, not for every task.
* as root on the controller (make test), a command enters the container's namespaces with nsenter,
  in its root and with its environment, instead of `podman exec`: that costs 200 ms of CPU each
  (podman, conmon, runc; measured here: 20 `podman exec true` 203 ms of CPU each, 20 `nsenter ...
  true` under 10 ms), about a third of a Molecule task's CPU. Files go in and out the same way, as
  `cat`'s standard input or output inside. The container's PID, ID and environment come from one
  `podman inspect`, kept in a file per container and checked against /proc (a container made again
  under the same name has another ID). DJM_MOLECULE_NSENTER=0, a remote user, or no nsenter: `podman exec`.

Without it a task costs a mount, a temporary directory, a copy, a chmod, the run and a cleanup
(five podman processes, 3-5 s each on a loaded 2-core machine); with it, one `podman exec`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from typing import Any

from ansible.errors import AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_native
from ansible.plugins.connection import ConnectionBase
from ansible_collections.containers.podman.plugins.connection.podman import Connection as PodmanConnection

DOCUMENTATION = """
    name: podman
    short_description: containers.podman.podman with pipelining, for the Molecule scenarios
    description:
        - Run commands or put/fetch files in an existing podman container, the module sent on the
          standard input of C(podman exec -i) (pipelining); the container is mounted only to copy files.
    options:
      remote_addr:
        description:
          - The ID of the container you want to access.
        default: inventory_hostname
        vars:
          - name: ansible_host
          - name: inventory_hostname
          - name: ansible_podman_host
      remote_user:
        description:
          - User specified via name or UID which is used to execute commands inside the container.
        ini:
          - section: defaults
            key: remote_user
        env:
          - name: ANSIBLE_REMOTE_USER
        vars:
          - name: ansible_user
      podman_extra_args:
        description:
          - Extra arguments to pass to the podman command line.
        default: ''
        ini:
          - section: defaults
            key: podman_extra_args
        vars:
          - name: ansible_podman_extra_args
        env:
          - name: ANSIBLE_PODMAN_EXTRA_ARGS
      podman_executable:
        description:
          - Executable for podman command.
        default: podman
        vars:
          - name: ansible_podman_executable
        env:
          - name: ANSIBLE_PODMAN_EXECUTABLE
      pipelining:
        description:
          - Send modules on the standard input of C(podman exec -i) instead of copying them first.
        type: boolean
        default: true
        env:
          - name: ANSIBLE_PODMAN_PIPELINING
        vars:
          - name: ansible_pipelining
"""


def container_target(name: str, podman: str = "podman") -> tuple[int, list[str]] | None:
    """(PID of the container's init, its environment) to enter with nsenter, or None: use `podman exec`
    (DJM_MOLECULE_NSENTER=0, not root, no nsenter, or no such running container). One `podman inspect`
    per container, kept in a file and checked against /proc: a container made again under the same
    name has another ID. Also used by testinfra's podman backend (conftest.py at the repository root)."""
    if os.environ.get("DJM_MOLECULE_NSENTER", "1") == "0" or os.geteuid() != 0 or shutil.which("nsenter") is None:
        return None
    cache = os.path.join(tempfile.gettempdir(), f"djm-nsenter-{os.geteuid()}", f"{name}.json")
    try:
        with open(cache, encoding="utf-8") as f:
            known = json.load(f)
        with open(f"/proc/{known['pid']}/cgroup", encoding="utf-8") as f:
            if f"libpod-{known['id']}" in f.read():
                return int(known["pid"]), list(known["env"])
    except (OSError, ValueError, KeyError):
        pass
    proc = subprocess.run([podman, "inspect", "--type", "container", name], capture_output=True, check=False)
    try:
        state = json.loads(proc.stdout)[0]
        known = {"pid": int(state["State"]["Pid"]), "id": state["Id"], "env": list(state["Config"]["Env"] or [])}
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if proc.returncode != 0 or known["pid"] <= 0:
        return None
    os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
    with open(f"{cache}.{os.getpid()}", "w", encoding="utf-8") as f:
        json.dump(known, f)
    os.replace(f"{cache}.{os.getpid()}", cache)
    return known["pid"], known["env"]


def nsenter_argv(target: tuple[int, list[str]], argv: list[str]) -> list[str]:
    """argv run inside the container: its namespaces, root, working directory and environment only."""
    pid, env = target
    return ["nsenter", "-t", str(pid), "-a", "-r", "-w", "/usr/bin/env", "-i", *env, *argv]


class Connection(PodmanConnection):
    """containers.podman.podman with pipelining and a lazy mount."""

    transport = "podman"
    has_pipelining = True

    def _connect(self) -> Connection:
        ConnectionBase._connect(self)
        self._connected = True
        return self

    def _mount_once(self) -> None:
        if not getattr(self, "_mount_tried", False):
            self._mount_tried = True
            PodmanConnection._connect(self)

    def _target(self) -> tuple[int, list[str]] | None:
        """(PID of the container's init, its environment) to enter with nsenter, or None for `podman exec`."""
        return None if self.user else container_target(self._container_id, self.get_option("podman_executable"))

    def _nsenter(
        self, target: tuple[int, list[str]], argv: list[str], stdin: Any = b"", stdout: Any = subprocess.PIPE
    ) -> tuple[int, bytes, bytes]:
        """Run argv inside the container. stdin: bytes, or a file to read; stdout: a file to write, else captured."""
        local = [to_bytes(a) for a in nsenter_argv(target, argv)]
        if stdin is None or isinstance(stdin, bytes):
            proc = subprocess.run(local, input=stdin or b"", stdout=stdout, stderr=subprocess.PIPE, check=False)
        else:
            proc = subprocess.run(local, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, check=False)
        return proc.returncode, proc.stdout or b"", proc.stderr

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = False) -> tuple[int, bytes, bytes]:
        if not self._connected:
            self._connect()
        ConnectionBase.exec_command(self, cmd, in_data=in_data, sudoable=sudoable)
        argv = shlex.split(to_native(cmd, errors="surrogate_or_strict"))
        target = self._target()
        if target is not None:
            return self._nsenter(target, argv, in_data)
        args = ["exec"]
        if in_data is not None:
            args.append("-i")
        if self.user:
            args.extend(("--user", self.user))
        return self._podman(args, argv, in_data)

    def put_file(self, in_path: str, out_path: str) -> None:
        target = self._target()
        if target is None:
            self._mount_once()
            super().put_file(in_path, out_path)
            return
        ConnectionBase.put_file(self, in_path, out_path)
        with open(in_path, "rb") as source:
            rc, _, err = self._nsenter(target, ["/bin/sh", "-c", 'cat > "$0"', out_path], source)
        if rc != 0:
            raise AnsibleError(f"failed to copy {in_path} to {out_path} in container {self._container_id}: {to_native(err)}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        target = self._target()
        if target is None:
            self._mount_once()
            super().fetch_file(in_path, out_path)
            return
        ConnectionBase.fetch_file(self, in_path, out_path)
        with open(out_path, "wb") as dest:
            rc, _, err = self._nsenter(target, ["/bin/cat", "--", in_path], stdout=dest)
        if rc != 0:
            raise AnsibleError(f"failed to fetch {in_path} from container {self._container_id}: {to_native(err)}")
