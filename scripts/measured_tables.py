"""The measured figures of README.md and docs/measured.md, rendered from committed files: the
GPU baselines under perf_baselines/, the report whose time breakdown they quote, and
results/runs.jsonl (one line per GPU run).

    python -m scripts.measured_tables            # print docs/measured.md
    python -m scripts.measured_tables --write    # write docs/measured.md, README.md's blocks

docs/measured.md is generated whole; README.md holds two generated blocks (headline figures,
GPU suite status), each between its marker lines. tests/test_readme_measured.py fails when
either differs from what these files give, so a quoted figure cannot drift from its source.
After a GPU run: append it to results/runs.jsonl (python -m scripts.runs add), point SOURCES
or RUNS_QUOTED at what changed, and --write.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MEASURED = ROOT / "docs" / "measured.md"
WRITE = "python -m scripts.measured_tables --write"
SOURCES = {
    "baseline": "perf_baselines/nvidia-h100-80gb-hbm3/baseline.json",
    "baseline_h200": "perf_baselines/nvidia-h200/baseline.json",
    "bench_heuristic_h200": "results/2026-12-03-h200-retune-m8/bench-heuristic.json",
    "bench_tuned_h200": "perf_baselines/nvidia-h200/Linux-CPython-3.12-64bit/0002_kernels.json",
    "tp2_baseline": "perf_baselines/nvidia-h100-80gb-hbm3/tp2/baseline.json",
    "report": "results/2026-11-25-h100-record-prewait/report/report.json",
    "runs": "results/runs.jsonl",
}
# The runs of results/runs.jsonl that docs/measured.md quotes, by what they show.
RUNS_QUOTED = {
    "onboard": "2026-12-03-h200-onboard",
    "bench_gate": "2026-12-03-h200-suite",
    "engine_cli": "2026-12-03-h200-suite-cli",
    "prefill": "2026-11-25-h100x2-bench-branches",
    "tp": "2026-11-25-h100x2-tp-one-barrier",
    "all_reduce": "2026-11-25-h100x2-bench-branches",
    "ncu": "2026-11-25-h100x2-suite-ncu-bench",
    "proofs": [
        "2026-11-25-h100x2-proof-out-of-sample",
        "2026-11-25-h100x2-proof-unchanged",
        "2026-11-25-h100x2-tp-gate-proof",
    ],
}
# The one-launch peer of the linear+residual steps, as the kernel ratios name it.
PEER = "addmm_"


def _load(name: str):
    text = (ROOT / SOURCES[name]).read_text()
    if name == "runs":
        return [json.loads(s) for s in text.splitlines() if s.strip()]
    return json.loads(text)


def _run(runs: list[dict], name: str) -> dict:
    for r in runs:
        if r["run"] == name:
            return r
    raise KeyError(f"{SOURCES['runs']} has no run {name!r}")


def _where(r: dict) -> str:
    gpus = r["gpus"]
    gpu = f"{len(gpus)}x {gpus[0]}" if len(gpus) > 1 else gpus[0]
    logs = f" (its logs name {r['logs_commit'][:7]})" if r.get("logs_commit") else ""
    return f"run `{r['run']}`: commit {r['commit']}{logs}, {gpu}, {r['date']}"


# --- the baseline ----------------------------------------------------------------------------


def _decode(base: dict) -> list[str]:
    e2e, runs = base["e2e"], len(base.get("combined_runs", [1]))
    lines = [
        f"**Decode, CUDA graphs** (`{SOURCES['baseline']}`: commit {base['commit']}, "
        f"{base['date'][:10]}, {base['gpu']}; medians over {runs} runs in "
        f"separate processes, prompt {base['plan']['prompt_len']}, "
        f"{base['plan']['new_tokens']} new tokens, variants interleaved in each run):",
        "",
        "| batch | default fusions | none | speed-up |",
        "|---|---|---|---|",
    ]
    for key, b in sorted(e2e.items(), key=lambda kv: int(kv[0][1:])):
        v, s = b["variants"], b["speedups"]
        lines.append(
            f"| {key[1:]} | **{v['default']['median']:.1f} tok/s** | {v['none']['median']:.1f} "
            f"tok/s | {s['all']['median']:.3f}x |"
        )
    gains = {
        name: s["median"] for name, s in e2e[min(e2e, key=lambda k: int(k[1:]))]["speedups"].items()
    }
    gains.pop("all")
    lines += [
        "",
        "Each fusion's own gain at batch 1 (the variant with it over the same without it): "
        + ", ".join(f"{n} {g:.3f}x" for n, g in sorted(gains.items(), key=lambda kv: -kv[1]))
        + ".",
    ]
    return lines


def _launches(base: dict) -> list[str]:
    counts = {k: v["kernels_per_step"] for k, v in base["launches"].items()}
    default, none = counts["default/graph-b1"], counts["none/graph-b1"]
    same = counts.get("default/eager-b1") == default and counts.get("none/eager-b1") == none
    alt = {
        ", ".join(v["fusions"]): v["kernels_per_step"]
        for k, v in base["launches"].items()
        if k.startswith("alt+")
    }
    parts = [
        f"**Kernels per decoded token** (same file{', graph and eager agree' if same else ''}): "
        f"{default:.0f} with the default fusions, {none:.0f} with none"
    ]
    parts += [f"{v:.0f} with the alternative set ({k})" for k, v in sorted(alt.items())]
    return [", ".join(parts) + "."]


def _steps(base: dict) -> list[str]:
    ratios = base["kernel_ratios"]
    # Fusion steps (timed against their unfused ops); ops the step runs alone are not here.
    fusions = sorted({k.split("/")[0] for k in ratios if k.endswith("/unfused")})
    rows = sorted({k.split("/")[1] for k in ratios}, key=lambda m: int(m[1:]))
    lines = [
        "**Fusion steps, µs per call** (same file; distinct weights chained in one CUDA graph; "
        "path: the kernel the fused call ran):",
        "",
        f"| step | M | fused | path | unfused ops | one-launch peer (`residual.{PEER}`) |",
        "|---|---|---|---|---|---|",
    ]

    def cells(fusion, ref):
        got = [ratios.get(f"{fusion}/{m}/{ref}") for m in rows]
        return got if any(got) else None

    def fmt(entries, field):
        return " / ".join("-" if e is None else f"{e[field]:.2f}" for e in entries)

    for fusion in fusions:
        unfused, peer = cells(fusion, "unfused"), cells(fusion, PEER)
        paths = sorted({r["path"] for r in unfused if r})
        lines.append(
            f"| {fusion} | {' / '.join(m[1:] for m in rows)} | {fmt(unfused, 'fused_us')} | "
            f"{', '.join(paths)} | {fmt(unfused, 'reference_us')} | "
            f"{fmt(peer, 'reference_us') if peer else '-'} |"
        )
    return lines


def _breakdown(report: dict) -> list[str]:
    default, none = report["breakdown"]["default"], report["breakdown"]["none"]
    total, none_total = default["total_us_per_step"], none["total_us_per_step"]
    big = sorted(default["rows"], key=lambda r: -r["us_per_step"])[:7]
    listed = ", ".join(
        f"{r['name']} {r['us_per_step']:.1f} (floor {r['floor_us']:.1f})" for r in big
    )
    e2e = report["e2e"]["b1"]["variants"]["default"]["median"]
    return [
        f"**Where a decode step's time goes** (batch 1, GPU µs per step from profiler kernel "
        f"durations, eager; `{SOURCES['report']}`: commit {report['commit']}, copy bandwidth "
        f"measured at {report['copy_bandwidth_tb_s']:.2f} TB/s): default {total:.1f} µs in all, "
        f"of which {listed}; none {none_total:.1f} µs. In a CUDA graph the same run decoded "
        f"{e2e:.1f} tok/s ({1e6 / e2e:.0f} µs a token): programmatic dependent launch overlaps "
        "each kernel's weight stream with the kernel before it, so the graph's step is shorter "
        "than the sum."
    ]


# --- results/runs.jsonl ----------------------------------------------------------------------


# What the GPU suite proves at a commit: a change to any of these after it is unverified.
GPU_CODE = ("kernels", "engine", "profiling", "tests", "conftest.py", "tox.ini")


def changed_since(commit: str, root: Path = ROOT) -> bool | None:
    """Whether the GPU code in the checkout at ``root`` differs from ``commit``'s (None: no
    git there, or the commit is unknown to it)."""
    try:
        out = subprocess.run(
            ["git", "diff", "--quiet", commit, "--", *GPU_CODE], cwd=root, capture_output=True
        )
    except OSError:
        return None
    return {0: False, 1: True}.get(out.returncode)


def last_suite(runs: list[dict]) -> dict:
    return [r for r in runs if "suite" in r["figures"]][-1]


def _suite(runs: list[dict]) -> list[str]:
    """The last run of the whole GPU suite (tox -e gpu's three commands), and whether the GPU
    code has changed since its commit."""
    r = last_suite(runs)
    suite = r["figures"]["suite"]
    tests = [
        ", ".join(f"{v} {k}" for k, v in p.items() if k in ("passed", "failed", "skipped"))
        + f" in {p['seconds']:.0f} s"
        for p in suite["pytest"]
    ]
    gate = suite.get("gate", {})
    verdict = f"; `python -m profiling gate` {gate['verdict']} ({gate['checks']} checks, " \
        f"{gate['seconds']} s)" if gate else ""  # fmt: skip
    changed = changed_since(r["commit"])
    since = {
        True: f" The GPU code ({', '.join(GPU_CODE)}) has changed since {r['commit']}: this "
        "checkout has not run the GPU suite.",
        False: f" The GPU code is as it was at {r['commit']}.",
        None: "",
    }[changed]
    return [
        f"Last GPU suite run ({_where(r)}): correctness tests {tests[0]}"
        + (f"; timing tests {tests[1]}" if len(tests) > 1 else "")
        + verdict
        + "."
        + since
    ]


def _best_peer(us: dict) -> float:
    return min(v for k, v in us.items() if k not in ("fused", "unfused"))


def _prefill(runs: list[dict]) -> list[str]:
    r = _run(runs, RUNS_QUOTED["prefill"])
    bench = r["figures"]["bench"]
    rows_m = (64, 512, 2048)
    fusions = ("o_proj_residual", "down_proj_residual")
    sizes = sorted({k.split("/")[1] for k in bench}, key=lambda s: float(s[:-1]))
    lines = [
        f"**Prefill, best one-launch peer / fused** (µs per call of `residual.{PEER}` over the "
        f"fused step's, at M = {' / '.join(map(str, rows_m))}; `python -m profiling bench "
        f"--save`, {_where(r)}):",
        "",
        "| shape | " + " | ".join(fusions) + " |",
        "|---" * (len(fusions) + 1) + "|",
    ]
    for size in sizes:
        cells = []
        for fusion in fusions:
            got = [bench.get(f"{fusion}/{size}/M={m}") for m in rows_m]
            cells.append(
                " / ".join("-" if g is None else f"{_best_peer(g) / g['fused']:.3f}" for g in got)
            )
        lines.append(f"| {size.upper()} | " + " | ".join(cells) + " |")
    return lines


def _decode_peers() -> list[str]:
    """Best peer / fused at decode sizes, the kernels' heuristic (no tuned table) and tuned."""
    from scripts import peer_table

    files = [ROOT / SOURCES[k] for k in ("bench_heuristic_h200", "bench_tuned_h200")]
    rows = peer_table.table(files, {1, 8})
    compiled = any("torch_compile" in r["peers"] for row in rows for r in row["runs"] if r)
    return [
        "**Decode sizes, best peer / fused, heuristic and tuned** (NVIDIA H200; µs per call of "
        "the fused step and of the fastest of its one-launch peer `residual.addmm_` and its "
        "unfused ops `F.linear` + add; `heuristic`: the kernel benchmark with this GPU's tuned "
        f"tables removed, `{SOURCES['bench_heuristic_h200']}`; `tuned`: "
        f"`{SOURCES['bench_tuned_h200']}`; `python -m scripts.peer_table` renders it). "
        + (
            "torch.compile of the span (`torch_compile`) is among the peers:"
            if compiled
            else "torch.compile is not among the peers measured (these runs predate it):"
        ),
        "",
        peer_table.render(rows, ["heuristic", "tuned"], markdown=True),
    ]


def _out_of_place() -> list[str]:
    data = json.loads((ROOT / SOURCES["bench_tuned_h200"]).read_text())
    rows = [
        b["extra_info"]
        for b in data["benchmarks"]
        if "fusion" not in b["extra_info"] and "us_per_call" in b["extra_info"]
    ]
    lines = [
        "**Out of place** (`linear_residual(x, residual, W)` writing a new tensor, 0.6B o_proj "
        "shape, NVIDIA H200, µs per call; `torch.addmm(residual, x, W.T)` and `F.linear` + add "
        f"also write a new tensor; `{SOURCES['bench_tuned_h200']}`). From 64 rows the fused call "
        "is cuBLAS's GEMM after a copy of the residual into the output, as `torch.addmm` is:",
        "",
        "| M | fused | torch.addmm | F.linear + add |",
        "|---|---|---|---|",
    ]
    for info in sorted(rows, key=lambda i: i["M"]):
        us = info["us_per_call"]
        lines.append(
            f"| {info['M']} | {us['fused']:.2f} | {us['addmm']:.2f} | {us['linear_add']:.2f} |"
        )
    return lines


def _bench_gate(runs: list[dict]) -> list[str]:
    r = _run(runs, RUNS_QUOTED["bench_gate"])
    f = r["figures"]

    def gated(step: str) -> str:
        rows = f[step]["rows"]
        cells = ", ".join(
            f"{name.split('[')[1].rstrip(']')} {row['change_pct']:+.2f}% ({row['verdict']})"
            for name, row in rows.items()
        )
        return f"{f[step]['verdict']} ({cells})"

    return [
        f"**The kernel benchmark against the saved run** (`python -m profiling bench -k "
        f"o_proj_residual-0.6b`, {_where(r)}; fused / unfused ratio against the saved one, limit "
        f"max(5%, 3 x spread); cuBLAS rows not gated): unchanged code {gated('benchcmp')}; 55 "
        f"dependent FMAs planted per program of the linear+residual kernel "
        f"{gated('benchplant-rerun')}.",
    ]


def _engine_cli(runs: list[dict]) -> list[str]:
    r = _run(runs, RUNS_QUOTED["engine_cli"])
    cli = r["figures"]["cli"]["engine_cli_decode_tok_s"]
    measured = r["figures"]["measure-b1"]["b1"]["default"]
    return [
        f"**The engine CLI's decode figure** (`python -m engine --cuda-graph --prompt-len 16 "
        f"--max-new-tokens 48`, {_where(r)}): {cli:.1f} tok/s, against {measured:.1f} from "
        f"`python -m profiling measure --batches 1` on the same machine "
        f"({100 * (cli / measured - 1):+.1f}%).",
    ]


def _onboard(runs: list[dict]) -> list[str]:
    r = _run(runs, RUNS_QUOTED["onboard"])
    o = r["figures"]["onboard"]
    stages = ", ".join(f"{name} {sec} s" for name, sec in o["stage_s"].items())
    return [
        f"**Onboarding a GPU model** (`python -m profiling onboard` on a tree with no table or "
        f"baseline for it, {_where(r)}): {o['total_s']} s in all ({stages}); "
        f"{len(o['tune'])} buckets tuned; gate {o['gate']['verdict']} "
        f"({o['gate']['checks']} checks).",
    ]


def _tensor_parallel(runs: list[dict], tp2: dict) -> list[str]:
    r = _run(runs, RUNS_QUOTED["tp"])
    f = r["figures"]
    one, two = f["tp1-8b"], f["tp2-8b"]
    layers = f["tp"]["tp2"]["layers"]
    lines = [
        f"**Tensor parallel, Qwen3-8B architecture** ({layers} layers, batch 1, CUDA graphs; "
        f"`bash scripts/gpu_pass.sh tp`, {_where(r)}):",
        "",
        "| | TP=1 | TP=2 |",
        "|---|---|---|",
        f"| decode, default fusions | {one['b1']['default']:.1f} tok/s | "
        f"**{two['b1']['default']:.1f} tok/s** ({two['b1']['default'] / one['b1']['default']:.2f}x"
        " TP=1) |",
        f"| all fusions on / off | {one['b1']['speedup_all']:.3f}x | "
        f"{two['b1']['speedup_all']:.3f}x |",
        f"| kernels per token (per rank) | {one['kernels_per_token_default']:.0f} (none: "
        f"{one['kernels_per_token_none']:.0f}) | {two['kernels_per_token_default']:.0f} (none: "
        f"{two['kernels_per_token_none']:.0f}) |",
        "",
    ]
    ar = _run(runs, RUNS_QUOTED["all_reduce"])
    times = ", ".join(
        f"{t['one_shot_us']:.2f} vs {t['nccl_add_us']:.2f} µs at {t['shape']}"
        for t in ar["figures"]["arpush-time"]
    )
    e2e = tp2["e2e"]
    lines += [
        "**all_reduce_residual** (`kernels/all_reduce_residual.py`) against NCCL all-reduce + "
        f"add, per call in a CUDA graph ({_where(ar)}; "
        f"`torchrun --nproc-per-node 2 -m scripts.time_all_reduce_residual`): {times}.",
        "",
        f"**The TP=2 baseline** (`{SOURCES['tp2_baseline']}`: Qwen3-0.6B architecture, commit "
        f"{tp2['commit']}, {tp2['date'][:10]}, {len(tp2.get('combined_runs', [1]))} processes): "
        + ", ".join(
            f"batch {k[1:]} {b['variants']['default']['median']:.1f} tok/s with the default "
            f"fusions vs {b['variants']['none']['median']:.1f} with none "
            f"({b['speedups']['all']['median']:.3f}x)"
            for k, b in sorted(e2e.items(), key=lambda kv: int(kv[0][1:]))
        )
        + ".",
    ]
    return lines


def _proofs(runs: list[dict]) -> list[str]:
    lines = [
        "**The gate against planted regressions** (`python -m scripts.gate_proof`: each plant "
        "and each unchanged run is one gate, against the baseline then committed):",
        "",
        "| run | commit | unchanged runs passed | plants failed | slowest gate |",
        "|---|---|---|---|---|",
    ]
    for name in RUNS_QUOTED["proofs"]:
        r = _run(runs, name)
        for step in ("proof", "tpproof", "proof_rejudged"):
            p = r["figures"].get(step)
            if p:
                label = f"`{name}`" + (" (judged again, wider speed-up floors)" if
                                       step.endswith("rejudged") else "")  # fmt: skip
                slow = f"{p['max_gate_seconds']} s" if "max_gate_seconds" in p else "-"
                lines.append(
                    f"| {label} | {r['commit']} | {p['unchanged_passed']} of "
                    f"{p['unchanged_runs']} | {p['plants_failed']} of {p['plants']} | {slow} |"
                )
    return lines


def _ncu(runs: list[dict]) -> list[str]:
    r = _run(runs, RUNS_QUOTED["ncu"])
    per = r["figures"]["ncu"]
    return [
        f"**Nsight Compute** (`python -m scripts.ncu_nvtx_check`, {_where(r)}): kernels per "
        "instance inside each fusion's NVTX range: "
        + ", ".join(f"{k} {v:g}" for k, v in sorted(per.items()))
        + "."
    ]


def _tuning(runs: list[dict]) -> list[str]:
    lines = [
        "**Tuned launch configurations** (`python -m profiling.tune`: each bucket's best "
        "against the kernel's heuristic, µs per call):",
        "",
        "| run | fusion | N x K | M | best | heuristic |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        for t in r["figures"].get("tune", []):
            lines.append(
                f"| `{r['run']}` | {t['fusion']} | {t['N']} x {t['K']} | {t['M']} | "
                f"{t['best_us']:.2f} | {t['heuristic_us']:.2f} |"
            )
    return lines


def _ab(runs: list[dict]) -> list[str]:
    lines = [
        "**A/B of two source trees** (`python -m scripts.compare_trees`: decode tok/s of the "
        "default variant, the trees' processes alternating on one GPU; new/base > 1: the "
        "commit is faster than the base tree; docs/notes.md says what each base tree was):",
        "",
        "| run | GPU | commit | base tree | batch 1 new/base | batch 8 new/base |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        for step, ab in sorted(r["figures"].items()):
            if step.startswith("ab") and isinstance(ab, dict) and "base" in ab:
                lines.append(
                    f"| `{r['run']}` ({step}) | {r['gpus'][0]} | {r['commit']} | `{ab['base']}` | "
                    f"{ab['b1']['new/base']:.3f} | {ab['b8']['new/base']:.3f} |"
                )
    return lines


# --- the documents ---------------------------------------------------------------------------


def render_measured() -> str:
    base, report, runs, tp2 = (
        _load("baseline"),
        _load("report"),
        _load("runs"),
        _load("tp2_baseline"),
    )
    sections = [
        [
            "# Measured",
            "",
            f"Generated by `{WRITE}` from the committed files each paragraph names "
            "(`tests/test_readme_measured.py` fails when this page differs from them). Runs are "
            f"lines of `{SOURCES['runs']}`, by name. Qwen3-0.6B architecture, random weights, "
            "bf16, unless a paragraph says otherwise. What each figure led to: docs/notes.md.",
        ],
        ["## Single GPU"],
        _decode(base),
        _launches(base),
        _steps(base),
        _breakdown(report),
        _prefill(runs),
        _decode_peers(),
        _out_of_place(),
        _onboard(runs),
        _bench_gate(runs),
        _engine_cli(runs),
        _ncu(runs),
        ["## The gate and the GPU suite"],
        _suite(runs),
        _proofs(runs),
        ["## Tensor parallel"],
        _tensor_parallel(runs, tp2),
        ["## Tuning and A/B runs"],
        _tuning(runs),
        _ab(runs),
    ]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


def _headline(bases: dict[str, dict]) -> list[str]:
    """Decode tok/s of each GPU's baseline (``bases``: source name -> baseline)."""
    lines = [
        "Qwen3-0.6B architecture, bf16, CUDA graphs, from each GPU's committed baseline:",
        "",
        "| GPU (baseline: commit, date) | batch | decode, default fusions | none | speed-up |",
        "|---|---|---|---|---|",
    ]
    for source, base in bases.items():
        where = f"{base['gpu']} (`{SOURCES[source]}`: {base['commit']}, {base['date'][:10]})"
        for k, b in sorted(base["e2e"].items(), key=lambda kv: int(kv[0][1:])):
            lines.append(
                f"| {where} | {k[1:]} | **{b['variants']['default']['median']:.1f} tok/s** | "
                f"{b['variants']['none']['median']:.1f} tok/s | "
                f"{b['speedups']['all']['median']:.3f}x |"
            )
    counts = {k: v["kernels_per_step"] for k, v in next(iter(bases.values()))["launches"].items()}
    lines += [
        "",
        f"{counts['default/graph-b1']:.0f} kernels a token with the default fusions, "
        f"{counts['none/graph-b1']:.0f} with none." + _not_yet_baselined(bases),
    ]
    return lines


def _not_yet_baselined(bases: dict[str, dict]) -> str:
    """The single-process fusions registered now that a baseline does not list: on that GPU
    the gate exits 3 until the baseline is recorded again."""
    from engine import fusions as registry

    registered = {f.name for f in registry.all_fusions()}
    new = sorted({n for b in bases.values() for n in registered - set(b["model"]["fusions"])})
    if not new:
        return ""
    return (
        f" Registered since these baselines were recorded: {', '.join(new)} (on their GPUs "
        "`python -m profiling gate` exits 3, not yet baselined, until `python -m profiling "
        "record --force`)."
    )


def _marks(name: str) -> tuple[str, str]:
    return f"<!-- {name}: generated by {WRITE} -->", f"<!-- end of {name} -->"


def readme_blocks() -> dict[str, str]:
    """README.md's generated blocks as the committed files render them, markers included."""
    bases = {name: _load(name) for name in ("baseline", "baseline_h200")}
    runs = _load("runs")
    blocks = {"headline figures": _headline(bases), "GPU suite status": _suite(runs)}
    return {name: "\n".join([_marks(name)[0], *lines, _marks(name)[1]]) for name, lines in
            blocks.items()}  # fmt: skip


def readme_block(text: str, name: str) -> str | None:
    """The block ``name`` as ``text`` holds it (markers included), or None."""
    begin, end = _marks(name)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        return None
    return text[start : stop + len(end)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="write docs/measured.md and README.md")
    args = p.parse_args(argv)
    page = render_measured()
    if not args.write:
        print(page, end="")
        return 0
    text = README.read_text()
    for name, block in readme_blocks().items():
        old = readme_block(text, name)
        if old is None:
            print(f"error: README.md has no block between {_marks(name)}", file=sys.stderr)
            return 2
        text = text.replace(old, block)
    README.write_text(text)
    MEASURED.write_text(page)
    print(f"wrote {MEASURED.relative_to(ROOT)} and the generated blocks of README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
