"""The fixture app's observability: request metrics for Prometheus (django-prometheus) and, on staging
only, django-debug-toolbar (DJANGO_DEBUG_TOOLBAR=1, set by project_debug_toolbar), in v1 and v2.

Each case is a ``manage.py shell`` in the release's real virtualenv against the throwaway PostgreSQL,
driving Django's test client: what a request through gunicorn would get, without a server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "acme"))

import harness as h  # noqa: E402

pytestmark = pytest.mark.slow

# Run inside the release: the pages an anonymous user and a superuser get, and /metrics.
PROBE = r"""
import json
from django.contrib.auth import get_user_model
from django.test import Client
User = get_user_model()
root = User.objects.filter(username="root").first() or User.objects.create_superuser("root", "root@example.com", "x")
anonymous, admin = Client(), Client()
admin.force_login(root)
for _ in range(3):
    anonymous.get("/healthz")
out = {
    "anonymous_login_page": "djDebug" in anonymous.get("/admin/login/").content.decode(),
    "superuser_admin_page": "djDebug" in admin.get("/admin/").content.decode(),
    "debug_urls": anonymous.get("/__debug__/render_panel/").status_code,
}
metrics = anonymous.get("/metrics")
out["metrics_status"] = metrics.status_code
out["metrics"] = metrics.content.decode()
print("PROBE " + json.dumps(out))
"""


def probe(release: str, env: dict[str, str]) -> dict[str, object]:
    result = h.manage(release, env, "shell", "-c", PROBE)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE ") :])


def healthz_count(metrics: str) -> float:
    """django-prometheus' request counter of the health view (GET), summed over its label sets."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("django_http_requests_total_by_view_transport_method_total{") and 'view="healthz"' in line
    )


@pytest.mark.parametrize("release", ["v1", "v2"])
def test_toolbar_only_when_the_deploy_says_so_and_only_for_superusers(pg_cluster: h.Cluster, release: str) -> None:
    dsn_name = f"acme_observe_{release}"
    h.v1_database(pg_cluster, dsn_name)
    base = h.django_env(pg_cluster, dsn_name, DJANGO_ALLOWED_HOSTS="testserver")
    if release == "v2":
        h.must(h.manage(release, base, "migrate", "--noinput", "-v0"))
    off = probe(release, base)
    assert off["superuser_admin_page"] is False and off["debug_urls"] == 404
    on = probe(release, {**base, "DJANGO_DEBUG_TOOLBAR": "1"})
    assert on["superuser_admin_page"] is True  # staging: the superuser gets the toolbar (DEBUG stays off)
    assert on["anonymous_login_page"] is False  # nobody else does
    # Request metrics in both cases; promtool would read them as Prometheus text.
    for result in (off, on):
        assert result["metrics_status"] == 200
        assert healthz_count(str(result["metrics"])) >= 3


def test_request_metrics_are_shared_between_processes(pg_cluster: h.Cluster, tmp_path: Path) -> None:
    """Gunicorn's workers are processes: with PROMETHEUS_MULTIPROC_DIR, /metrics of one counts the others' requests."""
    h.v1_database(pg_cluster, "acme_observe_mp")
    env = h.django_env(pg_cluster, "acme_observe_mp", DJANGO_ALLOWED_HOSTS="testserver", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    first = healthz_count(str(probe("v1", env)["metrics"]))
    second = healthz_count(str(probe("v1", env)["metrics"]))
    assert first >= 3 and second >= first + 3, (first, second)
    assert list(tmp_path.glob("counter_*.db"))


def test_gunicorn_workers_report_every_request(pg_cluster: h.Cluster, tmp_path: Path) -> None:
    """Two gunicorn workers, no PROMETHEUS_MULTIPROC_DIR given: whichever answers /metrics counts all requests."""
    h.v1_database(pg_cluster, "acme_observe_gunicorn")
    # The workers share a directory of their master's under the temporary directory (a private /tmp under systemd).
    env = h.django_env(pg_cluster, "acme_observe_gunicorn", TMPDIR=str(tmp_path))
    with h.gunicorn("v1", env, workers=2) as base:
        for _ in range(20):
            assert h.http_get(base + "/healthz")[0] == 200
        for _ in range(4):
            status, body = h.http_get(base + "/metrics")
            assert status == 200
            assert healthz_count(body.decode()) == 20
    assert len(list(tmp_path.glob("acme-prometheus-*/counter_*.db"))) >= 1
