#!/usr/bin/env bash
# Run `molecule test` for every role that has a scenario, MOLECULE_JOBS at a time (scenarios use
# role-prefixed instance names, so they can run side by side). Each role's output goes to
# build/molecule/<role>.log; a failed role's log tail is printed. Exit non-zero if any failed.
# prometheus_textfile's scenario runs a second time from the built collection (MOLECULE_COLLECTION_ROLES).
set -uo pipefail
jobs=${MOLECULE_JOBS:-2}
cd "$(dirname "$0")/.."
mkdir -p build/molecule
# MOLECULE_ROLES="a b" runs only those. Otherwise every role with a scenario, the longest first, so
# that the jobs end together: by each role's last passing duration here (build/molecule/durations),
# else by the figures below (measured, see README), else first (a new scenario: assume it is long).
declare -A measured=([django_release]=1353 [django_service]=868 [pg_backup]=535 [python_runtime]=510
                     [pg_restore]=453 [loadbalancer]=359 [deploy_run]=180 [postgresql]=135
                     [prometheus_textfile]=90)
touch build/molecule/durations
for scenario in roles/*/molecule/default/molecule.yml; do
  role=${scenario#roles/}; role=${role%%/*}
  secs=$(awk -v r="$role" '$1 == r {s = $2} END {print s}' build/molecule/durations)
  echo "${secs:-${measured[$role]:-999999}} $role"
done | sort -k1,1nr -k2 >build/molecule/order
mapfile -t roles < <(awk '{print $2}' build/molecule/order)
if [ -n "${MOLECULE_ROLES:-}" ]; then read -r -a roles <<<"$MOLECULE_ROLES"; fi
[ ${#roles[@]} -gt 0 ] || { echo "no Molecule scenarios found"; exit 1; }

run_one() {
  local role=$1 log="build/molecule/$1.log" start rc
  start=$(date +%s)
  (cd "roles/$role" && molecule test) >"$log" 2>&1
  rc=$?
  # The roles of MOLECULE_COLLECTION_ROLES then run their scenario again with the role taken from the
  # built and installed collection djm.fleet (scripts/molecule_collection.sh), into the same log.
  if [ $rc -eq 0 ] && [[ " ${MOLECULE_COLLECTION_ROLES-prometheus_textfile} " == *" $role "* ]]; then
    echo "=== molecule test: $role passed in $(( $(date +%s) - start ))s; now from the collection" >>"$log"
    bash scripts/molecule_collection.sh "$role" >>"$log" 2>&1
    rc=$?
  fi
  echo "$role $rc $(( $(date +%s) - start ))" >>build/molecule/results
  # One line per run and role; the ordering above reads the last passing one.
  [ $rc -eq 0 ] && echo "$role $(( $(date +%s) - start ))" >>build/molecule/durations
  if [ $rc -eq 0 ]; then
    echo "=== molecule test: $role passed in $(( $(date +%s) - start ))s"
  else
    echo "=== molecule test: $role FAILED (exit $rc) after $(( $(date +%s) - start ))s"
    # The log's tail is only the destroy step: show the end of the step that failed (for verify,
    # testinfra's failures with their assertion lines).
    local step
    step=$(sed -nE 's/^default > ([a-z_]+): Executed: Failed.*/\1/p' "$log" | head -n 1)
    echo "--- the end of step ${step:-?} in $log:"
    awk -v step="$step" '/\[default > [a-z_]+\] Executing$/ {on = index($0, "[default > " step "]") > 0; if (on) n = 0}
                         on {lines[n++ % 150] = $0}
                         END {for (i = (n > 150 ? n - 150 : 0); i < n; i++) print lines[i % 150]}' "$log"
    echo "--- last lines of $log:"
    tail -n 25 "$log"
  fi
}
export -f run_one
: >build/molecule/results
echo "=== molecule: ${roles[*]} (longest first), $jobs at a time; load average $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(date +%s)
printf '%s\n' "${roles[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one {}'
failed=$(awk '$2 != 0 {print $1}' build/molecule/results)
echo "=== molecule: ${#roles[@]} scenarios, $jobs at a time, $(( $(date +%s) - t0 ))s; failed: ${failed:-none}; load average $(cut -d' ' -f1-3 /proc/loadavg)"
[ -z "$failed" ]
