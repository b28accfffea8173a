"""roles/python_runtime/files/verify_python.py, run the way the role runs it: `python -c <script> ...`."""

from __future__ import annotations

import json
import platform
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "roles" / "python_runtime" / "files" / "verify_python.py"
HERE = platform.python_version()


def run(*args: str) -> tuple[int, dict]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.read_text(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, json.loads(result.stdout)


def test_passes_for_this_interpreter_and_its_stdlib() -> None:
    rc, report = run("--version", HERE, "ssl", "sqlite3", "zlib", "json")
    assert rc == 0, report
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["version"] == HERE
    assert report["openssl"] == ssl.OPENSSL_VERSION


def test_fails_on_another_version() -> None:
    rc, report = run("--version", "3.0.0", "json")
    assert rc == 1
    assert report["problems"] == [f"interpreter is Python {HERE}, expected 3.0.0"]


def test_lists_every_missing_module() -> None:
    rc, report = run("--version", HERE, "json", "no_such_module_a", "no_such_module_b")
    assert rc == 1
    assert sorted(report["missing"]) == ["no_such_module_a", "no_such_module_b"]
    assert "missing stdlib modules: no_such_module_a, no_such_module_b" in report["problems"]


def test_a_module_that_raises_on_import_counts_as_missing(tmp_path: Path) -> None:
    (tmp_path / "broken_ext.py").write_text("raise ImportError('libfoo.so.1: cannot open shared object file')\n")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.read_text(), "--version", HERE, "broken_ext"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert "libfoo.so.1" in report["missing"]["broken_ext"]


def test_rejects_an_openssl_older_than_required() -> None:
    rc, report = run("--version", HERE, "--openssl-min", "99.0.0")
    assert rc == 1
    assert any("older than the required 99.0.0" in problem for problem in report["problems"])


def test_checks_pip_when_asked() -> None:
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, check=False).returncode == 0
    rc, report = run("--version", HERE, "--pip")
    if has_pip:
        assert rc == 0, report
        assert report["pip"].startswith("pip ")
    else:
        assert rc == 1
        assert any("pip --version" in problem for problem in report["problems"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.1.1", (1, 1, 1)), ("3.0", (3, 0)), ("1.1.1w", (1, 1, 1)), ("3.0.11-dev", (3, 0, 11)), ("x", ())],
)
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    namespace: dict[str, object] = {"__name__": "verify_python"}
    exec(compile(SCRIPT.read_text(), str(SCRIPT), "exec"), namespace)  # noqa: S102 - the file under test
    assert namespace["parse_version"](text) == expected  # type: ignore[operator]
