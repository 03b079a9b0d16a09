#!/usr/bin/env bash
# Capture real Slurm task environments of steps that differ from their allocation, for tests/test_ranks.py.
#
#   bash scripts/capture-slurm-steps.sh [OUT.json]     # default tests/data/slurm_steps.json; needs 3 idle nodes
#
# One 3-node allocation (6 tasks), then steps: on 2 of its nodes (-r1), the same under srun -E (which keeps
# the allocation's SLURM_NTASKS/SLURM_TASKS_PER_NODE), 5 tasks over 3 nodes, and -w n3,n1 with 3 tasks.
set -euo pipefail
out=${1:-"$(cd "$(dirname "$0")/.." && pwd)/tests/data/slurm_steps.json"}
partition=${PARTITION:-debug}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dump='import json, os, sys; json.dump({k: v for k, v in sorted(os.environ.items()) if k.startswith(("SLURM_", "SLURMD_"))}, open(sys.argv[1] + "-" + os.environ["SLURM_PROCID"] + ".json", "w"))'
# shellcheck disable=SC2016  # the steps' variables expand inside the allocation
salloc -N3 -n6 -p "$partition" -t 2 bash -c '
set -e
srun -N2 -n2 -r1 python3 -c "$1" "$2/partial"
srun -E -N2 -n2 -r1 python3 -c "$1" "$2/preserve-env"
srun -N3 -n5 python3 -c "$1" "$2/uneven"
srun -w "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 3p),$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)" -N2 -n3 python3 -c "$1" "$2/two-of-three"
' _ "$dump" "$work"
python3 - "$work" "$out" <<'PY'
import json, pathlib, re, sys
steps = {}
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    name, procid = path.stem.rsplit("-", 1)
    steps.setdefault(name, {})[int(procid)] = json.loads(path.read_text())
data = {name: [tasks[i] for i in sorted(tasks)] for name, tasks in sorted(steps.items())}
pathlib.Path(sys.argv[2]).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
print(f"wrote {sys.argv[2]}: " + ", ".join(f"{k} ({len(v)} tasks)" for k, v in data.items()))
PY
