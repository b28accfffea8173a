#!/usr/bin/env python3
"""Assemble a release of the ACME fixture app into a deterministic tarball.

A release is ``examples/acme/base`` plus the overlays of its ancestry
(``examples/acme/releases/<id>/``, each with a ``release.toml`` naming its
parent), applied oldest first: an overlay deletes the paths its ``delete`` list
names, then adds or replaces its own files.

The artifact ``<out>/acme-<id>.tar.gz`` has no top-level directory
(``manage.py`` at the root), a ``RELEASE`` file holding the id, a
``release.json`` with the metadata, and ``requirements.txt`` with exact pins.
Entries are sorted, owned by 0:0, stamped with a fixed mtime
(``SOURCE_DATE_EPOCH`` or 2020-01-01) and gzip carries no timestamp, so the
same sources always give the same sha256.

    scripts/build_release.py v2                 # build/releases/acme-v2.tar.gz
    scripts/build_release.py all                # every release
    scripts/build_release.py v1 --dir           # build/releases/acme-v1/ (a tree)
    scripts/build_release.py --list
    scripts/build_release.py v1 --venv          # ~/.cache/djm/venvs/<hash>/ with the release's pins installed

``--venv`` builds (or reuses) a virtualenv for the release's requirements under
``~/.cache/djm/venvs/<sha256 of requirements + interpreter>`` (``DJM_VENV_CACHE`` overrides the
directory; every checkout of the machine shares it, as pip shares its cache), with the oldest
interpreter on this machine that satisfies the release's ``python`` specifier
(pyenv versions and python3.X on PATH; ``--python`` overrides), and prints its
path.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "examples" / "acme"
DEFAULT_OUT = ROOT / "build" / "releases"
# Shared by every checkout of this machine, like pip's cache: the key holds all a venv depends on
# (DJM_VENV_CACHE overrides the directory).
VENV_ROOT = Path(
    os.environ.get("DJM_VENV_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "djm" / "venvs"
)
DEFAULT_EPOCH = 1577836800  # 2020-01-01T00:00:00Z
EXCLUDED_DIRS = {"__pycache__", ".pytest_cache", "staticfiles", "media", ".mypy_cache"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".swp", "~")
EXCLUDED_NAMES = {".DS_Store", "release.toml"}
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9_,-]+\])?==[A-Za-z0-9.+!-]+(\s*;.*)?$")


class ReleaseError(Exception):
    """A release definition or its tree is wrong; the message says what to fix."""


@dataclass
class Release:
    id: str
    parent: str
    python: str
    django: str
    description: str
    delete: list[str] = field(default_factory=list)

    @property
    def overlay(self) -> Path:
        return APP_DIR / "releases" / self.id


def load_release(release_id: str, app_dir: Path | None = None) -> Release:
    app_dir = app_dir or APP_DIR
    path = app_dir / "releases" / release_id / "release.toml"
    if not path.is_file():
        known = ", ".join(r.id for r in all_releases(app_dir)) or "none"
        raise ReleaseError(f"unknown release {release_id!r} (no {path}); known: {known}")
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    if data.get("id") != release_id:
        raise ReleaseError(f"{path}: id = {data.get('id')!r} but the directory is {release_id!r}")
    delete = data.get("delete", [])
    if not isinstance(delete, list) or not all(isinstance(p, str) for p in delete):
        raise ReleaseError(f"{path}: delete must be a list of relative paths")
    return Release(
        id=release_id,
        parent=str(data.get("parent", "")),
        python=str(data.get("python", "")),
        django=str(data.get("django", "")),
        description=str(data.get("description", "")),
        delete=list(delete),
    )


def all_releases(app_dir: Path | None = None) -> list[Release]:
    releases_dir = (app_dir or APP_DIR) / "releases"
    if not releases_dir.is_dir():
        return []
    ids = sorted(p.name for p in releases_dir.iterdir() if (p / "release.toml").is_file())
    return [load_release(i, app_dir) for i in ids]


def ancestry(release_id: str) -> list[Release]:
    """The chain from the oldest ancestor to ``release_id``."""
    chain: list[Release] = []
    seen: set[str] = set()
    current = release_id
    while current:
        if current in seen:
            raise ReleaseError(f"release parents form a cycle: {' -> '.join([*seen, current])}")
        seen.add(current)
        release = load_release(current)
        chain.append(release)
        current = release.parent
    return list(reversed(chain))


def _walk(top: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in filenames:
            if name in EXCLUDED_NAMES or name.endswith(EXCLUDED_SUFFIXES):
                continue
            full = Path(dirpath) / name
            files[full.relative_to(top).as_posix()] = full
    return files


@dataclass
class Tree:
    release: Release
    chain: list[Release]
    files: dict[str, bytes]
    executable: set[str]


def assemble(release_id: str) -> Tree:
    chain = ancestry(release_id)
    sources: dict[str, Path] = _walk(APP_DIR / "base")
    if not sources:
        raise ReleaseError(f"{APP_DIR / 'base'} is empty")
    for release in chain:
        for rel in release.delete:
            doomed = [p for p in sources if p == rel or p.startswith(rel.rstrip("/") + "/")]
            if not doomed:
                raise ReleaseError(f"release {release.id}: delete names {rel!r}, which is not in the parent tree")
            for p in doomed:
                del sources[p]
        sources.update(_walk(release.overlay))
    release = chain[-1]
    files = {rel: src.read_bytes() for rel, src in sources.items()}
    executable = {rel for rel, src in sources.items() if os.access(src, os.X_OK)}
    if "manage.py" not in files:
        raise ReleaseError(f"release {release_id}: no manage.py at the tree root")
    _check_requirements(release_id, files.get("requirements.txt"))
    files["RELEASE"] = (release.id + "\n").encode()
    meta = {
        "id": release.id,
        "chain": [r.id for r in chain],
        "python": release.python,
        "django": release.django,
        "description": release.description,
        "settings_module": "acme.settings",
        "wsgi_application": "acme.wsgi:application",
    }
    files["release.json"] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    return Tree(release=release, chain=chain, files=files, executable=executable)


def _check_requirements(release_id: str, content: bytes | None) -> None:
    if content is None:
        raise ReleaseError(f"release {release_id}: no requirements.txt in the tree")
    for number, line in enumerate(content.decode().splitlines(), 1):
        text = line.split(" #", 1)[0].strip()
        if not text or text.startswith("#"):
            continue
        if not PIN.match(text):
            raise ReleaseError(f"release {release_id}: requirements.txt line {number} is not an exact pin: {line!r}")


def _epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(raw) if raw.isdigit() else DEFAULT_EPOCH


def _dirs_of(paths: list[str]) -> list[str]:
    dirs: set[str] = set()
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs)


def write_tarball(tree: Tree, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"acme-{tree.release.id}.tar.gz"
    mtime = _epoch()
    entries = sorted([(d, None) for d in _dirs_of(list(tree.files))] + [(p, tree.files[p]) for p in tree.files])
    fd, tmp_name = tempfile.mkstemp(prefix=target.name, dir=out_dir)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
        ):
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.mtime = mtime
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if data is None:
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    info.mode = 0o755 if name in tree.executable else 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def write_directory(tree: Tree, out_dir: Path) -> Path:
    target = out_dir / f"acme-{tree.release.id}"
    if target.exists():
        shutil.rmtree(target)
    for rel, data in sorted(tree.files.items()):
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if rel in tree.executable else 0o644)
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- virtualenvs ---------------------------------------------------------------------------------------------

SPEC = re.compile(r"^\s*(>=|<=|==|>|<|!=)\s*(\d+(?:\.\d+){0,2})\s*$")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def satisfies(version: tuple[int, ...], spec: str) -> bool:
    """True when ``version`` matches a comma-separated specifier such as '>=3.8,<3.12'."""
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        match = SPEC.match(clause)
        if not match:
            raise ReleaseError(f"unsupported python specifier clause {clause!r} (use >=, <=, ==, >, <, != with X.Y[.Z])")
        op, wanted = match.group(1), _version_tuple(match.group(2))
        have = version[: len(wanted)]
        ok = {
            ">=": have >= wanted,
            "<=": have <= wanted,
            "==": have == wanted,
            ">": have > wanted,
            "<": have < wanted,
            "!=": have != wanted,
        }[op]
        if not ok:
            return False
    return True


def interpreter_version(python: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('.'.join(map(str, sys.version_info[:3])))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    major, minor, micro = _version_tuple(out)[:3]
    return major, minor, micro


def python_candidates() -> list[str]:
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    found = sorted(glob.glob(os.path.join(pyenv_root, "versions", "*", "bin", "python3")))
    for minor in range(6, 20):
        path = shutil.which(f"python3.{minor}")
        if path and ".pyenv/shims" not in path:
            found.append(path)
    found.append(sys.executable)
    return list(dict.fromkeys(os.path.realpath(p) if os.path.islink(p) else p for p in found))


def pick_interpreter(spec: str) -> tuple[str, tuple[int, int, int]]:
    """The oldest available interpreter satisfying ``spec`` (the closest match to a legacy host)."""
    usable = []
    for candidate in python_candidates():
        version = interpreter_version(candidate)
        if version and version[0] == 3 and satisfies(version, spec):
            usable.append((version, candidate))
    if not usable:
        raise ReleaseError(f"no Python interpreter on this machine satisfies {spec!r}; pass --python")
    version, path = min(usable)
    return path, version


def ensure_venv(tree: Tree, python: str | None = None) -> Path:
    """Create (once) and return a virtualenv with the release's exact pins installed."""
    if python:
        found = interpreter_version(python)
        if found is None:
            raise ReleaseError(f"cannot run {python}")
        version = found
    else:
        python, version = pick_interpreter(tree.release.python)
    requirements = tree.files["requirements.txt"]
    key = hashlib.sha256(requirements + ".".join(map(str, version)).encode()).hexdigest()[:16]
    target = VENV_ROOT / f"py{version[0]}{version[1]}-{key}"
    marker = target / ".complete"
    VENV_ROOT.mkdir(parents=True, exist_ok=True)
    with open(VENV_ROOT / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test workers wait for one build
        if marker.is_file():
            return target
        shutil.rmtree(target, ignore_errors=True)  # a half-built one from an interrupted run
        try:
            subprocess.run([python, "-m", "venv", str(target)], check=True)
            (target / "requirements.txt").write_bytes(requirements)
            pip = [str(target / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
            subprocess.run([*pip, "install", "-r", str(target / "requirements.txt")], check=True)
            marker.write_text(f"{python}\n")
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release", nargs="?", help="release id (see --list), or 'all'")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: build/releases)")
    parser.add_argument("--dir", action="store_true", help="assemble into <out>/acme-<id>/ instead of a tarball")
    parser.add_argument("--list", action="store_true", help="list the releases and exit")
    parser.add_argument(
        "--venv", action="store_true", help="build or reuse ~/.cache/djm/venvs/<hash> for the release, print its path"
    )
    parser.add_argument("--python", help="interpreter for --venv (default: the oldest one satisfying the release)")
    args = parser.parse_args(argv)
    if not args.list and not args.release:
        parser.error("give a release id, 'all', or --list")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.list:
            for r in all_releases():
                chain = " -> ".join(x.id for x in ancestry(r.id))
                print(f"{r.id:<20} python{r.python:<8} django {r.django:<8} {chain}: {r.description}")
            return 0
        ids = [r.id for r in all_releases()] if args.release == "all" else [args.release]
        for release_id in ids:
            tree = assemble(release_id)
            if args.venv:
                print(ensure_venv(tree, args.python))
                continue
            if args.dir:
                print(write_directory(tree, args.out))
                continue
            artifact = write_tarball(tree, args.out)
            digest = sha256_of(artifact)
            artifact.with_name(artifact.name + ".sha256").write_text(f"{digest}  {artifact.name}\n")
            print(f"{digest}  {artifact}")
    except ReleaseError as exc:
        print(f"build_release: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"build_release: {' '.join(map(str, exc.cmd))} failed with exit code {exc.returncode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
