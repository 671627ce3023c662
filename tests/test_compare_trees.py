"""scripts.compare_trees: the A/B of two source trees on one GPU. CPU: its argument errors,
and that runs alternate and the summary is the median of each tree's runs (the per-process
timing is profiling.throughput's, tested with it; here a stand-in returns fresh numbers)."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from scripts import compare_trees

REPO = Path(__file__).resolve().parents[1]


def test_a_path_that_is_not_a_tree_is_refused(tmp_path, capsys):
    assert compare_trees.main([str(tmp_path), str(REPO)]) == 2
    assert "base=" in capsys.readouterr().err
    assert compare_trees.main([str(REPO), str(REPO), "--rounds", "3"]) == 2
    assert "--rounds" in capsys.readouterr().err


def test_runs_alternate_and_the_summary_is_each_trees_median(tmp_path, monkeypatch):
    calls, drawn = [], {"base": [], "new": []}
    rng = random.Random()
    base_tree, new_tree = tmp_path / "base", tmp_path / "new"
    for tree in (base_tree, new_tree):
        (tree / "engine").mkdir(parents=True)

    def fake_run(tree, batches, rounds):
        name = tree.name
        calls.append(name)
        rates = {b: rng.uniform(100, 200) * b for b in batches}
        drawn[name].append(rates)
        return rates

    monkeypatch.setattr(compare_trees, "run_tree", fake_run)
    out = tmp_path / "ab.json"
    args = [str(base_tree), str(new_tree), "--runs", "3", "--batches", "1", "8", "--out", str(out)]
    assert compare_trees.main(args) == 0
    assert calls == ["base", "new"] * 3
    summary = json.loads(out.read_text())["summary"]
    for b in (1, 8):
        base = statistics.median(r[b] for r in drawn["base"])
        new = statistics.median(r[b] for r in drawn["new"])
        assert summary[str(b)]["base"] == base and summary[str(b)]["new"] == new
        assert summary[str(b)]["new/base"] == new / base
