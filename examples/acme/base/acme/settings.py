"""Settings of the ACME fixture project.

Everything that differs between hosts comes from environment variables; the
contract (names, defaults, what is required) is documented in
docs/fixture-app.md. Nothing here is host-specific.
"""

import os
import sys
import tempfile
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from acme import runtime

BASE_DIR = Path(__file__).resolve().parent.parent

runtime.check_python()

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_bool(name, default):
    """Read a boolean variable; anything but the usual spellings is an error."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be 0 or 1 (got {raw!r})")


def env_int(name, default):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer (got {raw!r})") from None


def env_list(name, default):
    raw = os.environ.get(name)
    if raw is None:
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


def explicitly_off(name):
    """True when the operator set ``name`` to a false value on purpose."""
    return name in os.environ and not env_bool(name, True)


def _release_id():
    from_env = os.environ.get("APP_RELEASE_ID", "").strip()
    if from_env:
        return from_env
    release_file = BASE_DIR / "RELEASE"
    if release_file.is_file():
        return release_file.read_text(encoding="utf-8").strip() or "unknown"
    return "unknown"


DEBUG = env_bool("DJANGO_DEBUG", False)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Put a random string of 50+ characters in the "
            "environment file (or set DJANGO_DEBUG=1 for a development run)."
        )
    SECRET_KEY = "development-only-key-never-use-in-production-" + "x" * 20

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])

RELEASE_ID = _release_id()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "acme",
    "customers",
    "profiles",
    "cms",
    "catalog",
    "orders",
    "payments",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "acme.urls"
WSGI_APPLICATION = "acme.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.debug",
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "acme.context_processors.release",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("DATABASE_HOST", ""),
        "PORT": os.environ.get("DATABASE_PORT", "5432"),
        "NAME": os.environ.get("DATABASE_NAME", "acme"),
        "USER": os.environ.get("DATABASE_USER", "acme"),
        "PASSWORD": os.environ.get("DATABASE_PASSWORD", ""),
        "CONN_MAX_AGE": env_int("DATABASE_CONN_MAX_AGE", 60),
        "OPTIONS": {
            "connect_timeout": env_int("DATABASE_CONNECT_TIMEOUT", 5),
            "application_name": "acme-" + RELEASE_ID,
        },
    }
}
if os.environ.get("DATABASE_SSLMODE"):
    DATABASES["default"]["OPTIONS"]["sslmode"] = os.environ["DATABASE_SSLMODE"]

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTHENTICATION_BACKENDS = [
    "customers.backends.CustomerEmailBackend",
    "django.contrib.auth.backends.ModelBackend",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = os.environ.get("STATIC_ROOT") or str(BASE_DIR / "staticfiles")
MEDIA_URL = "/media/"
MEDIA_ROOT = os.environ.get("MEDIA_ROOT") or str(BASE_DIR / "media")

# --- Transport security --------------------------------------------------------
# Secure by default: every SECURE_* knob defaults to the value `check --deploy`
# wants. Behind a load balancer that speaks plain HTTP the operator turns single
# knobs off in the environment; exactly the deploy check for a knob that was
# explicitly turned off is silenced, nothing else.
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", True)
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", True)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", True)
if env_bool("DJANGO_SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# /healthz must answer the load balancer's plain-HTTP probe even with the redirect on.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]

SILENCED_SYSTEM_CHECKS = []
if explicitly_off("DJANGO_SECURE_SSL_REDIRECT"):
    SILENCED_SYSTEM_CHECKS.append("security.W008")
if "DJANGO_SECURE_HSTS_SECONDS" in os.environ and SECURE_HSTS_SECONDS == 0:
    SILENCED_SYSTEM_CHECKS.append("security.W004")
if explicitly_off("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS"):
    SILENCED_SYSTEM_CHECKS.append("security.W005")
if explicitly_off("DJANGO_SECURE_HSTS_PRELOAD"):
    SILENCED_SYSTEM_CHECKS.append("security.W021")
if explicitly_off("DJANGO_SESSION_COOKIE_SECURE"):
    SILENCED_SYSTEM_CHECKS.append("security.W012")
if explicitly_off("DJANGO_CSRF_COOKIE_SECURE"):
    SILENCED_SYSTEM_CHECKS.append("security.W016")

# --- Observability (the proposal's monitoring: Prometheus, Django Debug Toolbar) ----------------
# Request metrics for Prometheus (django-prometheus): GET /metrics on each app host (requests,
# responses by status and view, latencies, database errors). Gunicorn runs several workers, which
# share their samples through PROMETHEUS_MULTIPROC_DIR: from the environment, else, in a gunicorn
# worker, a directory of its master process under the temporary directory (the service's private
# /tmp, new at each start). manage.py commands keep their samples to themselves. prometheus_client
# reads the variable when it is first imported, after these settings.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ and Path(sys.argv[0]).name == "gunicorn":
    _metrics_dir = Path(tempfile.gettempdir()) / f"acme-prometheus-{os.getppid()}"
    try:
        _metrics_dir.mkdir(mode=0o700, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)
    except OSError:
        pass  # no temporary directory: each worker reports its own samples
INSTALLED_APPS.append("django_prometheus")
MIDDLEWARE.insert(0, "django_prometheus.middleware.PrometheusBeforeMiddleware")
MIDDLEWARE.append("django_prometheus.middleware.PrometheusAfterMiddleware")
PROMETHEUS_EXPORT_MIGRATIONS = False

# django-debug-toolbar, on staging only: the deploy sets DJANGO_DEBUG_TOOLBAR=1 when the inventory
# says project_debug_toolbar (playbooks/validate.yml refuses it for production). Shown to logged-in
# superusers only, whatever DEBUG says: its SQL panel lists a page's queries and their plans, the
# post-migration query analysis of docs/runbook.md.
DEBUG_TOOLBAR = env_bool("DJANGO_DEBUG_TOOLBAR", False)
if DEBUG_TOOLBAR:
    INSTALLED_APPS.append("debug_toolbar")
    MIDDLEWARE.insert(
        MIDDLEWARE.index("django.contrib.auth.middleware.AuthenticationMiddleware") + 1,
        "debug_toolbar.middleware.DebugToolbarMiddleware",
    )
    DEBUG_TOOLBAR_CONFIG = {"SHOW_TOOLBAR_CALLBACK": "acme.observability.show_toolbar"}

LOG_LEVEL = os.environ.get("DJANGO_LOG_LEVEL", "INFO").upper()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s [%(name)s] release=" + RELEASE_ID + " %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
    },
}
