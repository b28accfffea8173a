#!/usr/bin/env bash
# Run `molecule test` for every role that has a scenario, MOLECULE_JOBS at a time (scenarios use
# role-prefixed instance names, so they can run side by side). Each role's output goes to
# build/molecule/<role>.log; a failed role's log tail is printed. Exit non-zero if any failed.
set -uo pipefail
jobs=${MOLECULE_JOBS:-2}
cd "$(dirname "$0")/.."
mkdir -p build/molecule
# MOLECULE_ROLES="a b" runs only those. Otherwise every role with a scenario, the longest first,
# so the last ones to finish are short.
first=(python_runtime django_release)
roles=()
for role in "${first[@]}"; do [ -f "roles/$role/molecule/default/molecule.yml" ] && roles+=("$role"); done
for scenario in roles/*/molecule/default/molecule.yml; do
  role=${scenario#roles/}; role=${role%%/*}
  [[ " ${first[*]} " == *" $role "* ]] || roles+=("$role")
done
if [ -n "${MOLECULE_ROLES:-}" ]; then read -r -a roles <<<"$MOLECULE_ROLES"; fi
[ ${#roles[@]} -gt 0 ] || { echo "no Molecule scenarios found"; exit 1; }

run_one() {
  local role=$1 log="build/molecule/$1.log" start rc
  start=$(date +%s)
  (cd "roles/$role" && molecule test) >"$log" 2>&1
  rc=$?
  echo "$role $rc $(( $(date +%s) - start ))" >>build/molecule/results
  if [ $rc -eq 0 ]; then
    echo "=== molecule test: $role passed in $(( $(date +%s) - start ))s"
  else
    echo "=== molecule test: $role FAILED (exit $rc) after $(( $(date +%s) - start ))s; last lines of $log:"
    tail -n 60 "$log"
  fi
}
export -f run_one
: >build/molecule/results
t0=$(date +%s)
printf '%s\n' "${roles[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one {}'
failed=$(awk '$2 != 0 {print $1}' build/molecule/results)
echo "=== molecule: ${#roles[@]} scenarios, $jobs at a time, $(( $(date +%s) - t0 ))s; failed: ${failed:-none}"
[ -z "$failed" ]
