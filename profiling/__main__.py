"""The main job: fused vs unfused o_proj+residual on the embedded default (Qwen3-0.6B).

    python -m profiling [--out report]     report: table vs this GPU's baseline, JSON, trace, PNG
    python -m profiling record             write perf_baselines/<gpu-slug>/ from real runs
                                           (throughput.json + pytest-benchmark kernel run)
    python -m profiling gate [--kernels]   launches, tok/s, speed-up, numerics vs the baseline
    python -m profiling bench              pytest-benchmark benchmarks; kernel medians gated by
                                           --benchmark-compare-fail against the baseline
    python -m profiling bench -k o_proj    other arguments go to pytest

Exit codes: 0 ok, 1 gate/benchmark failure, 2 usage or environment error, 3 no usable baseline
(a missing baseline is never a pass). On a machine without a GPU the report runs a 2-layer
model through the Triton interpreter, eager only: it shows that everything runs, and its
timings mean nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

import kernels  # noqa: F401  (first: picks compiled or interpreted Triton)
from profiling import baselines, report
from profiling.baselines import BaselineError
from profiling.launches import TraceError, record_decode_trace
from profiling.throughput import Mode, Settings, default_modes, measure_all, report_json

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_BASELINE = 0, 1, 2, 3
HAS_GPU = torch.cuda.is_available()
CPU_NOTE = (
    "No CUDA GPU: a 2-layer, hidden-64 model through the Triton interpreter, eager only. "
    "Its timings mean nothing (the interpreter runs kernels in numpy) and launch counts need "
    "a GPU; run on a GPU for real numbers."
)


def small_config():
    """What the CPU runs: the default architecture shrunk until the interpreter is quick."""
    from engine.config import default_config

    return default_config().replace(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=512,
    )


def build_model(args):
    from profiling.gate import default_model

    config = small_config() if (args.small or not HAS_GPU) else None
    if args.layers is not None:
        from engine.config import default_config

        config = (config or default_config()).replace(num_hidden_layers=args.layers)
    return default_model(config)


def settings_from(args, *, repeats_default: int) -> Settings:
    if HAS_GPU and not args.small:
        defaults = Settings()
    else:
        defaults = Settings(prompt_len=4, new_tokens=6, warmup=1, launch_steps=2)
    return Settings(
        prompt_len=args.prompt_len or defaults.prompt_len,
        new_tokens=args.new_tokens or defaults.new_tokens,
        repeats=args.repeats or repeats_default,
        warmup=defaults.warmup,
        launch_steps=defaults.launch_steps,
    )


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr)


def _load_baseline_or_reason(root) -> tuple[dict | None, str | None]:
    try:
        return baselines.load_baseline(root=root), None
    except BaselineError as exc:
        return None, str(exc)


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------


def cmd_report(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not HAS_GPU:
        print(CPU_NOTE)
    model = build_model(args)
    settings = settings_from(args, repeats_default=5)
    modes = default_modes(model, args.batches)
    with _progress(len(modes) + 1, "report") as bar:
        results = measure_all(model, modes, settings, progress=bar)
        bar.set_postfix_str("decode trace")
        trace = _write_trace(model, settings, out / "decode_trace.json.gz")
        bar.update(1)
    current = report_json(results, model, settings)
    baseline, reason = _load_baseline_or_reason(args.root)
    current["baseline"] = {"status": "none", "reason": reason}
    gate = None
    if baseline is not None:
        try:
            gate = baselines.compare(current, baseline)
            current["baseline"] = {
                "status": "pass" if gate.ok else "fail",
                "commit": baseline.get("commit"),
                "date": baseline.get("date"),
                "failures": [c.message for c in gate.failures],
            }
        except BaselineError as exc:
            baseline, reason = None, str(exc)
            current["baseline"] = {"status": "not comparable", "reason": reason}
    current["trace"] = trace.name
    report.write_json(current, out / "report.json")
    report.plot(current, baseline, out / "report.png")
    print()
    print(
        f"{current['gpu']} | {current['config'].get('num_hidden_layers')} layers | "
        f"{current['dtype']} | prompt {settings.prompt_len}, {settings.new_tokens} new tokens, "
        f"median of {settings.repeats}"
    )
    print(report.table(current, baseline))
    if baseline is None:
        print(f"\n{report.NO_BASELINE}\n  ({reason})")
    else:
        print(f"\nin parentheses: baseline {baseline.get('commit')} of {baseline.get('date')}")
        print(gate.summary())
    if not HAS_GPU:
        print(f"\n{CPU_NOTE}")
    print(
        f"\nwrote {out / 'report.json'}, {out / 'report.png'}, {trace} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return EXIT_OK


def _write_trace(model, settings: Settings, path: Path) -> Path:
    """One fused eager decode trace (a few steps), for chrome://tracing or Perfetto."""
    from profiling.throughput import fusion, make_runner

    mode = Mode(fused=True, cuda_graph=False)
    with fusion(model, True):
        return record_decode_trace(
            make_runner(model, mode, settings),
            settings.launch_steps,
            path,
            prompt_len=settings.prompt_len,
        )


def _need_gpu(what: str) -> bool:
    if HAS_GPU:
        return True
    print(f"{what} needs a CUDA GPU: CPU/interpreter timings mean nothing", file=sys.stderr)
    return False


def _pytest(extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", "-m", "bench", "-p", "no:cacheprovider", *extra]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def cmd_record(args) -> int:
    if not _need_gpu("record"):
        return EXIT_USAGE
    root = Path(args.root)
    compare_fail = None
    if not args.skip_kernels:
        rc = _pytest([*baselines.pytest_benchmark_save_args(root=root), *args.pytest_args])
        if rc != 0:
            print(f"benchmarks failed (exit {rc}): nothing recorded", file=sys.stderr)
            return EXIT_FAIL
        saved = baselines.kernel_benchmark_file(root=root)
        compare_fail = baselines.kernel_compare_fail(baselines.load_kernel_benchmarks(saved))
        print(f"kernel baseline: {saved} (compare-fail {compare_fail})")
    model = build_model(args)
    settings = settings_from(args, repeats_default=10)
    modes = default_modes(model, args.batches)
    with _progress(len(modes), "record") as bar:
        results = measure_all(model, modes, settings, progress=bar)
    current = report_json(results, model, settings)
    path = baselines.write_baseline(current, root=root, kernel_compare_fail=compare_fail)
    print(report.table(current, None))
    print(f"\nwrote {path}: commit it (git add {path.parent})")
    return EXIT_OK


def cmd_gate(args) -> int:
    from profiling.gate import run_gate

    if not _need_gpu("the gate"):
        return EXIT_NO_BASELINE
    baseline, reason = _load_baseline_or_reason(args.root)
    if baseline is None:
        print(f"GATE NOT RUN: {reason}", file=sys.stderr)
        return EXIT_NO_BASELINE
    model = build_model(args)
    modes = len(baseline["modes"]) * 2
    try:
        with _progress(modes, "gate") as bar:
            result, current = run_gate(model, baseline, repeats=args.repeats, progress=bar)
    except BaselineError as exc:
        print(f"GATE NOT RUN: {exc}", file=sys.stderr)
        return EXIT_NO_BASELINE
    print(report.table(current, baseline))
    print(result.summary())
    status = EXIT_OK if result.ok else EXIT_FAIL
    if args.kernels:
        status = max(status, cmd_bench(args))
    return status


def cmd_bench(args) -> int:
    if not _need_gpu("benchmarks"):
        return EXIT_USAGE
    if getattr(args, "no_compare", False):
        return EXIT_FAIL if _pytest(args.pytest_args) else EXIT_OK
    try:
        compare_args = baselines.pytest_benchmark_compare_args(root=args.root)
    except BaselineError as exc:
        print(f"KERNEL MEDIANS NOT COMPARED: {exc}", file=sys.stderr)
        return EXIT_NO_BASELINE
    return EXIT_FAIL if _pytest([*compare_args, *args.pytest_args]) else EXIT_OK


# --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profiling", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "command", nargs="?", default="report", choices=("report", "record", "gate", "bench")
    )
    p.add_argument("--out", default="report", help="report: output folder (default ./report)")
    p.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per mode (>= 5; default 5, record 10)",
    )
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument(
        "--small", action="store_true", help="the CPU's 2-layer config on any device (quick checks)"
    )
    p.add_argument(
        "--root",
        default=str(baselines.BASELINE_ROOT),
        help="baselines folder (default perf_baselines/)",
    )
    p.add_argument(
        "--skip-kernels",
        action="store_true",
        help="record: leave out the pytest-benchmark kernel baseline",
    )
    p.add_argument(
        "--kernels",
        action="store_true",
        help="gate: also gate kernel medians (what the bench command does)",
    )
    p.add_argument(
        "--no-compare",
        action="store_true",
        help="bench: run the benchmarks without comparing to a baseline",
    )
    p.add_argument(
        "pytest_args",
        nargs="*",
        default=[],
        help="extra pytest arguments (record, gate --kernels, bench), e.g. -k o_proj",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown and args.command == "report":
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    # record/gate/bench: what we do not know is for pytest (e.g. -k o_proj, -x).
    args.pytest_args = [*args.pytest_args, *unknown]
    if args.repeats is not None and args.repeats < 5:
        print("--repeats must be >= 5 (D5: median of at least 5)", file=sys.stderr)
        return EXIT_USAGE
    commands = {"report": cmd_report, "record": cmd_record, "gate": cmd_gate, "bench": cmd_bench}
    try:
        return commands[args.command](args)
    except TraceError as exc:
        print(f"launch counting failed: {exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
