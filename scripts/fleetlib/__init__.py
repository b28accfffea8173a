"""Local test fleet: Debian images built by debootstrap, podman containers reached over SSH.

`scripts/fleet.py` is the command line; the modules here hold the logic so that the unit tests can
import the pure parts (recipe hash, CA diffing, inventory rendering) without touching podman.
"""
