"""Runtime requirements of this release, checked when the settings load.

A release overlay replaces this file to raise the floor (v2 needs Python 3.11).
"""

import platform
import sys

from django.core.exceptions import ImproperlyConfigured

MIN_PYTHON = (3, 8)


def check_python():
    """Refuse to start on an interpreter older than this release supports."""
    if sys.version_info[:2] < MIN_PYTHON:
        wanted = ".".join(str(part) for part in MIN_PYTHON)
        raise ImproperlyConfigured(
            f"This ACME release needs Python >= {wanted}; it is running on Python "
            f"{platform.python_version()} ({sys.executable}). Install a newer interpreter and rebuild the virtualenv."
        )
