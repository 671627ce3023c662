"""One-off: results/runs.jsonl from the run folders results/INDEX.md lists (date, commit,
command and GPUs from its table; every figure from the folder's files, by scripts.runs)."""

import re
import sys
from pathlib import Path

from scripts import runs

INDEX = runs.ROOT / "results" / "INDEX.md"


def rows():
    for s in INDEX.read_text().splitlines():
        cells = [c.strip() for c in s.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`2026"):
            yield cells


def main():
    out, last_gpus = [], None
    for folder, device, when, commit, command, _ in rows():
        name = folder.strip("`/")
        date, _, times = when.partition(" ")
        sha = re.search(r"\b[0-9a-f]{7}\b", commit).group(0)
        command = command.replace("`", "").replace("OUT=$OUT ", "")
        head = re.sub(r"`[^`]*`", "", device).split("(")[0].strip().rstrip(",")
        if head.startswith(("NVIDIA", "2x NVIDIA")):
            n, _, gpu = head.partition("x ") if head.startswith("2x") else ("1", "", head)
            gpus = [gpu.split(",")[0].strip()] * int(n)
        else:
            gpus = last_gpus
        rec = runs.line(
            runs.ROOT / "results" / name, name=name, date=date, commit=sha, command=command,
            time_utc=times, gpus=gpus,
        )  # fmt: skip
        last_gpus = rec["gpus"]
        out.append(rec)
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else runs.RUNS
    path.unlink(missing_ok=True)
    for rec in out:
        runs.append(rec, path)
    print(f"{len(out)} runs into {path}")


if __name__ == "__main__":
    main()
