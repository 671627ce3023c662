"""README.md's generated figures equal what scripts.measured_tables renders from the committed
files they cite: a new baseline or report without a regenerated README fails here, and so does
a README figure edited by hand."""

from __future__ import annotations

import json

from scripts import measured_tables


def test_the_readme_block_is_the_committed_files_rendered():
    block = measured_tables.readme_block(measured_tables.README.read_text())
    assert block is not None, "README.md lost its generated block (markers)"
    assert block == measured_tables.render(), (
        "README.md's measured tables differ from the files they cite: "
        "python -m scripts.measured_tables --write"
    )


def test_a_changed_figure_changes_the_block(monkeypatch):
    """The rendering reads the figures: a baseline whose batch-1 default moves renders anew."""
    original = measured_tables._load

    def moved(name):
        data = original(name)
        if name == "baseline":
            data = json.loads(json.dumps(data))
            data["e2e"]["b1"]["variants"]["default"]["median"] *= 0.9
        return data

    before = measured_tables.render()
    monkeypatch.setattr(measured_tables, "_load", moved)
    assert measured_tables.render() != before
