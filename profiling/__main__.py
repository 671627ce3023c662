"""``python -m profiling``: the report, the gate, baselines and kernel benchmarks.

    python -m profiling [report] [--out report]   every stage, against this GPU's baseline:
                                                  text, report.json, report.png
    python -m profiling gate                      the regression gate (what tox -e gpu runs)
    python -m profiling record [--force]          write perf_baselines/<gpu-slug>/baseline.json
        [--processes N | --combine RUN.json ...]  from N runs in fresh processes (default 3),
                                                  or from runs already measured
    python -m profiling measure --out DIR         one run of the gate's stages (DIR/run.json)
    python -m profiling bench [--save] [-k ...]   pytest-benchmark kernel benchmarks vs the
                                                  saved run (other arguments go to pytest)
    python -m profiling onboard [--force]         a new GPU model: tune its launch tables,
                                                  record both baselines, run the gate
    python -m profiling ab --base REF [--pairs N] this tree against commit REF in alternating
        [--out ab]                                fresh processes: effect, 95% interval and
                                                  verdict per timed figure (ab.json, ab.png);
                                                  ``gate --base REF`` is the same
    python -m profiling bisect GOOD BAD           the first commit where a figure turned slower
        [--figure NAME] [--pairs N]               (git bisect over the A/B against GOOD)
    --size 0.6b|1.7b|4b|8b                        the Qwen3 architecture (random weights)
    torchrun --nproc-per-node N -m profiling [--tp N] report|gate|record|measure ...
                                                  the same stages on N tensor-parallel ranks
                                                  (baseline perf_baselines/<gpu-slug>/tpN/)

Exit codes (0 pass, 1 fail, 2 usage or environment error, 3 no usable baseline): their
rules are in docs/definitions.md, "Exit codes". A usage or environment error is one line
``error: ...`` naming the argument, variable or file; --debug shows its traceback.

Without a GPU the report runs a small 2-layer, hidden-64 model (engine.config.SMALL) through
the Triton interpreter:
numerics, eager decode and a host-time breakdown (their timings mean nothing); launch counts,
kernel timing and CUDA-graph decode need a GPU (measure then writes the numerics alone).

Tensor parallel (under torchrun, WORLD_SIZE > 1; --tp N, when given, must equal it): each
process joins the group (nccl, one GPU per LOCAL_RANK; gloo on CPU) and builds its shard
(engine/parallel.py); every rank runs every stage in lockstep (profiling/ranks.py). Only rank
0 prints and writes; the run records ``model.tp`` and, under ``tp``, every rank's launches.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine import parallel as tp
from engine.config import QWEN3_SIZES
from engine.memory import MemoryFitError, check_fits, memory_need
from kernels.runtime import BackendError, check_backend
from profiling import ab, baselines, breakdown, gate, measure, report, validate
from profiling.baselines import BaselineError
from profiling.launches import TraceError
from profiling.ranks import Ranks

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_BASELINE = 0, 1, 2, 3
HAS_GPU = torch.cuda.is_available()
CPU_NOTE = (
    "No CUDA GPU: the small 2-layer, hidden-64 model through the Triton interpreter. Its "
    "timings mean nothing (the interpreter runs kernels in numpy); launch counts, kernel "
    "timing and CUDA-graph decode need a GPU."
)
CPU_NOT_COMPARED = (
    "Nothing was compared: baselines are per GPU model, so without a GPU none is read (not "
    "even under --root); exit 0 means the report was written."
)


# This process's place among tensor-parallel ranks (set by main; one process: single).
RANKS = Ranks.single()
# torchrun stops the other ranks when the first one exits: a rank other than 0 that fails the
# same check as rank 0 waits this long, leaving rank 0 the time to print it.
QUIET_RANK_EXIT_DELAY_S = 2.0


def model_config(args):
    from engine.config import default_config, qwen3_config, small_config

    if args.small or not HAS_GPU:
        config = small_config()
    elif args.size is not None:
        config = qwen3_config(args.size)
    else:
        config = default_config()
    if getattr(args, "layers", None) is not None:
        config = config.replace(num_hidden_layers=args.layers)
    return config


def build(config):
    """The suite's model of ``config`` (random weights, seed 0): under TP this rank's shard."""
    from profiling.gate import default_model

    if not RANKS.sharded:
        return default_model(config)
    return tp.build_sharded(
        config,
        None,
        RANKS.parallel,
        dtype=torch.bfloat16,
        device=RANKS.device or torch.device("cpu"),
        seed=0,
    )


def build_model(args):
    return build(model_config(args))


def plan_from(args) -> measure.Plan:
    base = measure.Plan() if HAS_GPU and not args.small else measure.CPU_PLAN
    changes = {
        k: v
        for k, v in {
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "batches": tuple(args.batches) if args.batches else None,
        }.items()
        if v is not None
    }
    return measure.Plan(**{**base.to_json(), **changes})


def _seed(args) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    seed = RANKS.share(seed)  # every rank draws the same numerics inputs
    print(f"numerics inputs: seed {seed} (replay with --seed {seed})")
    return seed


def _load_baseline(root) -> tuple[dict | None, BaselineError | None]:
    try:
        return baselines.load_baseline(root=root, tp=RANKS.world_size), None
    except BaselineError as exc:
        return None, exc


def _breakdown(model, current: dict, plan: measure.Plan) -> dict:
    """From the eager launch counts on a GPU; from host ranges of an eager trace on CPU."""
    order = [b.op.name for b in model.program()]
    groups = {name: op.group for name, op in model.ops.items()}
    from engine import fusions as registry

    for f in registry.all_fusions():
        groups[f.name] = "fusion"
        order.insert(min(order.index(op) for op in f.spans[0]), f.name)
    bandwidth = None
    if HAS_GPU:
        from profiling.kernel_timing import copy_bandwidth_tb_s

        bandwidth = copy_bandwidth_tb_s()
        current["copy_bandwidth_tb_s"] = bandwidth
        times = {}
        for variant in ("default", "none"):
            e = current["launches"][f"{variant}/eager-b1"]
            times[variant] = {
                "source": "gpu kernels",
                "steps": plan.launch_steps,
                "total_us_per_step": e["kernel_us_per_step"],
                "segments": {
                    n: {"us_per_step": s["us_per_step"], "instances_per_step": s["instances"]}
                    for n, s in e["segments"].items()
                },
            }
    else:
        times = {v: _host_times(model, v, plan) for v in ("default", "none")}
    # A kernel that spans several steps: its variant's column, each step's time from the
    # kernel's own stamps in a row under it.
    for name, staged in current.get("stage_times", {}).items():
        times[staged["variant"]] = breakdown.with_stages(
            staged["times"], name, staged["stage_us_per_step"]
        )
        for stage in staged["stage_us_per_step"]:
            groups[f"{name}.{stage}"] = "stage"
            order.insert(order.index(name) + 1, f"{name}.{stage}")
    context = plan.prompt_len + plan.launch_steps
    floors = measure.segment_floors(model, 1, context, bandwidth)
    return breakdown.build(times, floors, groups, order)


def _host_times(model, variant: str, plan: measure.Plan) -> dict:
    from engine.flags import FusionFlags
    from engine.runner import Runner
    from profiling.launches import record_decode_trace

    saved = model.flags
    model.flags = model.default_flags() if variant == "default" else FusionFlags.none()
    try:
        runner = Runner(model, max_seq_len=plan.prompt_len + plan.launch_steps + 4)
        with tempfile.TemporaryDirectory() as tmp:
            path = record_decode_trace(
                runner, plan.launch_steps, Path(tmp) / "t.json", prompt_len=plan.prompt_len
            )
            return breakdown.segment_times(path, measure.segment_names(model))
    finally:
        model.flags = saved


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_report(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    baseline, problem = _load_baseline(args.root) if HAS_GPU else (None, None)
    if problem is not None and not isinstance(problem, baselines.BaselineMissing):
        print(f"REPORT NOT RUN: {problem}", file=sys.stderr)
        return EXIT_NO_BASELINE
    if not HAS_GPU:
        print(CPU_NOTE)
    else:
        _untuned_note()
    model = build_model(args)
    plan = plan_from(args)
    seed = _seed(args)
    current = measure.report_header(model, plan)
    gate.run_stages(model, plan, current, seed=seed, log=lambda line: None, ranks=RANKS)
    current["eager"] = measure.measure_eager(model, plan)
    current["stage_times"] = measure.measure_stage_times(model, plan)
    current["breakdown"] = _breakdown(model, current, plan)
    if RANKS.sharded:
        # Each rank's own step times (its shards, its share of every collective's wait).
        current["breakdown_per_rank"] = RANKS.gather(current["breakdown"])
        current["tp"] = measure.tp_summary(model, current, RANKS)
    current = RANKS.share(current)  # rank 0's figures: every rank reaches the same verdict
    status, verdict = EXIT_OK, None
    if baseline is not None:
        try:
            verdict = gate.compare(current, baseline)
            current["gate"] = verdict.to_json()
            status = EXIT_OK if verdict.ok else EXIT_FAIL
        except BaselineError as exc:
            problem, baseline = exc, None
    elif HAS_GPU:
        status = EXIT_NO_BASELINE
    if not RANKS.root:
        return status
    report.write_json(current, out / "report.json")
    report.plot(current, baseline, out / "report.png")
    print()
    c = current["model"]["config"]
    print(
        f"{current['gpu']} | {c['num_hidden_layers']} layers | {current['model']['dtype']} | "
        f"default fusions: {', '.join(current['model']['default_fusions'])} | commit "
        f"{current['commit']}"
    )
    print(report.text(current, baseline))
    _print_tp(current)
    if verdict is not None:
        print(
            f"\nagainst baseline {baseline.get('commit')} of {baseline.get('date')} "
            f"(in parentheses; the gate re-measures failing timing, the report does not):"
        )
        print(verdict.summary())
    elif HAS_GPU:
        print(f"\n{report.NO_BASELINE}\n  ({problem})")
    else:
        print(f"\n{CPU_NOTE}\n{CPU_NOT_COMPARED}")
    took = time.perf_counter() - started
    print(f"\nwrote {out / 'report.json'}, {out / 'report.png'} ({took:.0f} s)")
    return status


def _print_tp(current: dict) -> None:
    t = current.get("tp")
    if not t:
        return
    line = (
        f"\ntensor parallel: {t['world_size']} ranks ({t['backend']}), not applicable: "
        f"{', '.join(t['not_applicable']) or 'none'}; launches per step "
    )
    if t["launches_equal"]:
        print(line + "equal on every rank")
    else:
        print(line + "DIFFER between ranks:")
        for d in t["launch_differences"]:
            print(f"  {d}")


def _ranks_kw() -> dict:
    """The ranks for the gate's functions, passed only under TP (one process: their default)."""
    return {"ranks": RANKS} if RANKS.sharded else {}


def _need_gpu(what: str) -> bool:
    if HAS_GPU:
        return True
    print(f"{what} needs a CUDA GPU (CPU/interpreter timings mean nothing)", file=sys.stderr)
    return False


def _untuned_note() -> None:
    """On a GPU with no tuned table for some kernel: one line naming the onboarding command."""
    from profiling.onboard import untuned_note

    note = untuned_note()
    if note and RANKS.root:
        print(note, file=sys.stderr)


def cmd_gate(args) -> int:
    from profiling.gate import run_gate

    if not _need_gpu("the gate"):
        return EXIT_USAGE
    _untuned_note()
    started = time.perf_counter()
    baseline, problem = _load_baseline(args.root)
    if problem is not None:
        print(f"GATE NOT RUN: {problem}", file=sys.stderr)
        return EXIT_NO_BASELINE
    from engine.config import Qwen3Config, default_config, qwen3_config

    if args.size is not None:  # compared with the baseline's model before measuring
        config = qwen3_config(args.size)
    else:
        config = default_config()
        stored = baseline["model"]["config"]
        if any(getattr(config, k) != v for k, v in stored.items()):
            config = Qwen3Config(**{**config.__dict__, **stored, "source": "<baseline>"})
    model = build(config)
    try:
        result, current = run_gate(model, baseline, seed=_seed(args), **_ranks_kw())
    except BaselineError as exc:
        print(f"GATE NOT RUN: {exc}", file=sys.stderr)
        return EXIT_NO_BASELINE
    if args.strict:
        result = result.strict()
    if args.out and RANKS.root:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        current["gate"] = result.to_json()
        report.write_json(current, Path(args.out) / "gate.json")
    print(result.summary())
    _print_tp(current)
    print(f"gate time: {time.perf_counter() - started:.0f} s")
    return EXIT_OK if result.ok else EXIT_FAIL


def _measure_run(args) -> dict:
    from profiling.gate import measure_gate_stages

    model = build_model(args)
    plan, seed = plan_from(args), _seed(args)
    return measure_gate_stages(model, plan, seed=seed, stages=args.stages, **_ranks_kw())


def cmd_measure(args) -> int:
    if not HAS_GPU:
        print(CPU_NOTE)
    run = _measure_run(args)
    _print_tp(run)
    if not RANKS.root:
        return EXIT_OK
    out = Path(args.out or "run")
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(run, out / "run.json")
    print(f"wrote {out / 'run.json'}")
    return EXIT_OK


def _runs_for_record(args) -> list[dict]:
    """This process's run plus processes - 1 runs in fresh processes (a figure varies more
    between processes than within one: the baseline's limits must see that)."""
    runs = [_measure_run(args)]
    if RANKS.sharded and args.processes > 1:
        # Rank 0 alone starts the other runs (a torchrun each, forming their own group).
        RANKS.barrier()
        dist.destroy_process_group()
        if not RANKS.root:
            return runs
    passed = _measure_args(args)
    launcher, env = [sys.executable], None
    if RANKS.sharded and args.processes > 1:
        torch.cuda.empty_cache()
        n = RANKS.world_size
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
        passed += ["--tp", str(n)]
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
        env = {k: v for k, v in env.items() if not k.startswith("TORCHELASTIC_")}
    for i in range(args.processes - 1):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [*launcher, "-m", "profiling", "measure", "--out", tmp, *passed]
            print(f"+ run {i + 2} of {args.processes}: {' '.join(cmd)}", flush=True)
            if subprocess.run(cmd, env=env).returncode != 0:
                raise RuntimeError(f"run {i + 2} of the record failed")
            runs.append(json.loads((Path(tmp) / "run.json").read_text()))
    return runs


def _measure_args(args) -> list[str]:
    """The model and plan options given, for ``measure`` in another process."""
    passed = [a for a in ("--small",) if getattr(args, a[2:])]
    for name in ("size", "layers", "batches", "rounds", "prompt_len", "new_tokens"):
        value = getattr(args, name)
        if value is not None:
            flag = "--" + name.replace("_", "-")
            passed += [flag, *map(str, value if isinstance(value, list) else [value])]
    return passed


# What torchrun sets for its workers: not inherited by a nested torchrun's workers.
TORCHRUN_ENV = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def cmd_record(args) -> int:
    if args.combine:
        runs = validate.read_runs(args.combine)  # RunError names the file and field: exit 2
    elif not _need_gpu("record"):
        return EXIT_USAGE
    else:
        _untuned_note()
        runs = _runs_for_record(args)
        if not RANKS.root:
            return EXIT_OK
    cpu = [i + 1 for i, run in enumerate(runs) if "e2e" not in run]
    if cpu:
        print(
            f"--combine: run(s) {', '.join(map(str, cpu))} measured no launches, kernel time or "
            "decode (CPU runs): nothing to record",
            file=sys.stderr,
        )
        return EXIT_USAGE
    bad = [r for run in runs for r in run.get("numerics", []) if not r["ok"]]
    if bad:
        print(f"numerics fail ({len(bad)} checks): nothing recorded", file=sys.stderr)
        for r in bad:
            print(
                f"  {r['name']}/{r['dtype']}/m{r['rows']}: {'; '.join(r['failures'])}",
                file=sys.stderr,
            )
        return EXIT_FAIL
    try:
        current = baselines.combine_runs(runs)
        path, replaced = baselines.write_baseline(current, root=args.root, force=args.force)
    except BaselineError as exc:
        print(f"NOT RECORDED: {exc}", file=sys.stderr)
        return EXIT_NO_BASELINE
    print(report.text(current, None))
    print(f"\nfrom {len(runs)} run(s) in separate processes")
    if replaced:
        print(f"\nreplaced the baseline of {replaced}")
    print(f"wrote {path}: commit it (git add {path})")
    return EXIT_OK


def _pytest(extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", "-m", "bench", "-p", "no:cacheprovider", *extra]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


pytest_no_tests_collected = 5  # pytest's exit code when nothing was selected


def cmd_bench(args) -> int:
    if RANKS.sharded:
        print("error: bench runs in one process: start it without torchrun", file=sys.stderr)
        return EXIT_USAGE
    if not _need_gpu("benchmarks"):
        return EXIT_USAGE
    _untuned_note()
    if args.save:
        rc = _pytest([*baselines.pytest_benchmark_save_args(root=args.root), *args.pytest_args])
        return EXIT_FAIL if rc else EXIT_OK
    try:
        path = baselines.kernel_benchmark_file(root=args.root)
        saved = baselines.load_kernel_benchmarks(path)
    except BaselineError as exc:
        print(f"KERNEL MEDIANS NOT COMPARED: {exc}", file=sys.stderr)
        return EXIT_NO_BASELINE
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "current.json"
        compare_args = baselines.pytest_benchmark_compare_args(path, root=args.root)
        rc = _pytest([*compare_args, f"--benchmark-json={out}", *args.pytest_args])
        if rc == pytest_no_tests_collected:
            print("error: no benchmark selected (check -k)", file=sys.stderr)
            return EXIT_USAGE
        if rc:
            return EXIT_FAIL
        current = json.loads(out.read_text())
    rows = gate.compare_kernel_benchmarks(saved, current)
    slower = [r for r in rows if r["verdict"] == "SLOWER"]
    print(f"\nKernel benchmarks, fused / reference in one process, against {path}:")
    print(gate.kernel_bench_table(rows))
    print(f"\nbench: {'FAIL' if slower else 'PASS'} ({len(slower)} of {len(rows)} slower)")
    return EXIT_FAIL if slower else EXIT_OK


def _ab_repo(what: str) -> Path:
    """The git checkout of this tree (the code running: the A/B's "new" side)."""
    if RANKS.sharded:
        raise UsageError(f"{what} runs in one process: start it without torchrun")
    repo = ab.git_toplevel(measure.REPO_ROOT)
    if repo is None:
        raise UsageError(f"{what} needs a git checkout: {measure.REPO_ROOT} is not inside one")
    return repo


def _ab_setup(args):
    """The pairs, the measure options and the numerics seed of an A/B or a bisect."""
    if not HAS_GPU:
        print(CPU_NOTE)
    pairs = args.pairs if args.pairs is not None else (ab.DEFAULT_PAIRS if HAS_GPU else 1)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"numerics inputs: seed {seed} in every process (replay with --seed {seed})")
    return pairs, _measure_args(args), seed


def cmd_ab(args) -> int:
    if args.base is None:
        raise UsageError("ab needs --base REF (the commit to compare this tree with)")
    repo = _ab_repo("ab")
    try:
        ab.resolve_commit(repo, args.base, "--base")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    pairs, passed, seed = _ab_setup(args)
    measure_fn = ab.measure_in_process(passed, seed)
    started = time.perf_counter()
    try:
        result = ab.ab(repo, args.base, measure.REPO_ROOT, pairs, measure_fn)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    except ab.ABError as exc:
        print(f"AB NOT COMPLETED: {exc}", file=sys.stderr)
        # This tree failing to run is a failure; REF's, an environment error.
        return EXIT_FAIL if exc.side == "new" else EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(result.to_json(), out / "ab.json")
    ab.plot(result, out / "ab.png")
    print(result.table())
    print(f"wrote {out / 'ab.json'}, {out / 'ab.png'} ({time.perf_counter() - started:.0f} s)")
    return EXIT_OK if result.ok else EXIT_FAIL


def cmd_bisect(args) -> int:
    if len(args.pytest_args) != 2:
        raise UsageError(
            f"bisect needs GOOD and BAD (two commits), got {len(args.pytest_args)} argument(s)"
        )
    good, bad = args.pytest_args
    repo = _ab_repo("bisect")
    pairs, passed, seed = _ab_setup(args)

    def ab_of(good_tree, good_commit, tree, commit, figure):
        # Once the figure is known, each process measures only its stage (and batch), where
        # GOOD's tree can (a tree older than --stages measures every stage).
        scope = ab.scope_args(figure) if figure and ab.measures_stages(good_tree) else []
        measure_fn = ab.measure_in_process([*passed, *scope], seed)
        runs = ab.run_pairs(good_tree, good_commit, tree, commit, pairs, measure_fn)
        return ab.compare_runs(runs, good_commit, commit)

    started = time.perf_counter()
    try:
        result = ab.bisect(repo, good, bad, ab_of, figure=args.figure)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    except ab.ABError as exc:  # GOOD or BAD could not be measured
        print(f"BISECT NOT COMPLETED: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        report.write_json(result.to_json(), Path(args.out) / "bisect.json")
    print(ab.bisect_text(result))
    print(f"bisect time: {time.perf_counter() - started:.0f} s")
    return EXIT_OK if result.first_bad is None else EXIT_FAIL


def cmd_onboard(args) -> int:
    from profiling.onboard import onboard

    if RANKS.sharded:
        print("error: onboard runs in one process: start it without torchrun", file=sys.stderr)
        return EXIT_USAGE
    if not _need_gpu("onboarding"):
        return EXIT_USAGE
    return onboard(root=Path(args.root), force=args.force, retune=args.retune)


# --------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _env_rank() -> int:
    try:
        return tp.rank_from_env()
    except tp.ParallelError:
        return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        if _env_rank() != 0:  # under torchrun only rank 0 says it
            time.sleep(QUIET_RANK_EXIT_DELAY_S)
            self.exit(EXIT_USAGE)
        super().error(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m profiling", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "command",
        nargs="?",
        default="report",
        choices=("report", "gate", "record", "measure", "bench", "onboard", "ab", "bisect"),
    )
    p.add_argument(
        "--out",
        default=None,
        help="report: output folder (default ./report); gate: also write gate.json there; "
        "ab: ab.json and ab.png (default ./ab); bisect: bisect.json",
    )
    p.add_argument("--root", default=str(baselines.BASELINE_ROOT), help="baselines folder")
    p.add_argument("--seed", type=int, default=None, help="numerics inputs' seed (default fresh)")
    p.add_argument("--small", action="store_true", help="the CPU's 2-layer model on any device")
    p.add_argument("--layers", type=_positive, default=None, help="report/record: layer count")
    p.add_argument(
        "--size",
        choices=tuple(QWEN3_SIZES),
        default=None,
        help="the Qwen3 architecture measured, random weights (default 0.6b; gate: the baseline's)",
    )
    p.add_argument(
        "--tp",
        type=_positive,
        default=None,
        help="tensor-parallel ranks: must equal torchrun's WORLD_SIZE (default: WORLD_SIZE)",
    )
    p.add_argument("--batches", type=_positive, nargs="+", default=None, help="decode batches")
    p.add_argument("--rounds", type=_positive, default=None, help="timed decode rounds (>= 5)")
    p.add_argument("--prompt-len", type=_positive, default=None)
    p.add_argument("--new-tokens", type=_positive, default=None)
    p.add_argument(
        "--force",
        action="store_true",
        help="record: replace a baseline of another model, plan or set of fusions; "
        "onboard: record both baselines anew",
    )
    p.add_argument(
        "--retune", action="store_true", help="onboard: tune buckets this GPU's tables hold too"
    )
    p.add_argument("--save", action="store_true", help="bench: save the run as the baseline")
    p.add_argument(
        "--processes",
        type=_positive,
        default=3,
        help="record: runs in separate processes combined into the baseline (default 3)",
    )
    p.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="RUN.json",
        help="record: build the baseline from runs already measured (measure or gate --out "
        "files) instead of measuring",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="REF",
        help="ab (and gate --base): the commit this tree is compared with",
    )
    p.add_argument(
        "--pairs",
        type=_positive,
        default=None,
        help=f"ab/bisect: pairs of fresh processes (default {ab.DEFAULT_PAIRS} on a GPU, 1 on CPU)",
    )
    p.add_argument(
        "--figure", default=None, help="bisect: the figure (default: the first BAD is slower on)"
    )
    p.add_argument(
        "--stages",
        nargs="+",
        choices=gate.STAGE_NAMES,
        default=None,
        help="measure: only these stages (default all; bisect measures one figure's stage)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="gate: a figure faster than its baseline beyond tolerance fails (re-record)",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    p.add_argument(
        "pytest_args", nargs="*", default=[], help="bench: extra pytest arguments; bisect: GOOD BAD"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown and args.command != "bench":
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "gate" and args.base is not None:
        args.command = "ab"  # gate --base REF: the A/B against REF (no baseline read)
    for option, commands in (
        ("base", ("ab",)),
        ("pairs", ("ab", "bisect")),
        ("figure", ("bisect",)),
        ("stages", ("measure",)),
        ("strict", ("gate",)),
    ):
        if getattr(args, option) not in (None, False) and args.command not in commands:
            p.error(f"--{option} applies to {' and '.join(commands)} only")
    if args.pytest_args and args.command not in ("bench", "bisect"):
        p.error(f"unrecognized arguments: {' '.join(args.pytest_args)}")
    args.pytest_args = [*args.pytest_args, *unknown]
    if args.rounds is not None and args.rounds < 5:
        p.error("--rounds must be >= 5 (a median of at least 5)")
    if args.command == "gate" and (args.layers or args.small or args.batches):
        p.error("gate measures what its baseline measured: --layers/--small/--batches do not apply")
    if args.size is not None and args.small:
        p.error("--size and --small choose the model both: give one")
    if args.size is not None and not HAS_GPU:
        p.error(f"--size {args.size} needs a CUDA GPU (without one the small model runs)")
    if args.out is None and args.command == "report":
        args.out = "report"
    if args.out is None and args.command == "ab":
        args.out = "ab"
    try:
        _check_before_measuring(args)
        status = _start_ranks(args)
        if status is not None:
            return status
        try:
            status = _run_command(args)
            if RANKS.sharded and dist.is_initialized():
                # Every rank done before any leaves: gloo aborts a rank whose peer has gone.
                RANKS.barrier()
            return status
        finally:
            if RANKS.sharded and dist.is_initialized():
                dist.destroy_process_group()
    except USER_ERRORS as exc:
        if args.debug:
            raise
        return _fail(str(exc))


class UsageError(ValueError):
    """A user error found before measuring: one line, exit 2."""


# One line and exit 2 (--debug: the traceback). OSError: a file given or written (--out,
# --root, --combine) that cannot be read or written, the disk full, a read-only filesystem.
USER_ERRORS = (UsageError, validate.RunError, BackendError, MemoryFitError, OSError)


def _check_before_measuring(args) -> None:
    """What can be checked before anything is measured: the Triton backend setting, the
    folders the command will write, and sizes against the model and free memory."""
    check_backend()
    if args.out is not None and args.command in ("report", "measure", "gate", "ab", "bisect"):
        _check_writable_folder(args.out, "--out")
    elif args.command == "measure":
        _check_writable_folder("run", "--out (default run)")
    if args.command in ("record", "onboard") and HAS_GPU:
        _check_writable_folder(args.root, "--root")
    if args.command in ("report", "measure", "record", "ab", "bisect") and not args.combine:
        _check_sizes(args)


def _check_writable_folder(path, option: str) -> None:
    """``path`` is a folder this process can write a file in, or can create: nothing is
    created here (an input checked after this may still fail the command)."""
    import errno

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {folder}: exists and is not a folder (give a folder path)")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as exc:
        why = exc.strerror or errno.errorcode.get(exc.errno, str(exc))
        raise UsageError(f"{option} {folder}: cannot write there ({why})") from exc


def _check_sizes(args) -> None:
    """The plan's cache positions against the model, and its memory against the device's
    free memory (a shard's share under tensor parallelism)."""
    config, plan = model_config(args), plan_from(args)
    positions = max(plan.prompt_len + plan.new_tokens + 8, plan.prompt_len + plan.launch_steps + 4)
    if positions > config.max_position_embeddings:
        raise UsageError(
            f"--prompt-len {plan.prompt_len} and --new-tokens {plan.new_tokens} need {positions} "
            f"cache positions; the model ({config.source}) has max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    batch = max(plan.batches)
    need = memory_need(
        config, torch.bfloat16, batch=batch, seq_len=positions, prompt_len=plan.prompt_len
    )
    try:
        ranks = max(1, tp.world_size_from_env())
    except tp.ParallelError:
        ranks = 1
    shares = type(need)(
        need.weights // ranks, need.rope_tables, need.kv_cache // ranks, need.activations // ranks
    )
    check_fits(
        shares,
        # Under torchrun each rank's own GPU (no CUDA context made on another rank's).
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_available()
        else torch.device("cpu"),
        f"the model ({config.num_hidden_layers} layers"
        + (" (--layers)" if args.layers else "")
        + f", hidden {config.hidden_size}) with "
        f"--batches up to {batch}, --prompt-len {plan.prompt_len}, --new-tokens "
        f"{plan.new_tokens}",
    )


def _fail(message: str) -> int:
    """A one-line error from rank 0 (every rank fails the same check), exit 2."""
    if _env_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    else:
        time.sleep(QUIET_RANK_EXIT_DELAY_S)
    return EXIT_USAGE


def _start_ranks(args) -> int | None:
    """Under torchrun: check --tp against WORLD_SIZE, join the group, quiet ranks but 0.
    Returns an exit status on a user error (None: go on)."""
    global RANKS
    try:
        world = tp.world_size_from_env()
    except tp.ParallelError as exc:
        return _fail(str(exc))
    wanted = world if args.tp is None else args.tp
    if wanted != world:
        return _fail(
            f"--tp {wanted} but WORLD_SIZE is {world}: run one process per rank, torchrun "
            f"--nproc-per-node {wanted} -m profiling {args.command} --tp {wanted} ..."
        )
    if world == 1:
        return None
    try:
        if args.command != "gate":  # gate: the baseline's model, checked when it is built
            tp.check_layout(model_config(args), world)
        parallel, device = tp.init_distributed(world)
    except tp.ParallelError as exc:
        return _fail(str(exc))
    RANKS = Ranks(parallel, device)
    if not RANKS.root:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return None


def _run_command(args) -> int:
    commands = {
        "report": cmd_report,
        "gate": cmd_gate,
        "record": cmd_record,
        "measure": cmd_measure,
        "bench": cmd_bench,
        "onboard": cmd_onboard,
        "ab": cmd_ab,
        "bisect": cmd_bisect,
    }
    try:
        return commands[args.command](args)
    except TraceError as exc:
        print(f"launch counting failed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except tp.ParallelError as exc:  # a layout that does not divide (gate: the baseline's)
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
