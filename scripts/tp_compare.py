"""Decode tok/s of runs of ``python -m profiling measure`` side by side (e.g. TP=1 and TP=2
of one model from one GPU pass): one line per run.

    python -m scripts.tp_compare RUN_DIR_OR_JSON ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def line(path: Path) -> str:
    run = json.loads((path / "run.json" if path.is_dir() else path).read_text())
    model = run["model"]
    parts = []
    for key, b in run.get("e2e", {}).items():
        default, gain = b["variants"]["default"]["median"], b["speedups"]["all"]["median"]
        parts.append(f"{key}: default {default:.1f} tok/s, all {gain:.3f}x")
    skipped = [r["name"] for r in run.get("numerics", []) if "skipped" in r]
    failed = [r["name"] for r in run.get("numerics", []) if not r["ok"]]
    config = model["config"]
    return (
        f"{path}: TP={model.get('tp', 1)}, hidden {config['hidden_size']}, "
        f"{config['num_hidden_layers']} layers | {'; '.join(parts) or 'no decode timed'} | "
        f"numerics failed: {', '.join(failed) or 'none'}; skipped: {', '.join(skipped) or 'none'}"
    )


def main(argv: list[str] | None = None) -> int:
    paths = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("error: give one or more run folders or run.json files", file=sys.stderr)
        return 2
    for path in paths:
        print(line(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
