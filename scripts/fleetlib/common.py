"""Shared helpers: exit codes, one-line failures, subprocess wrappers, prerequisite checks."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO_ROOT / ".config" / "containers" / "containers.conf"

# Exit codes (documented in `fleet.py --help`).
EXIT_OK = 0
EXIT_FAILED = 1  # a step failed (podman, debootstrap, ssh...): the message says which
EXIT_USAGE = 2  # bad arguments (argparse uses 2 too)
EXIT_MISSING_TOOL = 3  # podman, runc, debootstrap, ssh tools or the containers.conf are missing
EXIT_DISK = 4  # not enough free disk
EXIT_PORT = 5  # the requested --http-port is taken
EXIT_NOT_ROOT = 6  # must run as root (rootful podman, debootstrap, chroot)

MIN_FREE_BYTES = 6 * 1024**3


class FleetError(Exception):
    """A failure reported to the user as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def setup_environment() -> None:
    """Point every podman call at the repository's containers.conf (runc + ulimits)."""
    os.environ.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))


def log(message: str) -> None:
    print(message, flush=True)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input_bytes: bytes | None = None,
    capture: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (no shell); on failure raise FleetError with its stderr's last line."""
    proc = subprocess.run(
        list(argv),
        input=input_bytes.decode() if input_bytes is not None else None,
        capture_output=capture,
        text=True,
        check=False,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout or "").strip().splitlines()
        detail = err[-1] if err else f"exit code {proc.returncode}"
        raise FleetError(f"{argv[0]} {' '.join(argv[1:3])} failed: {detail}")
    return proc


def podman(*args: str, check: bool = True, timeout: float | None = 300) -> str:
    return run(["podman", *args], check=check, timeout=timeout).stdout


def require_root() -> None:
    if os.geteuid() != 0:
        raise FleetError("must run as root (rootful podman, debootstrap, chroot): use sudo", EXIT_NOT_ROOT)


def require_tools(tools: Sequence[str]) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise FleetError(f"missing {', '.join(missing)}: run make setup", EXIT_MISSING_TOOL)
    conf = Path(os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF)))
    if not conf.is_file():
        raise FleetError(f"CONTAINERS_CONF file {conf} does not exist: run make setup", EXIT_MISSING_TOOL)


def podman_graphroot() -> Path:
    out = podman("info", "--format", "{{.Store.GraphRoot}}").strip()
    return Path(out or "/var/lib/containers/storage")


def require_free_disk(paths: Sequence[Path], minimum: int = MIN_FREE_BYTES) -> None:
    for path in paths:
        probe = path
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < minimum:
            raise FleetError(
                f"only {free / 1024**3:.1f} GB free under {path} (need {minimum / 1024**3:.0f} GB): free some disk",
                EXIT_DISK,
            )


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Timer:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def die(error: FleetError) -> int:
    print(f"fleet: {error}", file=sys.stderr, flush=True)
    return error.code
