"""Check an installed CPython: version, stdlib extension modules, OpenSSL, pip.

Run by the interpreter under test (`python3.X -c "$(cat verify_python.py)" ...` or as a file).
It prints one JSON document on stdout and exits 0 when every check passed, 1 otherwise.
It must stay compatible with every Python 3 the role may verify (3.7 and later): no walrus, no
runtime use of new typing syntax (annotations are never evaluated), standard library only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys


def parse_version(text: str) -> tuple[int, ...]:
    """'1.1.1' -> (1, 1, 1); ignores anything that is not a dotted number."""
    parts: list[int] = []
    for piece in text.split("."):
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_modules(names: list[str]) -> dict[str, str]:
    """Import each module; return {name: error} for those that fail."""
    missing: dict[str, str] = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            missing[name] = f"{type(exc).__name__}: {exc}"
    return missing


def check_openssl(minimum: tuple[int, ...]) -> tuple[str, str | None]:
    """Return (version string, problem or None)."""
    try:
        import ssl
    except Exception as exc:
        return "", f"ssl does not import ({type(exc).__name__}: {exc})"
    version = getattr(ssl, "OPENSSL_VERSION", "")
    info = tuple(getattr(ssl, "OPENSSL_VERSION_INFO", ())[:3])
    if not version.startswith("OpenSSL "):
        return version, f"ssl.OPENSSL_VERSION is {version!r}, expected an OpenSSL library"
    if info < minimum:
        return version, "OpenSSL {} is older than the required {}".format(
            ".".join(str(n) for n in info),
            ".".join(str(n) for n in minimum),
        )
    return version, None


def check_pip(timeout: int) -> tuple[str, str | None]:
    """Return (pip --version output, problem or None)."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "--version"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return "", f"python -m pip --version could not run: {exc}"
    output = result.stdout.strip()
    if result.returncode != 0:
        return output, f"python -m pip --version exited {result.returncode}: {output[-300:]}"
    return output, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Verify an installed CPython")
    parser.add_argument("--version", required=True, help="expected version, e.g. 3.11.2")
    parser.add_argument("--openssl-min", default="1.1.1", help="lowest acceptable OpenSSL version")
    parser.add_argument("--pip", action="store_true", help="require a working `python -m pip`")
    parser.add_argument("--pip-timeout", type=int, default=120)
    parser.add_argument("modules", nargs="*", help="modules that must import")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems: list[str] = []
    version = platform.python_version()
    if version != args.version:
        problems.append(f"interpreter is Python {version}, expected {args.version}")
    missing = check_modules(args.modules)
    if missing:
        problems.append("missing stdlib modules: {}".format(", ".join(sorted(missing))))
    openssl, openssl_problem = check_openssl(parse_version(args.openssl_min))
    if openssl_problem:
        problems.append(openssl_problem)
    pip_version, pip_problem = "", None
    if args.pip:
        pip_version, pip_problem = check_pip(args.pip_timeout)
        if pip_problem:
            problems.append(pip_problem)
    report = {
        "ok": not problems,
        "problems": problems,
        "version": version,
        "executable": sys.executable,
        "prefix": sys.prefix,
        "missing": missing,
        "openssl": openssl,
        "pip": pip_version,
    }
    json.dump(report, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
