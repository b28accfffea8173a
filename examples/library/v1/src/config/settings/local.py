"""A developer's machine: SQLite, DEBUG on."""

from .base import *  # noqa: F403
from .base import SRC_DIR

DEBUG = True
SECRET_KEY = "local-only-not-a-secret"
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(SRC_DIR / "db.sqlite3")}}
STATIC_ROOT = str(SRC_DIR / "collected")
MEDIA_ROOT = str(SRC_DIR / "uploads")
