"""The project stands alone and its imports run one way: kernels <- engine <- profiling <-
scripts. No file imports upward, cites a document outside the repository, or is named for an
issue or a pass."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "engine", "profiling", "scripts"]


def _files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return [f for f in out.splitlines() if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", LAYERS[:-1])
def test_imports_run_one_way(package):
    above = set(LAYERS[LAYERS.index(package) + 1 :])
    bad = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & above)
        for path in sorted((ROOT / package).rglob("*.py"))
        if _imports(path) & above
    }
    assert not bad, f"{package} imports from above it: {bad}"


def test_no_document_outside_the_repository_is_cited():
    pattern = re.compile(r"DESIGN\.md|GPU\.md|\.\./shared|\bD(?:[1-9]|10)\b(?![-\w])")
    cited = [
        f
        for f in _files()
        if f.endswith((".py", ".md", ".ini", ".toml", ".sh"))
        and not f.startswith("results/")
        and pattern.search((ROOT / f).read_text(errors="ignore"))
    ]
    assert not cited, f"these files cite documents outside the repository: {cited}"


def test_no_file_is_named_for_an_issue_or_a_pass():
    named = [f for f in _files() if re.search(r"(^|/)(issue[0-9_-]|.*_pass_?[0-9])", f)]
    assert not named, named
