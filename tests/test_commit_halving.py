"""report/commit-halving.sh: results are committed without the optimizer checkpoints unless
asked, so a session's submission stays under the diff limit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "report" / "commit-halving.sh"
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, text=True,
                          capture_output=True).stdout


def test_results_go_in_and_checkpoints_only_when_asked(tmp_path):
    repo = tmp_path / "repo"
    (repo / "report").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "report" / SCRIPT.name)
    run = repo / "report" / "results" / "halving" / "r2-1" / "train"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "state.pt").write_bytes(b"\0" * 1000)
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
         "-m", "base")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "SINCE": "HEAD"}

    def commit(*args):
        return subprocess.run(["bash", str(repo / "report" / SCRIPT.name), *args], env=env,
                              check=True, text=True, capture_output=True).stdout

    out = commit("results")
    tracked = _git(repo, "ls-files").split()
    assert "report/results/halving/r2-1/train/metrics.jsonl" in tracked
    assert "report/results/halving/r2-1/train/state.pt" not in tracked
    assert "left uncommitted: 1 checkpoint" in out and "MiB of diffs" in out
    out = commit("checkpoints", "--checkpoints")
    assert "report/results/halving/r2-1/train/state.pt" in _git(repo, "ls-files").split()
    assert "left uncommitted" not in out
    (run / "state.pt").unlink()  # a pruned checkpoint: its deletion waits for --checkpoints too
    assert commit("nothing").startswith("nothing to commit")
    commit("prune", "--checkpoints")
    assert "state.pt" not in _git(repo, "ls-files")
