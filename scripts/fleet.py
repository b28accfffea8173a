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

from fleetlib.common import EXIT_OK, REPO_ROOT, FleetError, die, setup_environment
from fleetlib.hosts import DEFAULT_INVENTORY, down, status, up
from fleetlib.inventory import parse_image_map, parse_vars, validate_fleet_name
from fleetlib.recipe import FIXTURES, RECIPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    images = sub.add_parser("images", help="build (or reuse, by recipe hash) the Debian 11 and 12 images and their fixtures")
    images.add_argument("--only", choices=sorted(RECIPES), help="build only this image (and its fixture variants)")
    images.add_argument("--force", action="store_true", help="rebuild even if the recipe hash is unchanged")

    up = sub.add_parser("up", help="start (or complete) the fleet: lb1, app1..appN, db1, reachable over SSH")
    up.add_argument("--name", default="djm", help="fleet name: prefixes containers and the network (default: djm)")
    up.add_argument("--apps", type=int, default=3, help="number of app hosts (default: 3; more adds hosts)")
    up.add_argument("--image", choices=sorted(RECIPES), default="debian11", help="image of every host (default: debian11)")
    up.add_argument(
        "--image-map",
        action="append",
        default=[],
        metavar="HOST=IMAGE",
        help="image per host or group (lb, app, db), repeatable; a host beats its group; a base image or a fixture image"
        " (debian11-pg, debian11-app: packages preinstalled). E.g. --image-map app2=debian12",
    )
    up.add_argument("--http-port", type=port_number, help="publish lb1:80 on 127.0.0.1:PORT")
    up.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable of the whole fleet in the generated inventory (all.vars), repeatable; e.g. django_service_workers=2",
    )
    up.add_argument("--subnet", help="fleet network subnet (default: a free /24 in 10.90.0.0/16)")
    up.add_argument(
        "--inventory",
        type=Path,
        default=DEFAULT_INVENTORY,
        help=f"where to write the inventory (default: {DEFAULT_INVENTORY.relative_to(REPO_ROOT)})",
    )

    down = sub.add_parser("down", help="remove what up made: labelled containers and network, key, inventory")
    down.add_argument("--name", default="djm", help="fleet name (default: djm)")

    status = sub.add_parser("status", help="table of the fleet's hosts, addresses, states and images")
    status.add_argument("--name", default="djm", help="fleet name (default: djm)")
    return parser


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not in 1..65535")
    return port


def main(argv: list[str] | None = None) -> int:
    setup_environment()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "images":
            from fleetlib.images import build_images

            build_images([args.only] if args.only else sorted(RECIPES), args.force)
            return EXIT_OK
        fleet = validate_fleet_name(args.name)
        if args.command == "up":
            image_map = parse_image_map(args.image_map, sorted([*RECIPES, *FIXTURES]))
            up(fleet, args.apps, args.image, image_map, args.http_port, args.inventory, args.subnet, parse_vars(args.var))
        elif args.command == "down":
            down(fleet)
        elif args.command == "status":
            return status(fleet)
    except FleetError as error:
        return die(error)
    except KeyboardInterrupt:
        return die(FleetError("interrupted"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
