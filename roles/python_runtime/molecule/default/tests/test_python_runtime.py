"""The hosts after converge + side_effect: Python 3.11.2 beside an untouched system python3.

Each remote call is a `podman exec`, so the state of each host is read once (by the
system python3, which the role must leave alone) and the tests assert on that snapshot.
"""

from __future__ import annotations

import json
from functools import cache

import pytest

VERSION = "3.11.2"
PREFIX = f"/opt/python/{VERSION}"
INTERPRETER = f"{PREFIX}/bin/python3.11"
ARCHIVE_PREFIX = f"/opt/python-archive/{VERSION}"
MODULES = ["ssl", "sqlite3", "ctypes", "zlib", "bz2", "lzma", "uuid", "_uuid", "readline", "decimal", "_decimal", "hashlib"]

# Run by the new interpreter: imports every module (a failure raises, rc != 0) and reports.
PROBE = (
    "import json, ssl, sys, sysconfig, importlib\n"
    "for name in sys.argv[1:]: importlib.import_module(name)\n"
    "print(json.dumps({'version': sys.version.split()[0], 'prefix': sys.prefix, 'openssl': ssl.OPENSSL_VERSION,\n"
    "  'openssl_info': list(ssl.OPENSSL_VERSION_INFO[:3]), 'stdlib': sysconfig.get_path('stdlib')}))\n"
)

# Run by the system python3: everything else the tests look at, in one remote call.
SNAPSHOT = """
import glob, json, os, stat, subprocess, sys
def lstat(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return {"link": os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
            "file": stat.S_ISREG(st.st_mode), "mode": st.st_mode & 0o7777}
def installed(package):
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, universal_newlines=True).stdout
    return out.endswith(" installed")
print(json.dumps({
    "debian": open("/etc/debian_version").read().split(".")[0],
    "system_python": "%d.%d" % sys.version_info[:2],
    "system_python_real": os.path.realpath("/usr/bin/python3"),
    "interpreter": lstat(sys.argv[1]),
    "paths": {p: os.path.exists(p) for p in sys.argv[2:]},
    "staging": sorted(glob.glob("/opt/python*/.staging-*")),
    "build_dirs": sorted(glob.glob("/tmp/python-build-*") + glob.glob("/var/tmp/python-build-*")),
    "packages": {p: installed(p) for p in ("python3", "libssl-dev", "build-essential")},
    "debug_info": (b".debug_info" in open(sys.argv[1], "rb").read())
                  if os.path.isfile(sys.argv[1]) and not os.path.islink(sys.argv[1]) else None,
    "static_libs": {p: os.stat(p).st_ino for p in glob.glob(
        os.path.dirname(os.path.dirname(sys.argv[1])) + "/lib/**/libpython*.a", recursive=True)},
}))
"""
TEST_SUITE = f"{PREFIX}/lib/python3.11/test"


@cache
def snapshot(host) -> dict:
    paths = [TEST_SUITE, ARCHIVE_PREFIX, "/opt/python-negative"]
    cmd = host.run(" ".join(["/usr/bin/python3 -c %s %s"] + ["%s"] * len(paths)), SNAPSHOT, INTERPRETER, *paths)
    assert cmd.rc == 0, cmd.stderr
    return json.loads(cmd.stdout)


@cache
def probe(host, interpreter: str) -> dict:
    result = host.run(" ".join(["%s"] * (len(MODULES) + 3)), interpreter, "-c", PROBE, *MODULES)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def built_from_source(host) -> bool:
    """Debian 11 builds from source in this scenario; Debian 12 uses the package."""
    return snapshot(host)["debian"] == "11"


def test_new_interpreter_has_the_django_modules(host):
    report = probe(host, INTERPRETER)
    assert report["version"] == VERSION
    assert report["openssl"].startswith("OpenSSL ")
    assert report["openssl_info"] >= ([1, 1, 1] if built_from_source(host) else [3, 0, 0])


def test_interpreter_layout_matches_the_method(host):
    state = snapshot(host)
    interpreter = state["interpreter"]
    if built_from_source(host):
        # A real file in its own prefix, with its stdlib inside the prefix and no test suite.
        assert interpreter["link"] is None
        assert interpreter["file"]
        assert interpreter["mode"] == 0o755
        report = probe(host, INTERPRETER)
        assert report["prefix"] == PREFIX
        assert report["stdlib"] == f"{PREFIX}/lib/python3.11"
        assert state["paths"][TEST_SUITE] is False
    else:
        # The package method only links the packaged interpreter into the prefix.
        assert interpreter["link"] == "/usr/bin/python3.11"


def test_source_build_is_stripped_and_stores_its_static_library_once(host):
    """python_runtime_build_strip: no debug sections, one inode for altinstall's two copies."""
    if not built_from_source(host):
        pytest.skip("the package method installs no build")
    state = snapshot(host)
    assert state["debug_info"] is False
    assert len(state["static_libs"]) >= 1, state["static_libs"]
    assert len(set(state["static_libs"].values())) == 1, state["static_libs"]


def test_system_python3_is_untouched(host):
    state = snapshot(host)
    expected = "3.9" if state["debian"] == "11" else "3.11"
    assert state["system_python"] == expected
    assert state["system_python_real"] == f"/usr/bin/python{expected}"
    assert state["packages"]["python3"]


def test_pip_works_with_the_system_ca_bundle(host):
    # pip runs, and downloads from PyPI over TLS with the new ssl module and /etc/pip.conf.
    cmd = host.run(
        f"{INTERPRETER} -m pip --version && rm -rf /root/pip-probe && "
        f"{INTERPRETER} -m pip download --no-deps --disable-pip-version-check --dest /root/pip-probe six==1.16.0 && "
        "ls /root/pip-probe"
    )
    assert cmd.rc == 0, cmd.stderr
    assert "(python 3.11)" in cmd.stdout
    assert "six-1.16.0-py2.py3-none-any.whl" in cmd.stdout


def test_new_interpreter_makes_virtualenvs(host):
    venv = "/root/venv-probe"
    cmd = host.run(f"rm -rf {venv} && {INTERPRETER} -m venv {venv} && {venv}/bin/python -m pip --version")
    assert cmd.rc == 0, cmd.stderr
    assert f"{venv}/" in cmd.stdout


def test_archive_method_installs_the_source_build(host):
    if built_from_source(host):
        report = probe(host, f"{ARCHIVE_PREFIX}/bin/python3.11")
        assert report["version"] == VERSION
        assert report["prefix"] == ARCHIVE_PREFIX
    else:
        # side_effect fed it the Debian 11 build, which fails verification there: nothing may be left.
        assert snapshot(host)["paths"][ARCHIVE_PREFIX] is False


def test_no_staging_or_build_directory_left_behind(host):
    state = snapshot(host)
    assert state["staging"] == []
    assert state["build_dirs"] == []


def test_failed_runs_changed_nothing(host):
    # side_effect.yml ran the role with a wrong sha256, bad versions and a half-bad batch there.
    assert snapshot(host)["paths"]["/opt/python-negative"] is False


# The first Debian 11 host of the play is the build host (and builds only when the controller cache
# lacks the tarball); every other host must get the interpreter without build dependencies.
BUILD_HOST = "python-runtime-debian11"


@pytest.mark.parametrize("package", ["libssl-dev", "build-essential"])
def test_no_build_dependencies_beside_the_build_host(host, package):
    if host.backend.get_hostname() == BUILD_HOST:
        pytest.skip("the build host has them exactly when it built (cold cache)")
    assert snapshot(host)["packages"][package] is False
