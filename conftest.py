"""pytest at the repository root: testinfra's podman backend enters the container with nsenter.

Every Molecule scenario's testinfra tests (and the root scenario's) reach the containers through
testinfra's podman backend, one `podman exec` per command: about 200 ms of CPU each (podman, conmon,
runc). As root, with nsenter, a command costs a few ms, and enters the same namespaces, root
directory and environment: the same helper as the Molecule connection plugin
(.config/molecule/connection_plugins/podman.py). DJM_MOLECULE_NSENTER=0 keeps `podman exec`.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import Any

_PLUGIN = Path(__file__).parent / ".config" / "molecule" / "connection_plugins" / "podman.py"


def _patch_testinfra_podman() -> None:
    try:
        from testinfra.backend import base, podman
    except ImportError:  # testinfra is not installed: nothing to patch
        return
    spec = importlib.util.spec_from_file_location("djm_molecule_podman_connection", _PLUGIN)
    if spec is None or spec.loader is None:
        return
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    exec_run = podman.PodmanBackend.run

    def run(self: Any, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        target = None if self.user is not None else plugin.container_target(self.name)
        if target is None:
            return exec_run(self, command, *args, **kwargs)
        cmd = self.get_command(command, *args)
        out = self.run_local(shlex.join(plugin.nsenter_argv(target, ["/bin/sh", "-c", cmd])))
        out.command = self.encode(cmd)
        return out

    podman.PodmanBackend.run = run


_patch_testinfra_podman()
