"""scripts/build_release.py: overlay assembly, deterministic artifacts, release metadata."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import build_release as br  # noqa: E402

SCRIPT = REPO / "scripts" / "build_release.py"
RELEASES = ("v1", "v2", "v2-bad-health", "v2-bad-migration")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False)


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def read(path: Path, name: str) -> str:
    with tarfile.open(path) as tar:
        fh = tar.extractfile(name)
        assert fh is not None
        return fh.read().decode()


def test_list_names_every_release_with_its_chain() -> None:
    result = run("--list")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == set(RELEASES)
    assert "v1 -> v2 -> v2-bad-migration" in lines["v2-bad-migration"]
    assert "python>=3.11" in lines["v2"] and "python>=3.8" in lines["v1"]


@pytest.mark.parametrize("release", RELEASES)
def test_artifact_is_deterministic_and_flat(release: str, tmp_path: Path) -> None:
    first, second = run(release, "--out", str(tmp_path / "a")), run(release, "--out", str(tmp_path / "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    digest_a, path_a = first.stdout.split()
    digest_b, _ = second.stdout.split()
    assert Path(path_a).name == f"acme-{release}.tar.gz"
    assert digest_a == digest_b == hashlib.sha256(Path(path_a).read_bytes()).hexdigest()
    assert (Path(path_a).parent / f"acme-{release}.tar.gz.sha256").read_text() == f"{digest_a}  acme-{release}.tar.gz\n"
    entries = members(Path(path_a))
    names = list(entries)
    assert names == sorted(names), "entries must be sorted"
    assert "manage.py" in entries and entries["manage.py"].mode == 0o755
    assert not any(n.startswith(("./", "/")) or "__pycache__" in n or n.endswith(".pyc") for n in names)
    assert {m.mtime for m in entries.values()} == {br.DEFAULT_EPOCH}
    assert {(m.uid, m.gid) for m in entries.values()} == {(0, 0)}
    assert read(Path(path_a), "RELEASE") == release + "\n"
    meta = json.loads(read(Path(path_a), "release.json"))
    assert meta["id"] == release and meta["wsgi_application"] == "acme.wsgi:application"
    for line in read(Path(path_a), "requirements.txt").splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.match(r"^[A-Za-z0-9_.-]+==[0-9][^ ;]*( ;.*)?$", line), line


def test_source_date_epoch_changes_the_digest(tmp_path: Path) -> None:
    plain = run("v1", "--out", str(tmp_path / "a")).stdout.split()[0]
    env_run = subprocess.run(
        [sys.executable, str(SCRIPT), "v1", "--out", str(tmp_path / "b")],
        capture_output=True, text=True, check=True, env={"SOURCE_DATE_EPOCH": "1700000000", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert env_run.stdout.split()[0] != plain


def test_overlays_replace_add_and_delete() -> None:
    v1, v2 = br.assemble("v1"), br.assemble("v2")
    bad_health, bad_migration = br.assemble("v2-bad-health"), br.assemble("v2-bad-migration")
    assert b"Django==3.2.25" in v1.files["requirements.txt"]
    assert b"Django==4.2.30" in v2.files["requirements.txt"]
    assert b"MIN_PYTHON = (3, 8)" in v1.files["acme/runtime.py"]
    assert b"MIN_PYTHON = (3, 11)" in v2.files["acme/runtime.py"]
    assert "catalog/migrations/0003_normalize_categories.py" in v2.files
    assert "catalog/migrations/0003_normalize_categories.py" not in v1.files
    # Files v2 does not touch come from the base unchanged.
    assert v2.files["acme/health.py"] == v1.files["acme/health.py"] == (br.APP_DIR / "base/acme/health.py").read_bytes()
    assert "acme/templates/acme/base.html" in v2.files
    assert "acme/templates/acme/base.html" not in bad_health.files
    assert "payments/migrations/0002_reconcile_providers.py" in bad_migration.files
    assert "payments/migrations/0002_reconcile_providers.py" not in v2.files
    assert [r.id for r in bad_migration.chain] == ["v1", "v2", "v2-bad-migration"]


def test_dir_mode_writes_the_same_tree(tmp_path: Path) -> None:
    result = run("v2", "--dir", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    root = Path(result.stdout.strip())
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert on_disk == set(br.assemble("v2").files)
    assert (root / "RELEASE").read_text() == "v2\n"


def test_unknown_release_fails_with_a_message() -> None:
    result = run("v9")
    assert result.returncode == 2
    assert "unknown release 'v9'" in result.stderr and "known: v1, v2" in result.stderr


def _fake_app(tmp_path: Path, delete: str, requirements: str = "Django==4.2.30\n") -> Path:
    app = tmp_path / "acme"
    (app / "base").mkdir(parents=True)
    (app / "base" / "manage.py").write_text("print('hi')\n")
    (app / "base" / "requirements.txt").write_text(requirements)
    (app / "releases" / "r1").mkdir(parents=True)
    (app / "releases" / "r1" / "release.toml").write_text(f'id = "r1"\nparent = ""\npython = ">=3.8"\ndelete = ["{delete}"]\n')
    return app


def test_delete_of_a_missing_path_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(br, "APP_DIR", _fake_app(tmp_path, "nope.py"))
    with pytest.raises(br.ReleaseError, match=r"delete names 'nope\.py'"):
        br.assemble("r1")


def test_unpinned_requirement_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(br, "APP_DIR", _fake_app(tmp_path, "manage.py", requirements="Django>=4.2\n"))
    (br.APP_DIR / "releases" / "r1" / "release.toml").write_text('id = "r1"\nparent = ""\n')
    with pytest.raises(br.ReleaseError, match="not an exact pin"):
        br.assemble("r1")


@pytest.mark.parametrize(
    ("version", "spec", "expected"),
    [
        ((3, 8, 18), ">=3.8", True),
        ((3, 9, 0), ">=3.11", False),
        ((3, 11, 7), ">=3.11,<3.12", True),
        ((3, 12, 1), ">=3.11,<3.12", False),
    ],
)
def test_python_specifier(version: tuple[int, int, int], spec: str, expected: bool) -> None:
    assert br.satisfies(version, spec) is expected


def test_interpreter_choice_is_the_oldest_that_fits() -> None:
    path, version = br.pick_interpreter(">=3.11")
    assert version >= (3, 11, 0)
    assert br.interpreter_version(path) == version
    with pytest.raises(br.ReleaseError, match="no Python interpreter"):
        br.pick_interpreter(">=9.0")
