#!/usr/bin/env bash
# test.sh -- the one command that runs hpcdist's tests on a fresh machine (root, Debian 12).
#
#   bash scripts/test.sh              # setup (.venv, Slurm n1..n3 with accounting), then every test
#   bash scripts/test.sh -k render    # extra arguments go to pytest
#
# Three lanes. The tests that race the wall clock (marker `timed`: signals, kills, hangs, bounds in seconds) run
# first with the CPUs to themselves. Then the cluster's tests (`slurm`) run one at a time, since they share its
# three nodes; beside them, at the lowest CPU priority, every other test: the cluster's jobs leave a third of
# the CPU time idle (waiting on Slurm, timers and dead nodes), and those tests take only that.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --slurm
started=$(date +%s)
pytest=(.venv/bin/python -m pytest -ra)
# worksteal: a worker that runs out of tests takes the other's queue, so the lane ends with both busy.
parallel=(-n 2 --dist worksteal)
untimed_log=$(mktemp /tmp/hpcdist-untimed-XXXXXX.log)
timed=0 cluster=0 untimed=0
"${pytest[@]}" --durations=10 -m "timed and not slurm" "${parallel[@]}" "$@" || timed=$?
# In a session of its own at nice 19 (its autogroup): the kernel shares the CPUs between sessions first, so a
# process's nice alone would rank it only against this script's session, not against the jobs slurmd starts.
setsid --wait bash -c 'echo 19 > /proc/self/autogroup 2>/dev/null; exec nice -n 19 "$@"' lowest \
    "${pytest[@]}" --durations=15 -m "not slurm and not timed" "${parallel[@]}" -p no:cacheprovider "$@" \
    > "$untimed_log" 2>&1 &
untimed_pid=$!
trap 'kill -- -"$untimed_pid" 2>/dev/null || kill "$untimed_pid" 2>/dev/null || true' EXIT  # whatever ends the script
"${pytest[@]}" --durations=25 -m slurm "$@" || cluster=$?
wait "$untimed_pid" || untimed=$?
echo "--- the untimed tests, run beside the cluster's at nice 19:"
cat "$untimed_log"
rm -f "$untimed_log"
# Each lane prints its slowest tests, and this script the tests' time; .ci/run holds CI's 20-minute budget.
# pytest's 5 (nothing selected) is a failure only when no lane ran a test.
status=0
for lane in "$timed" "$cluster" "$untimed"; do
    if [ "$lane" -ne 0 ] && [ "$lane" -ne 5 ] && [ "$status" -eq 0 ]; then
        status=$lane
    fi
done
if [ "$timed" -eq 5 ] && [ "$cluster" -eq 5 ] && [ "$untimed" -eq 5 ]; then
    status=5
fi
took=$(( $(date +%s) - started ))
echo "tests took $((took / 60)) min $((took % 60)) s"
exit "$status"
