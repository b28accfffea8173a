#!/usr/bin/env bash
# Controller set-up, run by `make setup`. Idempotent: a second run changes nothing and says so.
#   - OS packages: podman + runc + debootstrap (the local fleet), PostgreSQL 15 binaries (the unit
#     tests start their own throwaway cluster; no system cluster is created), ssh client, rsync
#   - the Python 3.11 virtualenv .venv with requirements.txt (re-installed only when it changes)
#   - checks that the project-local containers.conf exists and that podman uses runc with it;
#   - the `djm` console command: $VENV/bin/djm runs this checkout's scripts/djm.py with the venv's python;
#   - probes at run time that podman runs a container on a network (scripts/probe_runtime.py).
# It never touches /etc/containers. Each failure is one line saying what to do.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
REQUIREMENTS="$REPO_ROOT/requirements.txt"
STAMP="$VENV/.requirements.sha256"
CONTAINERS_CONF="${CONTAINERS_CONF:-$REPO_ROOT/.config/containers/containers.conf}"
export CONTAINERS_CONF
CREATECLUSTER_CONF=/etc/postgresql-common/createcluster.conf
# netavark + aardvark-dns: podman networks with DNS, so fleet hosts resolve each other by name;
# netavark calls iptables at run time (no package dependency says so: a machine without it fails
# at the first `podman run`). The probe at the end proves the whole chain on a throwaway network.
PACKAGES=(podman runc netavark aardvark-dns iptables debootstrap uidmap fuse-overlayfs git make openssh-client
          rsync postgresql-15 postgresql-client-15)

changes=0
fail() { echo "setup: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }
changed() { echo "changed: $*"; changes=$((changes + 1)); }

[ "$(id -u)" -eq 0 ] || fail "must run as root (apt-get, podman): use sudo make setup"
command -v apt-get >/dev/null || fail "apt-get not found: this set-up supports Debian 12 controllers only"

# --- OS packages --------------------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
  [ "$status" = "install ok installed" ] || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
  ok "OS packages installed (${PACKAGES[*]})"
else
  # No system PostgreSQL cluster on the controller: tell postgresql-common not to create "main",
  # but only on a machine that has neither that setting nor any cluster yet.
  if [ ! -e "$CREATECLUSTER_CONF" ] && [ -z "$(ls -A /etc/postgresql 2>/dev/null || true)" ]; then
    install -d -m 0755 "$(dirname "$CREATECLUSTER_CONF")"
    printf 'create_main_cluster = false\n' > "$CREATECLUSTER_CONF"
    changed "wrote $CREATECLUSTER_CONF (no main cluster on the controller)"
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || fail "apt-get update failed: check the network and /etc/apt/sources.list"
  apt-get install -y -qq \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed: run it by hand to see why"
  changed "installed ${missing[*]}"
fi

# --- Python 3.11 and the virtualenv --------------------------------------------------------------
PYTHON="$(command -v python3.11 || true)"
[ -n "$PYTHON" ] || fail "python3.11 not found on PATH: install Python 3.11 (the pinned toolchain needs it)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV" || fail "python3.11 -m venv $VENV failed: install the venv module (python3.11-venv)"
  changed "created $VENV"
fi
venv_version="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$venv_version" = "3.11" ] || fail "$VENV runs Python $venv_version, not 3.11: remove it and run make setup again"

want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" = "$have" ]; then
  ok "$VENV matches requirements.txt"
else
  "$VENV/bin/python" -m pip install -q -r "$REQUIREMENTS" \
    || fail "pip install -r requirements.txt failed: run it by hand to see why"
  printf '%s\n' "$want" > "$STAMP"
  changed "installed requirements.txt into $VENV"
fi

# --- promtool (lint of monitoring/ and of the metric files the roles write) ------------------------
# Only the promtool binary, from Debian's prometheus package (apt-get download + dpkg-deb: a static Go
# binary, no dependencies), into the virtualenv's bin/: installing the package would also start a
# Prometheus server on the controller.
PROMTOOL="$VENV/bin/promtool"
if "$PROMTOOL" --version >/dev/null 2>&1; then
  ok "promtool in $VENV/bin ($("$PROMTOOL" --version 2>&1 | head -n 1 | cut -d' ' -f3))"
else
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) \
    || { apt-get update -qq && (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); } \
    || { rm -rf "$tmp"; fail "apt-get download prometheus failed: promtool comes from Debian's prometheus package"; }
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool \
    || { rm -rf "$tmp"; fail "no usr/bin/promtool in Debian's prometheus package"; }
  install -m 0755 "$tmp/usr/bin/promtool" "$PROMTOOL"
  rm -rf "$tmp"
  "$PROMTOOL" --version >/dev/null 2>&1 || fail "$PROMTOOL does not run"
  changed "installed promtool into $VENV/bin"
fi

# --- the djm console command ------------------------------------------------------------------------
# A two-line wrapper, not a package: this repository is not a Python package, and the CLI runs this
# checkout's playbooks. Rewritten only when it differs (another checkout, another venv); then probed.
DJM="$VENV/bin/djm"
djm_wrapper="$(printf '#!/bin/sh\n# Written by make setup (scripts/setup.sh): the djm CLI of %s\nexec "%s" "%s" "$@"\n' \
  "$REPO_ROOT" "$VENV/bin/python" "$REPO_ROOT/scripts/djm.py")"
if [ -x "$DJM" ] && [ "$(cat "$DJM")" = "$djm_wrapper" ]; then
  ok "$DJM runs $REPO_ROOT/scripts/djm.py"
else
  printf '%s\n' "$djm_wrapper" > "$DJM.tmp" && chmod 0755 "$DJM.tmp" && mv "$DJM.tmp" "$DJM" \
    || fail "could not write $DJM: check that $VENV is writable"
  changed "installed the djm command ($DJM)"
fi
"$DJM" --version >/dev/null 2>&1 || fail "$DJM --version failed: run $VENV/bin/python $REPO_ROOT/scripts/djm.py --version to see why"

# --- podman with the project-local containers.conf ------------------------------------------------
[ -f "$CONTAINERS_CONF" ] || fail "CONTAINERS_CONF file $CONTAINERS_CONF is missing: restore .config/containers/containers.conf"
runtime="$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>/dev/null || true)"
[ "$runtime" = "runc" ] \
  || fail "podman uses runtime '${runtime:-unknown}' with $CONTAINERS_CONF, not runc: check its [engine] runtime"
ok "podman uses runc with $CONTAINERS_CONF"

# --- run-time probe: a container on a throwaway network, as the fleet will run them ---------------
probe="$("$VENV/bin/python" "$REPO_ROOT/scripts/probe_runtime.py" 2>&1)" || fail "${probe#setup: }"
echo "$probe"

if [ "$changes" -eq 0 ]; then
  echo "setup: nothing changed; the controller is ready"
else
  echo "setup: $changes change(s) made; the controller is ready"
fi
