#!/usr/bin/env python3
"""Prove that this controller can run the local fleet, the way the fleet will use it.

`make setup` installs packages; this program checks at run time that what they provide works:

1. every binary the fleet and the tests call is on PATH (the PATH podman and its network
   helpers see), or in podman's helper directory;
2. podman really runs a container on a throwaway network with DNS (netavark + aardvark-dns +
   iptables/nft), from a tiny image made of the controller's own /bin/true.

Each failure is one line naming the missing piece and how to get it, exit status 1.

    python scripts/probe_runtime.py [--skip-binaries] [--skip-container]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

PROBE_IMAGE = "localhost/djm-probe:latest"
HELPER_DIRS = ("/usr/lib/podman", "/usr/libexec/podman", "/usr/local/lib/podman", "/usr/local/libexec/podman")


@dataclass(frozen=True)
class Need:
    names: tuple[str, ...]
    package: str
    why: str
    helper: bool = False  # looked up in podman's helper directories too, not only on PATH


NEEDS: tuple[Need, ...] = (
    Need(("podman",), "podman", "runs the fleet's containers"),
    Need(("runc",), "runc", "the OCI runtime the project's containers.conf selects"),
    Need(("netavark",), "netavark", "podman's network backend", helper=True),
    Need(("aardvark-dns",), "aardvark-dns", "name resolution between fleet hosts", helper=True),
    Need(("iptables",), "iptables", "netavark sets up the fleet network's NAT with it"),
    Need(("debootstrap",), "debootstrap", "builds the Debian 11/12 host images"),
    Need(("ssh", "ssh-keygen"), "openssh-client", "Ansible reaches the fleet hosts over SSH"),
    Need(("rsync",), "rsync", "copies artefacts to the hosts"),
    Need(("git",), "git", "release sources and the build"),
)


class ProbeError(Exception):
    """One line: what is missing and what to do."""


def _find(name: str, path: str, helper: bool) -> str | None:
    found = shutil.which(name, path=path)
    if found or not helper:
        return found
    for directory in HELPER_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def check_binaries(path: str) -> None:
    for need in NEEDS:
        missing = [name for name in need.names if _find(name, path, need.helper) is None]
        if missing:
            raise ProbeError(f"{missing[0]} not found ({need.why}): apt-get install {need.package}, or run make setup")


def _run(argv: list[str], env: dict[str, str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=120, check=False)


def _last_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = [line for line in result.stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {result.returncode}"


def _probe_rootfs(target: Path) -> None:
    """A root filesystem holding the controller's /bin/true and the libraries it loads."""
    true = Path(shutil.which("true") or "/bin/true").resolve()
    files = [true]
    ldd = subprocess.run(["ldd", str(true)], capture_output=True, text=True, check=False)
    for word in ldd.stdout.split():
        if word.startswith("/"):
            files.append(Path(word))
    for source in files:
        dest = target / "bin" / "true" if source == true else target / source.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)


def ensure_probe_image(env: dict[str, str]) -> None:
    if _run(["podman", "image", "exists", PROBE_IMAGE], env).returncode == 0:
        return
    with tempfile.TemporaryDirectory(prefix="djm-probe-") as tmp:
        _probe_rootfs(Path(tmp))
        tar = subprocess.run(["tar", "-C", tmp, "-c", "."], capture_output=True, check=True).stdout
    result = _run(["podman", "import", "-", PROBE_IMAGE], env, stdin=tar)
    if result.returncode != 0:
        raise ProbeError(f"podman cannot import an image: {_last_line(result)}")


def probe_container(env: dict[str, str]) -> None:
    ensure_probe_image(env)
    network = f"djm-probe-{uuid.uuid4().hex[:8]}"
    created = _run(["podman", "network", "create", network], env)
    if created.returncode != 0:
        raise ProbeError(f"podman cannot create a network: {_last_line(created)}")
    try:
        ran = _run(["podman", "run", "--rm", "--network", network, PROBE_IMAGE, "/bin/true"], env)
        if ran.returncode != 0:
            cause = _last_line(ran)
            hint = ""
            if "netavark" in cause and not shutil.which("iptables", path=env.get("PATH")):
                hint = " (iptables not found on PATH: apt-get install iptables)"
            raise ProbeError(f"podman cannot run a container on a network: {cause}{hint}")
    finally:
        _run(["podman", "network", "rm", "--force", network], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-binaries", action="store_true", help="do not look the binaries up first")
    parser.add_argument("--skip-container", action="store_true", help="do not run the throwaway container")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    # podman reads the project's containers.conf (runc, ulimits), as the Makefile exports it.
    env.setdefault("CONTAINERS_CONF", str(Path(__file__).resolve().parent.parent / ".config/containers/containers.conf"))
    try:
        if not args.skip_binaries:
            check_binaries(env.get("PATH", os.defpath))
        if not args.skip_container:
            probe_container(env)
    except ProbeError as error:
        print(f"setup: {error}", file=sys.stderr)
        return 1
    print("ok: podman runs a container on a throwaway network (netavark, aardvark-dns, iptables, runc)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
