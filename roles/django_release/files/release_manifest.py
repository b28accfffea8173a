#!/usr/bin/env python3
"""Print a Django release's manifest as JSON, without touching any database.

Run with the release's virtualenv interpreter, from the directory that holds manage.py,
with DJANGO_SETTINGS_MODULE (and whatever the settings read) in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--release-id", required=True, help="identifier of the release")
    parser.add_argument("--source", required=True, help="git revision or artifact sha256")
    parser.add_argument("--source-type", required=True, choices=["git", "artifact"])
    return parser.parse_args(argv)


def migration_leaves() -> dict[str, list[str]]:
    """Return the leaf migrations of every app, from the files alone (no database)."""
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    leaves: dict[str, list[str]] = {}
    for app_label, name in loader.graph.leaf_nodes():
        leaves.setdefault(app_label, []).append(name)
    return {app: sorted(names) for app, names in sorted(leaves.items())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.getcwd())
    import django

    django.setup()
    manifest = {
        "release": args.release_id,
        "source_type": args.source_type,
        "source": args.source,
        "python_version": platform.python_version(),
        "python_executable": sys.executable,
        "django_version": django.get_version(),
        "settings_module": os.environ.get("DJANGO_SETTINGS_MODULE", ""),
        "migration_leaves": migration_leaves(),
    }
    json.dump(manifest, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
