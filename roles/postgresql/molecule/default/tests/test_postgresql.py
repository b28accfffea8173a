"""Testinfra checks of the postgresql role on both instances (run by `molecule verify`)."""

from __future__ import annotations

import re
from typing import Any

import pytest

APP_USER = "molecule_app"
APP_DB = "molecule_appdb"
APP_PASSWORD = "molecule-S3cret'pw"  # noqa: S105 - the test-only password set in converge.yml
PORT = 5432


def major(host: Any) -> str:
    """The PostgreSQL major version this distribution should get."""
    return {"11": "13", "12": "15"}[host.system_info.release.split(".")[0]]


def psql_as_postgres(host: Any, query: str, dbname: str = "postgres") -> str:
    """Run a query as the postgres OS user over the unix socket (peer authentication)."""
    return host.check_output(
        "runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -d %s -c %s",
        dbname,
        query,
    )


@pytest.fixture(scope="module")
def address(host: Any) -> str:
    """The instance's address on its default route (what converge.yml used as ansible_default_ipv4)."""
    probe = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.connect(('192.0.2.1', 9)); print(s.getsockname()[0])"
    )
    return str(host.check_output("python3 -c %s", probe)).strip()


def test_server_package_of_the_distribution_is_installed(host: Any) -> None:
    assert host.package(f"postgresql-{major(host)}").is_installed
    assert host.package("python3-psycopg2").is_installed


def test_cluster_service_is_running_and_enabled(host: Any) -> None:
    unit = host.service(f"postgresql@{major(host)}-main")
    assert unit.is_running
    assert unit.is_enabled or host.service("postgresql").is_enabled


def test_server_reports_the_expected_major_version(host: Any) -> None:
    assert psql_as_postgres(host, "SHOW server_version_num")[:2] == major(host)


def test_peer_authentication_for_postgres_only(host: Any) -> None:
    assert psql_as_postgres(host, "SELECT current_user") == "postgres"
    # root over the socket claiming to be postgres: peer authentication must refuse it.
    refused = host.run("psql -X -At -U postgres -d postgres -c 'SELECT 1'")
    assert refused.rc != 0
    assert "Peer authentication failed" in refused.stderr


def test_listens_on_the_configured_addresses_only(host: Any, address: str) -> None:
    assert host.socket(f"tcp://127.0.0.1:{PORT}").is_listening
    assert host.socket(f"tcp://{address}:{PORT}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{PORT}").is_listening
    assert psql_as_postgres(host, "SHOW listen_addresses") == f"127.0.0.1,{address}"


def test_settings_from_postgresql_config_are_live(host: Any) -> None:
    # max_connections only changes at a restart: proves the restart handler ran.
    assert psql_as_postgres(host, "SHOW max_connections") == "60"
    assert psql_as_postgres(host, "SHOW work_mem") == "8MB"
    assert psql_as_postgres(host, "SHOW log_connections") == "on"
    assert psql_as_postgres(host, "SELECT count(*) FROM pg_settings WHERE pending_restart") == "0"
    conf = host.file(f"/etc/postgresql/{major(host)}/main/conf.d/50-ansible-postgresql.conf")
    assert conf.user == "postgres"
    assert "max_connections = '60'" in conf.content_string


def test_app_role_logs_in_with_its_password_over_tcp(host: Any, address: str) -> None:
    login = host.run(
        "PGPASSWORD=%s psql -X -At -h %s -p %s -U %s -d %s -c %s",
        APP_PASSWORD,
        address,
        str(PORT),
        APP_USER,
        APP_DB,
        "SELECT current_user || ' ' || current_database() || ' ' || host(inet_client_addr())",
    )
    assert login.rc == 0, login.stderr
    assert login.stdout.strip() == f"{APP_USER} {APP_DB} {address}"


def test_app_role_is_refused_with_a_wrong_password(host: Any, address: str) -> None:
    login = host.run("PGPASSWORD=wrong psql -X -At -h %s -p %s -U %s -d %s -c 'SELECT 1'", address, str(PORT), APP_USER, APP_DB)
    assert login.rc != 0
    assert "password authentication failed" in login.stderr


def test_password_is_stored_as_scram(host: Any) -> None:
    stored = psql_as_postgres(host, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{APP_USER}'")
    assert stored.startswith("SCRAM-SHA-256$")
    assert APP_PASSWORD not in stored


def test_app_database_is_owned_by_the_app_role_in_utf8(host: Any) -> None:
    row = psql_as_postgres(
        host,
        "SELECT pg_get_userbyid(datdba) || ' ' || pg_encoding_to_char(encoding) || ' ' || datcollate"
        f" FROM pg_database WHERE datname = '{APP_DB}'",
    )
    assert row == f"{APP_USER} UTF8 C.UTF-8"


def test_pg_hba_has_the_app_entry_and_the_server_accepts_it(host: Any, address: str) -> None:
    hba = host.file(f"/etc/postgresql/{major(host)}/main/pg_hba.conf")
    entries = [line.split() for line in hba.content_string.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert ["host", APP_DB, APP_USER, f"{address}/32", "scram-sha-256"] in entries
    # The default source: the app group's host (molecule.yml), one /32 entry.
    assert ["host", APP_DB, APP_USER, "192.0.2.55/32", "scram-sha-256"] in entries
    # Debian's own peer entry for postgres stays first.
    assert entries[0][:3] == ["local", "all", "postgres"]
    assert hba.user == "postgres"
    assert hba.mode == 0o640
    loaded = psql_as_postgres(
        host,
        "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NULL AND type = 'host'"
        f" AND database = '{{{APP_DB}}}' AND user_name = '{{{APP_USER}}}' AND address = '{address}'"
        " AND auth_method = 'scram-sha-256'",
    )
    assert loaded == "1"


def test_existing_cluster_kept_its_own_entries_and_databases(host: Any) -> None:
    if major(host) != "15":
        pytest.skip("only pgsrv-debian12 had a server before the role ran (prepare.yml)")
    hba = host.file("/etc/postgresql/15/main/pg_hba.conf").content_string
    assert re.search(r"^host\s+legacydb\s+legacy\s+192\.0\.2\.10/32\s+scram-sha-256$", hba, re.MULTILINE)
    assert psql_as_postgres(host, "SELECT count(*) FROM pg_database WHERE datname = 'legacydb'") == "1"
