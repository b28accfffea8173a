"""GET /healthz: is this process able to serve, and what is it running."""

import logging
import platform

import django
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from acme.health_deps import DEPENDENCIES

logger = logging.getLogger(__name__)


def database_status():
    """Return (reachable, unapplied migration count or None, error text)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        return True, len(plan), ""
    except DatabaseError as exc:
        # Drop the broken connection so the next probe reconnects.
        connection.close()
        return False, None, exc.__class__.__name__ + ": " + str(exc).strip().splitlines()[0]


@never_cache
@require_GET
def healthz(request):
    database, unapplied, db_error = database_status()
    checks = {"database": "ok" if database else db_error}
    healthy = database
    for name, check in DEPENDENCIES:
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:  # a failing dependency of any kind means "do not route here"
            logger.warning("health dependency %s failed: %s", name, exc)
            checks[name] = f"{exc.__class__.__name__}: {exc}"
            healthy = False
    body = {
        "release": settings.RELEASE_ID,
        "django": django.get_version(),
        "python": platform.python_version(),
        "database": database,
        # Reported, not fatal: during a rolling deploy old code serves a migrated DB.
        "unapplied_migrations": unapplied,
        "checks": checks,
        "status": "ok" if healthy else "fail",
    }
    return JsonResponse(body, status=200 if healthy else 503)
