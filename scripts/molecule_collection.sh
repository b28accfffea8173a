#!/usr/bin/env bash
# Run a role's Molecule scenario with the role taken from the built collection, not from roles/:
# build djm.fleet (galaxy.yml) into build/collection, install the tarball offline into a throwaway
# collections directory, then converge, side effect, verify and destroy the scenario with
# DJM_ROLE_PREFIX=djm.fleet. (its playbooks include "{{ DJM_ROLE_PREFIX }}<role>") and
# DJM_COLLECTION_DIR naming the installed collection (its tests check the role's path is there).
# No idempotence step: the repository's own `molecule test` of the same scenario has it.
# Usage: scripts/molecule_collection.sh [ROLE] (default prometheus_textfile). Run with the
# environment the Makefile exports (CONTAINERS_CONF, ANSIBLE_CONFIG, the virtualenv on PATH).
set -euo pipefail
role=${1:-prometheus_textfile}
cd "$(dirname "$0")/.."
[ -f "roles/$role/molecule/default/molecule.yml" ] || { echo "roles/$role has no Molecule scenario"; exit 2; }
t0=$(date +%s)
version=$(awk '$1 == "version:" {print $2}' galaxy.yml)
tarball=build/collection/djm-fleet-$version.tar.gz
mkdir -p build/collection
ansible-galaxy collection build --force --output-path build/collection . >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# No Galaxy server reachable, none needed.
ANSIBLE_GALAXY_SERVER=http://127.0.0.1:9/ \
  ansible-galaxy collection install --offline --force -p "$tmp/collections" "$tarball" >/dev/null
export ANSIBLE_COLLECTIONS_PATH=$tmp/collections
export DJM_ROLE_PREFIX=djm.fleet.
export DJM_COLLECTION_DIR=$tmp/collections/ansible_collections/djm/fleet
echo "=== $role from the collection: $tarball installed in $DJM_COLLECTION_DIR ($(( $(date +%s) - t0 ))s)"
cd "roles/$role"
rc=0
molecule converge && molecule side-effect && molecule verify || rc=$?
molecule destroy >/dev/null 2>&1 || { echo "=== molecule destroy failed"; [ $rc -ne 0 ] || rc=1; }
echo "=== $role from the collection: exit $rc after $(( $(date +%s) - t0 ))s"
exit $rc
