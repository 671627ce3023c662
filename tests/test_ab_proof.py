"""scripts.ab_proof prepares what the A/B is proved on (a GPU runs it): a clone of HEAD with a
planted slowdown as an uncommitted edit, and a history whose one planted commit bisect must
find. CPU: the clone, each plant's anchor and the history's shape."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from scripts import ab_proof


def _git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=tree, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.parametrize("name", [p for p in ab_proof.PLANTS if p != "none"])
def test_a_plant_is_one_uncommitted_edit_of_the_kernel(tmp_path, name):
    tree = ab_proof.clone(tmp_path / "tree")
    assert _git(tree, "rev-parse", "HEAD") == _git(ab_proof.ROOT, "rev-parse", "HEAD")
    ab_proof.plant(tree, name)
    assert _git(tree, "diff", "--name-only").splitlines() == [ab_proof.PLANTS[name][0]]
    assert "planted" in _git(tree, "diff")


def test_no_plant_leaves_the_clone_clean(tmp_path):
    tree = ab_proof.clone(tmp_path / "tree")
    ab_proof.plant(tree, "none")
    assert _git(tree, "status", "--porcelain") == ""


def test_the_bisect_history_has_one_planted_commit(tmp_path):
    tree = ab_proof.clone(tmp_path / "tree")
    start = _git(tree, "rev-parse", "HEAD")
    ab_proof.bisect_history(tree, "kernel_3pct")
    assert _git(tree, "rev-parse", "HEAD~7") == start
    subjects = _git(tree, "log", "--format=%s", "HEAD~7..HEAD").splitlines()
    assert subjects.count(ab_proof.BISECT_SUBJECT) == 1 and len(subjects) == 7
    planted = ab_proof._head_of(tree, ab_proof.BISECT_SUBJECT)
    assert _git(tree, "rev-parse", "HEAD~3") == planted
    changed = _git(tree, "diff", "--name-only", "HEAD~7", "HEAD").splitlines()
    assert changed == ["kernels/linear_residual.py"]
