#!/usr/bin/env bash
# Continue the halving sweep (report/results/halving) in the background, from a worktree of a
# fixed commit, so that code edited meanwhile never changes the run. Usage, from the checkout:
#   bash report/run-halving.sh [COMMIT]        (default: HEAD)   -> log in /work/halving.log
# Commit what it finishes with report/commit-halving.sh (checkpoints once or twice a session).
# Needs: .venv with qwenlite's dependencies, $QWENLITE_WEIGHTS (the stand-in), ../shared.
# Times training on this CPU first if calibration.json has no timing from a CPU like it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$repo" rev-parse "${1:-HEAD}")
wt=/work/wt-sweep-${commit:0:8}
[ -d "$wt" ] || git -C "$repo" worktree add -q --detach "$wt" "$commit"
out="$repo/report/results/halving"
data="$repo/../shared/data/lotka_volterra_data.h5"
cd "$wt"
nohup bash -c "
  . '$repo/.venv/bin/activate'
  export PYTHONPATH='$wt/src'
  cpu=\$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
  if ! grep -qF \"\\\"cpu\\\": \\\"\$cpu\\\"\" '$out/calibration.json' 2>/dev/null; then
    python -m qwenlite.sweep calibrate --out '$out' --data '$data'
  fi
  python -m qwenlite.sweep run --out '$out' --data '$data' --no-progress
" > /work/halving.log 2>&1 &
echo "halving sweep at ${commit:0:8} running in the background (pid $!): tail -f /work/halving.log"
