"""The hosts after converge + side_effect: Python 3.11.2 beside an untouched system python3."""

import json

import pytest

VERSION = "3.11.2"
PREFIX = f"/opt/python/{VERSION}"
INTERPRETER = f"{PREFIX}/bin/python3.11"
ARCHIVE_INTERPRETER = f"/opt/python-archive/{VERSION}/bin/python3.11"
MODULES = ["ssl", "sqlite3", "ctypes", "zlib", "bz2", "lzma", "uuid", "_uuid", "readline", "decimal", "_decimal", "hashlib"]
PROBE = (
    "import json, ssl, sys, sysconfig, importlib\n"
    "for name in sys.argv[1:]: importlib.import_module(name)\n"
    "print(json.dumps({'version': sys.version.split()[0], 'prefix': sys.prefix, 'openssl': ssl.OPENSSL_VERSION,\n"
    "  'openssl_info': list(ssl.OPENSSL_VERSION_INFO[:3]), 'stdlib': sysconfig.get_path('stdlib')}))\n"
)


def debian_major(host) -> str:
    return host.system_info.release.split(".")[0]


def probe(host, interpreter: str) -> dict:
    result = host.run(" ".join(["%s"] * (len(MODULES) + 3)), interpreter, "-c", PROBE, *MODULES)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def test_new_interpreter_has_the_django_modules(host):
    report = probe(host, INTERPRETER)
    assert report["version"] == VERSION
    assert report["openssl"].startswith("OpenSSL ")
    expected_openssl = [1, 1, 1] if debian_major(host) == "11" else [3, 0, 0]
    assert report["openssl_info"] >= expected_openssl


def test_interpreter_layout_matches_the_method(host):
    link = host.file(INTERPRETER)
    if debian_major(host) == "11":
        # Built from source: a real file in its own prefix, stdlib inside the prefix.
        assert not link.is_symlink
        assert link.is_file
        assert link.mode & 0o111
        report = probe(host, INTERPRETER)
        assert report["prefix"] == PREFIX
        assert report["stdlib"] == f"{PREFIX}/lib/python3.11"
        assert host.file(f"{PREFIX}/lib/python3.11/test").exists is False
    else:
        # Debian 12 package: the prefix only links to the packaged interpreter.
        assert link.is_symlink
        assert link.linked_to == "/usr/bin/python3.11"


def test_system_python3_is_untouched(host):
    expected = {"11": "3.9", "12": "3.11"}[debian_major(host)]
    out = host.check_output("/usr/bin/python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
    assert out == expected
    real = host.check_output("readlink -f /usr/bin/python3")
    assert real == f"/usr/bin/python{expected}"
    assert not real.startswith("/opt/")
    assert host.package("python3").is_installed


def test_pip_works_with_the_system_ca_bundle(host):
    version = host.check_output(f"{INTERPRETER} -m pip --version")
    assert "python 3.11" in version
    # A real TLS download from PyPI through the new interpreter's ssl and /etc/pip.conf.
    cmd = host.run(
        f"rm -rf /root/pip-probe && {INTERPRETER} -m pip download --no-deps --disable-pip-version-check "
        "--dest /root/pip-probe six==1.16.0 && ls /root/pip-probe"
    )
    assert cmd.rc == 0, cmd.stderr
    assert "six-1.16.0" in cmd.stdout


def test_new_interpreter_makes_virtualenvs(host):
    venv = "/root/venv-probe"
    cmd = host.run(f"rm -rf {venv} && {INTERPRETER} -m venv {venv} && {venv}/bin/python -m pip --version")
    assert cmd.rc == 0, cmd.stderr
    assert f"{venv}/" in cmd.stdout


def test_archive_method_installs_the_source_build(host):
    if debian_major(host) == "11":
        report = probe(host, ARCHIVE_INTERPRETER)
        assert report["version"] == VERSION
        assert report["prefix"] == f"/opt/python-archive/{VERSION}"
    else:
        # side_effect fed it the Debian 11 build, which fails verification: nothing may be left.
        assert not host.file(f"/opt/python-archive/{VERSION}").exists


@pytest.mark.parametrize("root", ["/opt/python", "/opt/python-archive"])
def test_no_staging_left_behind(host, root):
    if host.file(root).exists:
        leftovers = host.check_output(f"find {root} -maxdepth 1 -name '.staging-*'")
        assert leftovers == ""


def test_failed_runs_changed_nothing(host):
    # side_effect.yml ran the role with a wrong sha256, bad versions and a half-bad batch there.
    assert not host.file("/opt/python-negative").exists


def test_build_dependencies_only_on_the_build_host(host):
    if debian_major(host) == "11":
        assert host.package("libssl-dev").is_installed
        assert host.check_output("find /tmp /var/tmp -maxdepth 1 -name 'python-build-*'") == ""
    else:
        assert not host.package("libssl-dev").is_installed
        assert not host.package("build-essential").is_installed
