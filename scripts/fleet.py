#!/usr/bin/env python3
"""Local test fleet on podman: build the Debian images, bring up lb1/app1..N/db1, tear them down.

Exit codes: 0 ok, 1 a step failed, 2 bad arguments, 3 a tool or config is missing (run make setup),
4 not enough free disk, 5 the --http-port is taken, 6 not root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetlib.common import EXIT_OK, FleetError, die, setup_environment
from fleetlib.recipe import RECIPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    images = sub.add_parser("images", help="build (or reuse, by recipe hash) the Debian 11 and 12 images")
    images.add_argument("--only", choices=sorted(RECIPES), help="build only this image")
    images.add_argument("--force", action="store_true", help="rebuild even if the recipe hash is unchanged")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_environment()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "images":
            from fleetlib.images import build_images

            build_images([args.only] if args.only else sorted(RECIPES), args.force)
    except FleetError as error:
        return die(error)
    except KeyboardInterrupt:
        return die(FleetError("interrupted"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
