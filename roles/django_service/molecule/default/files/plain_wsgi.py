"""A WSGI app with no health endpoint, like many a Django project's first release.

It accepts only the Host `localhost` (as Django's ALLOWED_HOSTS would), redirects `/` to HTTPS (as
SECURE_SSL_REDIRECT would) and answers every other path with text naming the release directory it
runs from. No JSON anywhere: the default health gate must pass on status alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

RELEASE = os.path.basename(os.path.dirname(os.path.realpath(__file__)))  # through `current`


def application(environ: dict[str, str], start_response: Callable[..., object]) -> Iterable[bytes]:
    host = environ.get("HTTP_HOST", "").rsplit(":", 1)[0]
    if host != "localhost":
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"Bad Request: invalid Host header\n"]
    if environ.get("PATH_INFO", "/") == "/":
        start_response("301 Moved Permanently", [("Location", "https://localhost/"), ("Content-Type", "text/plain")])
        return [b"Moved to https://localhost/\n"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"plain release {RELEASE}\n".encode()]
