"""Schema and types of a run file (``measure``/``gate --out``, or a baseline) before it is used.

``record --combine`` reads runs that a person names: a run whose figures are strings, or a file
that is not a run at all, must be an error naming the file and the field, not a TypeError from
deep inside the median. Baselines have their own, stricter check (baselines.validate).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class RunError(ValueError):
    """A run file that cannot be used: the message names the file and what is wrong."""


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _object(x) -> bool:
    return isinstance(x, dict)


def run_problems(run) -> list[str]:
    """Every problem of a run's schema and types (empty: usable). Runs made without a GPU
    (no "e2e") are checked for their header only: ``record`` says why it cannot use them."""
    if not _object(run):
        got = {list: "a list", str: "a string"}.get(type(run), type(run).__name__)
        return [f"the top level is {got}, not a JSON object (a run from measure or gate --out)"]
    p: list[str] = []
    for field in ("gpu", "gpu_slug"):
        if not isinstance(run.get(field), str):
            p.append(f"{field!r} is not a string")
    model, plan = run.get("model"), run.get("plan")
    if not _object(model):
        p.append("'model' is not an object")
    else:
        config = model.get("config")
        if not _object(config) or not all(_number(v) for v in config.values()):
            p.append("model.config is not an object of numbers")
        if not isinstance(model.get("dtype"), str):
            p.append("model.dtype is not a string")
        if not _object(model.get("fusions")):
            p.append("model.fusions is not an object")
    if not _object(plan):
        p.append("'plan' is not an object")
    if "numerics" in run:
        numerics = run["numerics"]
        ok = isinstance(numerics, list) and all(
            _object(r) and isinstance(r.get("ok"), bool) for r in numerics
        )
        if not ok:
            p.append("numerics is not a list of results with a boolean 'ok'")
    if "e2e" not in run:
        return p
    launches = run.get("launches")
    if not _object(launches) or not launches:
        p.append("'launches' is not a non-empty object")
    else:
        for key, e in launches.items():
            counts = ("kernels_per_step", "memcpy_per_step", "memset_per_step")
            if not _object(e) or not all(_number(e.get(k)) for k in counts):
                p.append(f"launches.{key} lacks numeric {', '.join(counts)}")
            elif not _object(e.get("segments")) or not all(
                _object(s) and _number(s.get("instances")) and _number(s.get("per_instance"))
                for s in e["segments"].values()
            ):
                p.append(f"launches.{key}.segments lack numeric instances/per_instance")
    ratios = run.get("kernel_ratios")
    if not _object(ratios) or not ratios:
        p.append("'kernel_ratios' is not a non-empty object")
    else:
        for key, e in ratios.items():
            if not _object(e) or not all(
                _number(e.get(k)) for k in ("ratio", "fused_us", "reference_us")
            ):
                p.append(f"kernel_ratios.{key} lacks numeric ratio, fused_us, reference_us")
    e2e = run["e2e"]
    if not _object(e2e) or not e2e:
        p.append("'e2e' is not a non-empty object")
        return p
    for key, b in e2e.items():
        if not _object(b):
            p.append(f"e2e.{key} is not an object")
            continue
        for part in ("variants", "speedups"):
            entries = b.get(part)
            if not _object(entries) or not entries:
                p.append(f"e2e.{key}.{part} is not a non-empty object")
                continue
            for name, v in entries.items():
                if not _object(v) or not _number(v.get("median")):
                    p.append(f"e2e.{key}.{part}.{name} lacks a numeric median")
    return p


def read_runs(paths) -> list[dict]:
    """The runs in ``paths``, each read and checked; RunError names the first bad file."""
    runs = []
    for path in map(Path, paths):
        try:
            run = json.loads(path.read_text())
        except OSError as exc:
            raise RunError(f"--combine {path}: cannot read it ({exc.strerror or exc})") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(f"--combine {path}: not valid JSON ({exc})") from exc
        problems = run_problems(run)
        if problems:
            shown = "; ".join(problems[:4])
            more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
            raise RunError(f"--combine {path}: not a usable run ({shown}{more})")
        runs.append(run)
    return runs
