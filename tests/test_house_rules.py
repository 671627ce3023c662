"""The project stands alone and its imports run one way: kernels <- engine <- profiling <-
scripts. No file imports upward, cites a document outside the repository or a repository path
that does not exist, speaks of how it was built, or is named for an issue or a pass; the
README stays a guide (at most README_MAX_LINES lines)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "engine", "profiling", "scripts"]
README_MAX_LINES = 170
TEXT = (".py", ".md", ".ini", ".toml", ".sh")
# Top-level folders a path in the text may start with.
TOP = ("kernels", "engine", "profiling", "scripts", "tests", "docs", "results", "perf_baselines")
# A path: backticked, or bare and starting with a top-level folder.
_PATH = re.compile(r"`([\w./-]+/[\w./-]*)`|(?<![\w./<{`-])((?:" + "|".join(TOP) + r")/[\w./-]*)")
# A kernel named in prose must exist in the code.
_KERNEL = re.compile(r"`(_\w+_kernel)`")
# How the product was built is not the product's business: no session diaries, no tooling.
_BUILT = re.compile(r"\b(?:this|next|earlier|previous) session\b|device tool|\blease\b|\$OUT\b")


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


def _product(files: list[str]) -> list[str]:
    """The tracked text files, less the raw data of results/ and tests/data/."""
    return [f for f in files if f.endswith(TEXT) and not f.startswith(("results/2", "tests/data/"))]


def missing_paths(text: str, exists=lambda p: (ROOT / p).exists()) -> list[str]:
    """Repository paths ``text`` cites that do not exist (placeholders and globs aside)."""
    missing = []
    for m in _PATH.finditer(text):
        path = (m.group(1) or m.group(2)).rstrip(".,:;")
        after = text[m.end() : m.end() + 1]
        if path.split("/")[0] not in TOP or "..." in path or (after and after in "<{*"):
            continue  # not a repository path, or a pattern (a placeholder, a glob)
        if m.group(2) and not (path.endswith("/") or "." in path.rsplit("/", 1)[-1]):
            continue  # bare words such as "kernels/step" are a unit, not a path
        if not exists(path):
            missing.append(path)
    return missing


def missing_kernels(text: str, code: str) -> list[str]:
    return [k for k in _KERNEL.findall(text) if f"def {k}(" not in code]


def built_words(text: str) -> list[str]:
    return _BUILT.findall(text)


def test_every_cited_path_and_kernel_exists():
    files = _files()
    code = "\n".join((ROOT / f).read_text(errors="ignore") for f in files if f.endswith(".py"))
    bad = {}
    for f in _product(files):
        if f == "tests/test_house_rules.py":
            continue  # plants what it forbids
        text = (ROOT / f).read_text(errors="ignore")
        if found := missing_paths(text) + missing_kernels(text, code):
            bad[f] = found
    assert not bad, f"these files cite what does not exist: {bad}"


def test_nothing_speaks_of_how_it_was_built():
    bad = {}
    for f in _product(_files()):
        found = built_words((ROOT / f).read_text(errors="ignore"))
        if f == "scripts/gpu_pass.sh":  # its output folder's variable, named in its header
            found = [w for w in found if w != "$OUT"]
        if found:
            bad[f] = sorted(set(found))
        if f == "tests/test_house_rules.py":
            bad.pop(f, None)  # names the words it forbids
    assert not bad, bad


def test_the_readme_is_a_guide():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): tables go to docs/measured.md, "
        "history to docs/notes.md"
    )


def test_the_checks_catch_what_they_forbid():
    """Planted lines fail each check; their fixed versions pass."""
    assert missing_paths("see `kernels/no_such_kernel.py` and results/2026-01-01-x/run.json") == [
        "kernels/no_such_kernel.py",
        "results/2026-01-01-x/run.json",
    ]
    assert missing_paths("perf_baselines/.../throughput.json, `perf_baselines/<gpu-slug>/`") == []
    assert missing_paths("see `kernels/linear_residual.py` and docs/definitions.md") == []
    assert missing_kernels("the `_gone_tma_kernel` path", "def _here_kernel(") == [
        "_gone_tma_kernel"
    ]
    assert missing_kernels("the `_here_kernel` path", "def _here_kernel(") == []
    assert built_words("measured in this session by the device tool, OUT=$OUT")
    assert not built_words("measured on one H100 at 16fe0b1")


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
