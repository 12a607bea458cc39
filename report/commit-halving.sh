#!/usr/bin/env bash
# Commit the halving sweep's results (report/results/halving) without its optimizer checkpoints,
# unless asked: every change of a ~6.6 MB train/state.pt adds ~10 MB of binary diff, and one
# session's commits may add up to at most 256 MiB of diffs (a submission over that does not land,
# and all of its work is lost: session 20's was). Commit checkpoints once or twice a session, the
# last time just before the session ends. Usage, from the checkout:
#   bash report/commit-halving.sh "MESSAGE" [--checkpoints]
# Prints the commit's diff size and, with SINCE=<rev> (the session's first commit's parent), the
# diffs of every commit since then, against that limit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
msg=${1:?usage: commit-halving.sh MESSAGE [--checkpoints]}
dir=report/results/halving
if ! git diff --cached --quiet -- . ":(exclude)$dir"; then
  echo "other changes are staged; commit or unstage them first (this commits $dir only)" >&2
  exit 2
fi
if [[ ${2:-} == --checkpoints ]]; then
  git add -A -- "$dir"
else
  git add -A -- "$dir" ":(exclude,glob)$dir/**/state*.pt"
fi
if git diff --cached --quiet; then
  echo "nothing to commit in $dir"
  exit 0
fi
git commit -q -m "$msg"
bytes() { git show --binary --format= "$1" | wc -c; }
echo "committed $(git rev-parse --short HEAD): $(( $(bytes HEAD) / 1048576 )) MiB of diff"
if [[ -n ${SINCE:-} ]]; then
  total=0
  for c in $(git rev-list "$SINCE"..HEAD); do total=$(( total + $(bytes "$c") )); done
  echo "since $SINCE: $(( total / 1048576 )) MiB of diffs of the 256 MiB a submission may add up to"
fi
left=$(git status --porcelain -uall -- "$dir" | grep -c 'state.*\.pt' || true)
[[ $left == 0 ]] || echo "left uncommitted: $left checkpoint file(s) (commit them with --checkpoints before the session ends)"
