"""Molecule's `podman` connection with pipelining: one `podman exec` per module instead of five.

The Molecule podman driver writes `ansible_connection: podman` for every instance. The shared
Molecule settings (.config/molecule/config.yml) put this directory first on
ANSIBLE_CONNECTION_PLUGINS, so that short name finds this plugin, a subclass of
containers.podman.podman that differs in two ways only:

* pipelining: the module goes to the container's python on `podman exec -i`'s standard input (what
  the SSH fleet does with `pipelining = True` in ansible.cfg). containers.podman turned pipelining off
  because its `podman exec` lacked `-i`; with `-i` it works.
* the container's file system is mounted the first time a file is copied or fetched, not for every task.

Without it a task costs a mount, a temporary directory, a copy, a chmod, the run and a cleanup
(five podman processes, 3-5 s each on a loaded 2-core machine); with it, one `podman exec`.
"""

from __future__ import annotations

import shlex

from ansible.module_utils.common.text.converters import to_native
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

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = False) -> tuple[int, bytes, bytes]:
        if not self._connected:
            self._connect()
        ConnectionBase.exec_command(self, cmd, in_data=in_data, sudoable=sudoable)
        args = ["exec"]
        if in_data is not None:
            args.append("-i")
        if self.user:
            args.extend(("--user", self.user))
        return self._podman(args, shlex.split(to_native(cmd, errors="surrogate_or_strict")), in_data)

    def put_file(self, in_path: str, out_path: str) -> None:
        self._mount_once()
        super().put_file(in_path, out_path)

    def fetch_file(self, in_path: str, out_path: str) -> None:
        self._mount_once()
        super().fetch_file(in_path, out_path)
