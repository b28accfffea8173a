"""Dependencies /healthz checks besides the database.

Each entry is (name, callable); the callable raises when the dependency is
unusable. A release that ships without something listed here answers 503.
"""

from django.template.loader import get_template


def check_templates():
    """The page template and the layout it extends must load and render."""
    html = get_template("cms/page.html").render({"page": {"title": "health", "body": "ok"}})
    if "health" not in html:
        raise RuntimeError("cms/page.html rendered without its title")


DEPENDENCIES = [
    ("templates", check_templates),
]
