"""results/runs.jsonl: the record of GPU runs, one JSON object a line, appended, never edited.

    python -m scripts.runs add PASS_DIR --command "bash scripts/gpu_pass.sh env record gate"
    python -m scripts.runs show PASS_DIR        # the line ``add`` would append, not appended

PASS_DIR is what one ``scripts/gpu_pass.sh`` run wrote (its ``pass/`` folder, unpacked from
``pass.tar.gz``). Every figure of the line is read from the files there by ``figures``:
nothing is typed in. A line holds the run's name, date, GPU(s), driver, torch, triton, commit,
command and, per step the run took, its figures (gate verdict, suite counts, decode tok/s,
tuned launch configurations, A/B ratios, ...). docs/measured.md and README.md quote runs by
name (scripts/measured_tables.py renders them).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "results" / "runs.jsonl"

_SMI_GPU = re.compile(r"^\|\s+\d+\s+(NVIDIA [^|]*?)\s{2,}(?:On|Off)\s+\|", re.M)
_DRIVER = re.compile(r"Driver Version:\s*(\S+)")
_VERSIONS = re.compile(r"^torch (\S+) triton (\S+)$", re.M)
_COMMIT = re.compile(r"^commit (\S+)$", re.M)
_DATE = re.compile(r"^\w{3} (\w{3}) +(\d+) .*UTC (\d{4})$", re.M)
_GATE = re.compile(r"^gate: (PASS|FAIL) \((\d+) checks")
_GATE_TIME = re.compile(r"^gate time: (\d+) s")
_GATE_NOT_RUN = re.compile(r"^GATE NOT RUN: (.*)")
_PYTEST = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in ([\d.]+)s")
_TUNE = re.compile(
    r"^(\w+) N=(\d+) K=(\d+) M=(\d+): best ([\d.]+) us .*\(heuristic ([\d.]+) us\)$", re.M
)
_TP_LINE = re.compile(
    r"TP=(\d+), hidden (\d+), (\d+) layers \| b1: default ([\d.]+) tok/s, all ([\d.]+)x"
)
_AR_TIME = re.compile(
    r"^\[(\d+), (\d+)\] (\w+): one-shot ([\d.]+) µs, NCCL \+ add ([\d.]+) µs", re.M
)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_counts(text: str) -> dict:
    """The pytest summary of a log ({'passed': n, 'failed': n, ..., 'seconds': s}), or, when the
    log has none (cut short), the dots and letters of its progress lines."""
    for line in reversed(text.splitlines()):
        m = _PYTEST.match(line.strip())
        if m:
            counts = {w: int(n) for n, w in (p.split(" ") for p in m.group(1).split(", "))}
            return {**counts, "seconds": round(float(m.group(2)), 1)}
    progress = "".join(re.findall(r"^([.FEsx]+)(?:\s+\[|$)", text, re.M))
    return {"cut_short": True, "passed": progress.count("."), "failed": progress.count("F")}


def gate_figures(text: str) -> dict | None:
    found: dict = {}
    for line in text.splitlines():
        if m := _GATE.match(line):
            found.update(verdict=m.group(1), checks=int(m.group(2)))
        elif m := _GATE_TIME.match(line):
            found["seconds"] = int(m.group(1))
        elif m := _GATE_NOT_RUN.match(line):
            found.update(verdict="NOT RUN", reason=m.group(1).split(":")[0])
    return found or None


def decode_figures(run: dict) -> dict:
    """Decode tok/s, speed-ups and kernels per token of a run, report or baseline JSON."""
    out: dict = {"commit": run.get("commit"), "gpu": run.get("gpu")}
    if "combined_runs" in run:
        out["processes"] = len(run["combined_runs"])
    for key, b in sorted(run.get("e2e", {}).items()):
        v, s = b.get("variants", {}), b.get("speedups", {})
        row = {name: round(x["median"], 1) for name, x in v.items() if name in ("default", "none")}
        if "all" in s:
            row["speedup_all"] = round(s["all"]["median"], 3)
        out[key] = row
    launches = run.get("launches", {})
    for variant in ("default", "none"):
        if f"{variant}/graph-b1" in launches:
            out[f"kernels_per_token_{variant}"] = launches[f"{variant}/graph-b1"][
                "kernels_per_step"
            ]
    return out


def proof_figures(data: dict | list) -> dict:
    """Counts and each gate's verdict of a planted-regression proof (scripts.gate_proof's
    proof.json, or the list ``--rejudge`` writes)."""
    results = data["results"] if isinstance(data, dict) else data
    unchanged = [r for r in results if r["label"].startswith("unchanged")]
    plants = [r for r in results if not r["label"].startswith("unchanged")]
    out = {
        "unchanged_passed": sum(r["verdict"] == "PASS" for r in unchanged),
        "unchanged_runs": len(unchanged),
        "plants_failed": sum(r["verdict"] == "FAIL" for r in plants),
        "plants": len(plants),
        "verdicts": {r["label"]: r["verdict"] for r in results},
    }
    if isinstance(data, dict) and "max_gate_seconds" in data:
        out["max_gate_seconds"] = data["max_gate_seconds"]
    return out


def _bench(data: dict) -> dict:
    rows = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "us_per_call" in info:
            # the out-of-place benchmark of linear_residual is no fusion step
            key = f"{info.get('fusion', 'out_of_place')}/{info['size']}/M={info['M']}"
            rows[key] = {k: round(v, 3) for k, v in info["us_per_call"].items()}
    return rows


def tune_figures(text: str) -> list[dict]:
    """Each tuned bucket's best and heuristic µs (profiling.tune's log lines)."""
    return [
        {"fusion": f, "N": int(n), "K": int(k), "M": int(m), "best_us": float(b),
         "heuristic_us": float(h)}
        for f, n, k, m, b, h in _TUNE.findall(text)
    ]  # fmt: skip


_BENCH_VERDICT = re.compile(r"^bench: (PASS|FAIL) \((\d+) of (\d+) slower\)", re.M)
_BENCH_ROW = re.compile(
    r"^(\S+)\s+(\w+)\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)%\s+([\d.]+)%\s+(ok|SLOWER)$", re.M
)
_CLI_DECODE = re.compile(r"^decode: ([\d.]+) tok/s", re.M)


def bench_verdict(text: str) -> dict | None:
    """``python -m profiling bench``'s verdict and its gated rows (change and limit, %)."""
    m = _BENCH_VERDICT.search(text)
    if m is None:
        return None
    rows = {
        name: {"path": path, "change_pct": float(change), "limit_pct": float(limit), "verdict": v}
        for name, path, _, _, change, limit, v in _BENCH_ROW.findall(text)
    }
    return {"verdict": m.group(1), "slower": int(m.group(2)), "benchmarks": int(m.group(3)),
            "rows": rows}  # fmt: skip


_STAGE_TIMES = re.compile(r"^stage times: (.*)$", re.M)
_ONBOARD_TIME = re.compile(r"^onboarding time: (\d+) s", re.M)


def onboard_figures(text: str) -> dict:
    """``python -m profiling onboard``: its tuning results, stage times, total and gate."""
    out: dict = {"tune": tune_figures(text)}
    if m := _STAGE_TIMES.search(text):
        out["stage_s"] = {
            name: int(sec) for name, sec in re.findall(r"([\w ]+?) (\d+) s(?:, |$)", m.group(1))
        }
    if m := _ONBOARD_TIME.search(text):
        out["total_s"] = int(m.group(1))
    if g := gate_figures(text):
        out["gate"] = g
    return out


def figures(folder: Path) -> dict:
    """Every figure a pass folder's files hold, keyed by step (the log's or folder's name)."""
    folder = Path(folder)
    out: dict = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        name = path.stem
        if path.suffix == ".log" and (rel.count("/") == 0 or rel.startswith("lab/")):
            text = path.read_text(errors="replace")
            if name in ("gate", "tpgate"):
                if g := gate_figures(text):
                    out[name] = g
            elif name == "suite":
                out[name] = {
                    "pytest": [
                        pytest_counts(part)
                        for part in re.split(r"^--- python -m pytest.*$", text, flags=re.M)
                        if _PYTEST.search(part) or re.search(r"^[.FEsx]+", part, re.M)
                    ]
                }
                if g := gate_figures(text):
                    out[name]["gate"] = g
            elif name in ("check", "tptests") or name.endswith("-tests"):
                out[name] = pytest_counts(text)
            elif name == "onboard":
                out[name] = onboard_figures(text)
            elif name.startswith("bench") and (b := bench_verdict(text)):
                out[name] = b
            elif name == "cli" and (m := _CLI_DECODE.search(text)):
                out[name] = {"engine_cli_decode_tok_s": float(m.group(1))}
            elif name == "tune":
                out[name] = tune_figures(text)
            elif name.endswith("-time"):
                out[name] = [
                    {"shape": [int(r), int(c)], "dtype": d, "one_shot_us": float(a),
                     "nccl_add_us": float(n)}
                    for r, c, d, a, n in _AR_TIME.findall(text)
                ]  # fmt: skip
        elif rel == "tp-8b.txt":
            out["tp"] = {
                f"tp{t}": {"hidden": int(h), "layers": int(n), "b1_default": float(d),
                           "speedup_all": float(a)}
                for t, h, n, d, a in _TP_LINE.findall(path.read_text())
            }  # fmt: skip
        elif path.suffix == ".json":
            data = _json(path)
            if data is None:
                continue
            if re.fullmatch(r"ab\d+\.json", rel):
                out[name] = {
                    "base": data["base"],
                    **{
                        f"b{b}": {
                            "base": round(s["base"], 1),
                            "new": round(s["new"], 1),
                            "new/base": round(s["new/base"], 4),
                        }
                        for b, s in data["summary"].items()
                    },
                }
            elif rel in ("baseline.json", "tp2-baseline.json", "baselines/baseline.json"):
                out[name.replace("-", "_")] = decode_figures(data)
            elif rel.endswith("proof.json") or rel.endswith("rejudged.json"):
                step = rel.split("/")[0] + ("_rejudged" if name == "rejudged" else "")
                out[step] = proof_figures(data)
            elif rel == "report/report.json":
                out["report"] = decode_figures(data)
                bd = data.get("breakdown", {})
                for variant in ("default", "none"):
                    if variant in bd:
                        out["report"][f"breakdown_us_{variant}"] = round(
                            bd[variant]["total_us_per_step"], 1
                        )
            elif rel.endswith("/run.json") and rel.count("/") <= 2:
                out[rel.rsplit("/", 2)[-2]] = decode_figures(data)
            elif rel.endswith("ncu_nvtx_check.json"):
                out["ncu"] = {
                    f: v["per_instance_per_step"] for f, v in data.items() if isinstance(v, dict)
                }
            elif rel.startswith("bench/") and "benchmarks" in data:
                out["bench"] = _bench(data)
            elif rel.startswith("baselines/") and "benchmarks" in data:
                out["bench_saved"] = _bench(data)
            elif "benchmarks" in data:
                out[name] = _bench(data)
    return out


def environment(folder: Path) -> dict:
    """GPU(s), driver, torch, triton, commit and date: from env.log, else from a run's JSON."""
    env: dict = {}
    log = Path(folder) / "env.log"
    if log.is_file():
        text = log.read_text(errors="replace")
        if gpus := _SMI_GPU.findall(text):
            env["gpus"] = gpus
        if m := _DRIVER.search(text):
            env["driver"] = m.group(1)
        if m := _VERSIONS.search(text):
            env["torch"], env["triton"] = m.groups()
        if m := _COMMIT.search(text):
            env["logs_commit"] = m.group(1)
        if m := _DATE.search(text):  # `date -u`: "Wed Nov 25 10:51:16 PM UTC 2026"
            month = "JanFebMarAprMayJunJulAugSepOctNovDec".index(m.group(1)) // 3 + 1
            env["date"] = f"{m.group(3)}-{month:02d}-{int(m.group(2)):02d}"
    for path in sorted(Path(folder).rglob("*.json")):
        data = _json(path)
        if isinstance(data, dict) and data.get("gpu") and data.get("torch"):
            env["gpu"] = data["gpu"]
            env.setdefault("torch", data["torch"])
            env.setdefault("triton", data.get("triton"))
            env.setdefault("logs_commit", data.get("commit"))
            env.setdefault("date", str(data.get("date", ""))[:10] or None)
            break
    return {k: v for k, v in env.items() if v}


def line(folder: Path, *, name: str, date: str, commit: str, command: str, **known) -> dict:
    """One line of runs.jsonl; ``known``: fields the folder does not hold (e.g. the GPUs of a
    run without env.log), kept only where the folder has nothing for them."""
    env = environment(folder)
    env.pop("date", None)  # the date given wins
    gpu = env.pop("gpu", None)
    if "gpus" not in env:  # no nvidia-smi listing: how many GPUs is only known from outside
        env["gpus"] = known.pop("gpus", None) or [gpu]
    known.pop("gpus", None)
    record = {"run": name, "date": date, **known, **env, "commit": commit, "command": command}
    if record.get("logs_commit") == commit:
        record.pop("logs_commit")
    record["figures"] = figures(folder)
    return record


def read(path: Path = RUNS) -> list[dict]:
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


def append(record: dict, path: Path = RUNS) -> None:
    names = {r["run"] for r in read(path)} if Path(path).is_file() else set()
    if record["run"] in names:
        raise ValueError(f"run {record['run']!r} is already in {path}: names are unique")
    with open(path, "a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["add", "show"])
    p.add_argument("folder", type=Path, help="the pass folder (scripts/gpu_pass.sh's pass/)")
    p.add_argument("--name", help="the run's name (default: <date>-<gpu>-<first step>)")
    p.add_argument("--date", help="YYYY-MM-DD (default: from env.log or a run's JSON)")
    p.add_argument("--commit", help="the commit run (default: the one env.log names)")
    p.add_argument("--command", required=True, help="the command that made the folder")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: folder: {args.folder} is not a directory", file=sys.stderr)
        return 2
    env = environment(args.folder)
    date = args.date or env.get("date")
    commit = args.commit or env.get("logs_commit")
    if not date or not commit:
        print("error: --date and --commit: not found in the folder, give them", file=sys.stderr)
        return 2
    gpus = env.get("gpus") or [env.get("gpu", "gpu")]
    gpu = re.sub(r"[^a-z0-9]+", "", gpus[0].lower().replace("nvidia", "").split()[0])
    name = args.name or f"{date}-{gpu}-{args.command.split()[-1].split(':')[0]}"
    record = line(args.folder, name=name, date=date, commit=commit, command=args.command)
    if args.action == "show":
        print(json.dumps(record, indent=1, ensure_ascii=False))
        return 0
    try:
        append(record)
    except ValueError as e:
        print(f"error: --name: {e}", file=sys.stderr)
        return 2
    print(f"appended {name} to {RUNS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
