"""perf/revisions.py runs an earlier revision's servers from a git worktree: its code,
every package of it (``gpserve.workers`` and ``gpserve.cache`` live in top-level folders
that the installed package maps), not this tree's. Checked here on HEAD."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))
import revisions  # noqa: E402


def test_a_revision_checked_out_imports_its_own_code(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                      capture_output=True).returncode:
        pytest.skip("not a git checkout: perf/revisions.py compares git revisions")
    tree = revisions.checkout("HEAD", tmp_path / "base")
    try:
        found = subprocess.run(
            [sys.executable, "-c", "import gpserve.inflight, gpserve.workers.worker, "
             "gpserve.cache.keys as k; print(gpserve.inflight.__file__, "
             "gpserve.workers.worker.__file__, k.__file__)"],
            env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, cwd=str(tree),
            capture_output=True, text=True, check=True).stdout.split()
        assert len(found) == 3
        assert all(Path(f).resolve().is_relative_to(tree.resolve()) for f in found), found
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=True)
