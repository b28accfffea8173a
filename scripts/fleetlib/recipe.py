"""What an image is made of, and the hash that names it.

The recipe hash covers everything that determines the image: suite, mirrors, package list, every file
written into the root file system, the customisation script's text, the `podman import` changes and the
controller's CA bundle. Change any of them and `fleet.py images` builds a new image; otherwise it reuses
the tagged one in about a second.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field

RECIPE_FORMAT = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
IMAGE_REPO_PREFIX = "localhost/djm-"
CONTROLLER_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

# Like a cloud VM: init, SSH, Python for Ansible (python3-apt for the apt module), sudo and acl for
# become_user to unprivileged users. Deliberately absent: python3-venv, pip, PostgreSQL, gunicorn,
# haproxy -- the roles must install what they need.
PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "sudo",
    "ca-certificates",
    "curl",
    "gnupg",
    "iproute2",
    "procps",
    "acl",
    "locales",
    "less",
    "tzdata",
)

SOURCES_LIST = """\
deb {mirror} {suite} main
deb {mirror} {suite}-updates main
deb {security_mirror} {suite}-security main
"""

PIP_CONF = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"

# Each host generates its own SSH host keys at first start. The stock unit runs `sshd -t` first,
# which fails without keys, so the list of ExecStartPre is reset and rebuilt.
SSH_HOST_KEYS_DROPIN = """\
# Installed by scripts/fleet.py: the image ships without host keys; each host makes its own.
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
"""

STATIC_FILES: dict[str, str] = {
    "/etc/pip.conf": PIP_CONF,
    "/etc/default/locale": "LANG=C.UTF-8\n",
    "/etc/systemd/system/ssh.service.d/djm-host-keys.conf": SSH_HOST_KEYS_DROPIN,
    "/etc/hostname": "localhost\n",
    "/etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "/etc/resolv.conf": "",
}

# Runs inside the chroot after the files above (and the controller-N.crt certificates) are written.
CUSTOMISE_SCRIPT = """\
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
update-ca-certificates
systemctl enable ssh.service
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
ln -s /etc/machine-id /var/lib/dbus/machine-id
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
rm -rf /tmp/* /var/tmp/* /root/.cache
find /var/log -type f -exec truncate -s 0 {} +
"""

IMPORT_CHANGES: tuple[str, ...] = ('CMD ["/sbin/init"]',)


@dataclass(frozen=True)
class Recipe:
    """One image: `localhost/djm-<name>`, built from Debian `suite`."""

    name: str
    suite: str
    python: str
    mirror: str = DEFAULT_MIRROR
    security_mirror: str = DEFAULT_SECURITY_MIRROR
    packages: tuple[str, ...] = PACKAGES
    files: dict[str, str] = field(default_factory=lambda: dict(STATIC_FILES))
    script: str = CUSTOMISE_SCRIPT
    import_changes: tuple[str, ...] = IMPORT_CHANGES

    @property
    def repo(self) -> str:
        return f"{IMAGE_REPO_PREFIX}{self.name}"

    def all_files(self) -> dict[str, str]:
        """Files written into the root file system (certificates excepted: they depend on the diff)."""
        files = dict(self.files)
        files["/etc/apt/sources.list"] = SOURCES_LIST.format(
            mirror=self.mirror, suite=self.suite, security_mirror=self.security_mirror
        )
        return files

    def digest(self, ca_bundle: bytes) -> str:
        """sha256 over every input that determines the image."""
        document = {
            "format": RECIPE_FORMAT,
            "name": self.name,
            "suite": self.suite,
            "mirror": self.mirror,
            "security_mirror": self.security_mirror,
            "packages": sorted(self.packages),
            "files": self.all_files(),
            "script": self.script,
            "import_changes": list(self.import_changes),
            "ca_bundle_sha256": hashlib.sha256(ca_bundle).hexdigest(),
        }
        encoded = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()


RECIPES: dict[str, Recipe] = {
    "debian11": Recipe(name="debian11", suite="bullseye", python="3.9"),
    "debian12": Recipe(name="debian12", suite="bookworm", python="3.11"),
}

# Molecule scenarios whose PostgreSQL is only a fixture (pg_backup, pg_restore, django_service) start
# from localhost/djm-<base>-pg: the base image plus the distribution's PostgreSQL server (13 on
# Debian 11, 15 on Debian 12, its cluster `main` made by the package), so that no run downloads and
# installs it again. The fleet and the postgresql role's scenario keep the base images: there the
# role must install the server itself. Built from the local base image by `podman run` + `podman
# commit` (no registry), named by a hash of the base image's recipe hash and the lines below.
FIXTURE_PACKAGES: tuple[str, ...] = ("postgresql", "postgresql-client")

# Runs in a container of the base image. policy-rc.d: the package must not start the server
# during the build (no init runs there); systemd starts it in the instances.
FIXTURE_SCRIPT = """\
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
apt-get update
apt-get install --yes {packages}
rm -f /usr/sbin/policy-rc.d
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
rm -rf /tmp/* /var/tmp/* /root/.cache
find /var/log -type f -exec truncate -s 0 {{}} +
rm -f /var/lib/apt/periodic/update-success-stamp
touch -d @0 /var/lib/apt/lists
"""
# The last two lines: the lists are empty, so the package cache must look old. Ansible's apt
# module dates it by that stamp, else by the lists directory's mtime; with `cache_valid_time` (as the
# pg_backup role asks) it would otherwise skip `apt-get update` for that long after the build, and
# then find no package at all.


@dataclass(frozen=True)
class FixtureRecipe:
    """`localhost/djm-<name>`: the base image `base` with `packages` installed."""

    name: str
    base: str
    packages: tuple[str, ...] = FIXTURE_PACKAGES
    script: str = FIXTURE_SCRIPT
    import_changes: tuple[str, ...] = IMPORT_CHANGES

    @property
    def repo(self) -> str:
        return f"{IMAGE_REPO_PREFIX}{self.name}"

    def build_script(self) -> str:
        return self.script.format(packages=" ".join(sorted(self.packages)))

    def digest(self, base_digest: str) -> str:
        """sha256 over the base image's recipe hash and everything this layer adds."""
        document = {
            "format": RECIPE_FORMAT,
            "name": self.name,
            "base": self.base,
            "base_digest": base_digest,
            "packages": sorted(self.packages),
            "script": self.script,
            "import_changes": list(self.import_changes),
        }
        encoded = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()


# The end-to-end tests' second fleet (a pytest-xdist worker's own, `make test`) starts its app hosts
# from localhost/djm-debian11-app: the packages the roles install on an app host (venv support for the
# system Python, nginx for the static files), and its db1 from djm-debian11-pg. The roles then find
# them installed: those apt installs took 235 of the 596 s a fleet's deploy took beside a whole run
# (djmw, 2026-12-01 16:48). The first fleet (the root scenario's) keeps the base images, so a deploy on fresh hosts
# stays proven in every run.
APP_FIXTURE_PACKAGES: tuple[str, ...] = ("python3-venv", "nginx")

FIXTURES: dict[str, FixtureRecipe] = {
    "debian11-pg": FixtureRecipe(name="debian11-pg", base="debian11"),
    "debian12-pg": FixtureRecipe(name="debian12-pg", base="debian12"),
    "debian11-app": FixtureRecipe(name="debian11-app", base="debian11", packages=APP_FIXTURE_PACKAGES),
}

_PEM_RE = re.compile(r"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL)


def split_pem(bundle: str) -> list[bytes]:
    """DER bytes of each certificate in a PEM bundle, in order (unparseable blocks are skipped)."""
    certs: list[bytes] = []
    for body in _PEM_RE.findall(bundle):
        try:
            certs.append(base64.b64decode("".join(body.split()), validate=True))
        except (binascii.Error, ValueError):
            continue
    return certs


def to_pem(der: bytes) -> str:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def missing_certificates(controller_bundle: str, image_bundle: str) -> list[str]:
    """PEM of each controller certificate that the image's bundle lacks (deduplicated, in order)."""
    present = set(split_pem(image_bundle))
    missing: list[str] = []
    for der in split_pem(controller_bundle):
        if der not in present:
            present.add(der)
            missing.append(to_pem(der))
    return missing
