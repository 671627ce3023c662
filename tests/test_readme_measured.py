"""docs/measured.md and README.md's generated blocks equal what scripts.measured_tables renders
from the committed files they cite: a new baseline, report or line of results/runs.jsonl
without regenerated documents fails here, and so does a figure edited by hand."""

from __future__ import annotations

import json
import subprocess

import pytest

from scripts import measured_tables


def test_docs_measured_is_the_committed_files_rendered():
    assert measured_tables.MEASURED.read_text() == measured_tables.render_measured(), (
        f"docs/measured.md differs from the files it cites: {measured_tables.WRITE}"
    )


@pytest.mark.parametrize("name", sorted(measured_tables.readme_blocks()))
def test_the_readme_blocks_are_the_committed_files_rendered(name):
    suite = measured_tables.last_suite(measured_tables._load("runs"))
    if name == "GPU suite status" and measured_tables.changed_since(suite["commit"]) is None:
        pytest.skip(
            f"not a git checkout holding {suite['commit']}: whether the GPU code changed since "
            "the last GPU suite run cannot be told here"
        )
    block = measured_tables.readme_block(measured_tables.README.read_text(), name)
    assert block is not None, f"README.md lost its generated block {name!r} (markers)"
    assert block == measured_tables.readme_blocks()[name], (
        f"README.md's {name} differ from the files they cite: {measured_tables.WRITE}"
    )


def test_a_changed_figure_changes_what_is_rendered(monkeypatch):
    """The rendering reads the figures: a moved baseline or a new suite run renders anew."""
    original = measured_tables._load

    def moved(name):
        data = json.loads(json.dumps(original(name)))
        if name == "baseline":
            data["e2e"]["b1"]["variants"]["default"]["median"] *= 0.9
        if name == "runs":
            last = [r for r in data if "suite" in r["figures"]][-1]
            data.append({**last, "run": "later", "commit": "fedcba9"})
        return data

    page, blocks = measured_tables.render_measured(), measured_tables.readme_blocks()
    monkeypatch.setattr(measured_tables, "_load", moved)
    assert measured_tables.render_measured() != page
    moved_blocks = measured_tables.readme_blocks()
    assert all(moved_blocks[k] != blocks[k] for k in blocks)
    assert "fedcba9" in moved_blocks["GPU suite status"]


def test_the_suite_status_says_whether_the_gpu_code_changed_since(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("docs\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    assert measured_tables.changed_since("HEAD", tmp_path) is False
    (tmp_path / "README.md").write_text("docs changed\n")
    assert measured_tables.changed_since("HEAD", tmp_path) is False
    (tmp_path / "kernels" / "k.py").write_text("x = 2\n")
    assert measured_tables.changed_since("HEAD", tmp_path) is True
    assert measured_tables.changed_since("0123456789abcdef", tmp_path) is None
