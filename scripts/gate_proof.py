"""Prove the gate on a GPU: unchanged code passes it every time, and every planted regression
fails it.

Each run copies the tree (the working tree's files, with this GPU's baseline), applies one
plant by editing the copy's source, runs ``python -m profiling gate`` there in a fresh
process, and records the verdict (exit code), the failing checks and the time. Plants:

- ``flag_off``         o_proj_residual is no longer among the engine's default fusions
- ``extra_kernel``     one extra kernel per o_proj_residual instance (an in-place add of 0)
- ``slow_5pct``        the linear+residual kernel ~5% slower at decode sizes: every program
                       runs a dependent chain of 100 float32 FMAs after its dot (no launch, no
                       numerical change)
- ``gain_halved``      the same with 1000 FMAs (~2 µs a call): about half of o_proj_residual's
                       end-to-end gain gone
- ``numerics_1e2``     o_proj_residual scales the residual by 1.01 (errors ~1e-2)
- ``fp32_tf32``        the kernel's float32 tl.dot in TF32 instead of IEEE float32
- ``residual_dropped`` o_proj_residual leaves the residual out
- ``attention_slow_5pct``    decode attention ~5% slower: a dependent chain of 100 float32
                             FMAs per program before its output (an op the step runs alone:
                             its kernel ratio against a copy)
- ``qk_norm_rope_slow_5pct`` q/k norm + RoPE ~5% slower: a chain of 60 FMAs per program
- the MLP-block kernel (``mlp_block``, one launch over two steps; gated through its variant
  ``alt+mlp_block``): ``mlp_block_extra_kernel`` (an extra kernel per instance),
  ``mlp_block_stage_slow_5pct`` (its down stage 60 FMAs slower per tile, inside the launch),
  ``mlp_block_numerics`` (the down stage scales the residual by 1.01), ``mlp_block_off``
  (decode never takes the one-launch kernel: its two-kernel path instead)

    python -m scripts.gate_proof --out proof --runs 10 --gpus 0 1   # ~8 min on two H100s
    python -m scripts.gate_proof --rejudge proof     # stored runs vs the current baseline

With several GPUs, runs go to them in parallel, one gate per GPU at a time. ``--rejudge``
judges the runs a proof stored (each run's gate.json) against the committed baseline again,
without measuring: after a baseline is rebuilt, it shows what the stored runs would have got
(in sample: those runs may be part of the new baseline; only a new proof is out of sample).

Tensor parallel (``--tp N``): every run is ``torchrun --standalone --nproc-per-node N -m
profiling gate --tp N`` on N GPUs of ``--gpus`` (taken N at a time: with ``--gpus 0 1`` and
``--tp 2`` the runs go one after another), against ``perf_baselines/<gpu-slug>/tpN/`` (the tree
must hold one: ``gpu_pass.sh tpgate`` records it). The verdict is rank 0's exit code (torchrun
itself exits 1 for any failed rank; its failure report names each rank's code). Plants, offered
only with ``--tp`` (o_proj_residual and down_proj_residual do not apply under TP):

- ``tp_extra_kernel``     one extra kernel per norm_qkv_proj instance (an in-place add of 0)
- ``tp_slow_all_reduce``  the one-shot all-reduce + residual kernel runs a dependent chain of
                          1000 float32 FMAs per program after its sum (~2 µs a call, no
                          numerical change): its kernel ratio against NCCL all-reduce + add
- ``tp_flag_off``         norm_qkv_proj is no longer among the engine's default fusions
- ``tp_numerics``         the all-reduce + residual kernel scales the residual by 1.01

    python -m scripts.gate_proof --tp 2 --out tpproof --runs 10 --gpus 0 1   # ~18 min
    python -m scripts.gate_proof --rejudge tpproof   # each run against its own tpN baseline
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_FMA_CHAIN = """
    # planted: a dependent chain of {n} float32 FMAs per program, after the dot
    slow = tl.sum(acc, axis=1)
    for _ in range({n}):
        slow = slow * 1.0000001 + 1e-7
    acc += (slow * 0.0)[:, None]
"""


def _fma_plant(n: int):
    def apply(text: str) -> str:
        anchor = "    if SPLIT_K == 1:\n        _store_out("
        return text.replace(anchor, _FMA_CHAIN.format(n=n) + anchor, 1)

    return ("kernels/linear_residual.py", apply)


def _sub(path: str, old: str, new: str):
    return (path, lambda text: text.replace(old, new, 1))


def _chain_before(path: str, anchor: str, value: str, n: int):
    """A dependent chain of ``n`` float32 FMAs on ``value`` (a variable of the kernel), added
    back times 0 (no numerical change), just before the line ``anchor``."""
    indent = anchor[: len(anchor) - len(anchor.lstrip())]
    chain = (
        f"{indent}# planted: a dependent chain of {n} float32 FMAs per program\n"
        f"{indent}slow = tl.sum({value}) * 1.0\n"
        f"{indent}for _ in range({n}):\n"
        f"{indent}    slow = slow * 1.0000001 + 1e-7\n"
        f"{indent}{value} = {value} + slow * 0.0\n"
    )
    return _sub(path, anchor, chain + anchor)


def attention_plant(n: int):
    """Decode attention ``n`` FMAs slower per program, before its output."""
    return _chain_before("kernels/decode_attention.py", "    out = acc / l_i[:, None]\n", "l_i", n)


def qk_norm_rope_plant(n: int):
    """q/k norm + RoPE ``n`` FMAs slower per program, after its wait."""
    return _chain_before(
        "kernels/qk_norm_rope.py", "    dtype = qkv_ptr.dtype.element_ty\n", "cos", n
    )


def mlp_block_stage_plant(n: int):
    """The MLP-block kernel's down stage ``n`` FMAs slower per tile, inside the one launch."""
    return _chain_before(
        MLP_KERNEL, "    mask = (offs_m < M)[:, None] & (offs_n < K)[None, :]\n", "acc", n
    )


MLP_KERNEL = "kernels/mlp_block.py"
MLP_BLOCK = (
    "fused=lambda residual, norm_weight, eps, gate_up_weight, down_proj_weight: mlp_block(\n"
    "            residual, norm_weight, gate_up_weight, down_proj_weight, eps\n"
    "        ),"
)
O_PROJ = (
    "fused=lambda attn, residual, o_proj_weight: linear_residual(\n"
    "        attn, residual, o_proj_weight, out=residual\n"
    "    ),"
)
PLANTS = {
    "flag_off": _sub(
        "engine/fusions.py",
        'doc="attention output projection + attention residual add (in place)",',
        'doc="attention output projection + attention residual add (in place)",\n'
        "    default=False,",
    ),
    "extra_kernel": _sub(
        "engine/fusions.py",
        O_PROJ,
        O_PROJ.replace("out=residual\n    ),", "out=residual\n    ).add_(0),"),
    ),
    "slow_5pct": _fma_plant(100),
    "gain_halved": _fma_plant(1000),
    "numerics_1e2": _sub(
        "engine/fusions.py", O_PROJ, O_PROJ.replace("out=residual", "1.01, out=residual")
    ),
    "fp32_tf32": _sub(
        "kernels/gemv.py",
        'acc = tl.dot(a, b, acc, input_precision="ieee")',
        'acc = tl.dot(a, b, acc, input_precision="tf32")',
    ),
    "residual_dropped": _sub(
        "engine/fusions.py", O_PROJ, O_PROJ.replace("out=residual", "0.0, out=residual")
    ),
    "attention_slow_5pct": attention_plant(100),
    "qk_norm_rope_slow_5pct": qk_norm_rope_plant(60),
    # The kernel that spans two steps (mlp_block, a variant outside the default).
    "mlp_block_extra_kernel": _sub(
        "engine/fusions.py",
        MLP_BLOCK,
        MLP_BLOCK.replace("eps\n        ),", "eps\n        ).add_(0),"),
    ),
    "mlp_block_stage_slow_5pct": mlp_block_stage_plant(60),
    "mlp_block_numerics": _sub(MLP_KERNEL, "(acc + r + poison)", "(acc + r * 1.01 + poison)"),
    "mlp_block_off": _sub(MLP_KERNEL, "MAX_ROWS = 16\n", "MAX_ROWS = 0\n"),
}


_AR_FMA_CHAIN = """
    # planted: a dependent chain of {n} float32 FMAs per program, after the sum
    slow = tl.sum(total, axis=0)
    for _ in range({n}):
        slow = slow * 1.0000001 + 1e-7
    total += slow * 0.0
"""
AR_KERNEL = "kernels/all_reduce_residual.py"
AR_RESIDUAL = "    r = tl.load(residual_ptr + offs, mask=mask).to(tl.float32)\n"
NORM_QKV = (
    "fused=lambda residual, norm_weight, eps, qkv_weight: rms_norm_linear(\n"
    "            residual, norm_weight, qkv_weight, eps\n"
    "        ),"
)
# Only under --tp: the single-GPU plants edit o_proj_residual, which never runs under TP.
TP_PLANTS = {
    "tp_extra_kernel": _sub(
        "engine/fusions.py",
        NORM_QKV,
        NORM_QKV.replace("eps\n        ),", "eps\n        ).add_(0),"),
    ),
    "tp_slow_all_reduce": _sub(AR_KERNEL, AR_RESIDUAL, _AR_FMA_CHAIN.format(n=1000) + AR_RESIDUAL),
    "tp_flag_off": _sub(
        "engine/fusions.py",
        'doc="input RMSNorm computed in the q/k/v projection\'s prologue",',
        'doc="input RMSNorm computed in the q/k/v projection\'s prologue",\n        default=False,',
    ),
    "tp_numerics": _sub(
        AR_KERNEL, AR_RESIDUAL, AR_RESIDUAL.replace(".to(tl.float32)", ".to(tl.float32) * 1.01")
    ),
}
ALL_PLANTS = {**PLANTS, **TP_PLANTS}


def copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, without .git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # a copied tree without .git
        skip = {".git", "__pycache__", ".pytest_cache", ".tox", ".whl", ".benchmarks", "results"}
        listed = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        ]
    for rel in listed:
        src = ROOT / rel
        if src.is_file() and not rel.startswith("results/"):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def plant(tree: Path, name: str) -> None:
    path, apply = ALL_PLANTS[name]
    target = tree / path
    text = target.read_text()
    changed = apply(text)
    if changed == text:
        raise SystemExit(f"plant {name}: its anchor is not in {path} (the code moved: update it)")
    target.write_text(changed)


# A torchrun failure report: each failed rank's number, then its exit code.
_RANK_EXIT = re.compile(r"^\s*rank\s*:\s*(\d+).*\n\s*exitcode\s*:\s*(-?\d+)", re.M)


def child_exit(returncode: int, log: str) -> int:
    """The gate's exit code from torchrun's: torchrun exits 1 whenever a rank fails (a gate
    FAIL, a missing baseline, a crash alike), so a failure is read from its report: rank 0's
    code, else the lowest rank's. A negative code is a rank torchrun stopped (a signal) after
    another rank had exited: not that rank's own verdict."""
    if returncode == 0:
        return 0
    codes = {int(rank): int(code) for rank, code in _RANK_EXIT.findall(log)}
    own = {rank: code for rank, code in codes.items() if code > 0}
    if not own:
        return returncode
    return own[min(own)]


def gate_command(tp: int, out: Path) -> list[str]:
    gate = ["-m", "profiling", "gate"]
    if tp == 1:
        return [sys.executable, *gate, "--out", str(out)]
    # torch.distributed.run is torchrun, under this interpreter.
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}"]
    return [sys.executable, *torchrun, *gate, "--tp", str(tp), "--out", str(out)]


# What torchrun sets for its workers: a proof started under torchrun must not pass them on.
_TORCHRUN_ENV = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _failing(gate_json: Path, stdout: str) -> list[tuple[str, str]]:
    """(stage, key) of each failing check: from the run's gate.json, else from its printout
    (a gate that stopped before writing it)."""
    try:
        checks = json.loads(gate_json.read_text())["gate"]["checks"]
    except (OSError, ValueError, KeyError, TypeError):
        return re.findall(r"^\s+FAIL \[([a-z_]+)\] (\S+)", stdout, flags=re.M)
    return [(c["stage"], c["key"]) for c in checks if not c["ok"]]


def run_one(work: Path, label: str, name: str | None, gpu: str, out: Path, tp: int = 1) -> dict:
    tree = work / label
    if tree.exists():
        shutil.rmtree(tree)
    copy_tree(tree)
    if name is not None:
        plant(tree, name)
    # A gate.json left by an earlier proof in this folder must not stand for this run.
    shutil.rmtree(out / label, ignore_errors=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONPATH": str(tree)}
    if tp > 1:
        env = {
            k: v
            for k, v in env.items()
            if k not in _TORCHRUN_ENV and not k.startswith("TORCHELASTIC_")
        }
    env.setdefault("FUSIONGUARD_COMMIT", "proof")
    started = time.perf_counter()
    proc = subprocess.run(
        gate_command(tp, out / label),
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    (out / f"{label}.log").write_text(log)
    code = proc.returncode if tp == 1 else child_exit(proc.returncode, log)
    failing = _failing(out / label / "gate.json", proc.stdout)
    gate_time = re.search(r"gate time: (\d+) s", proc.stdout)
    shutil.rmtree(tree, ignore_errors=True)
    return {
        "label": label,
        "plant": name,
        "gpu": gpu,
        "exit": code,
        "verdict": {0: "PASS", 1: "FAIL", 2: "USAGE", 3: "NO BASELINE"}.get(code, "?"),
        "failing": [f"{stage} {key}" for stage, key in failing],
        "failing_stages": sorted({stage for stage, _ in failing}),
        "seconds": round(seconds, 1),
        "gate_seconds": int(gate_time.group(1)) if gate_time else None,
    }


def rejudge(folder: Path, root: Path | None = None) -> int:
    """Each stored run against the current baseline of its GPU and TP size (timing checks that
    the run measured twice are judged on the second measurement, as the gate did). ``root``:
    the baselines folder (default: the committed one)."""
    from profiling.baselines import BASELINE_ROOT, load_baseline
    from profiling.gate import compare

    results = []
    for path in sorted(folder.glob("*/gate.json")):
        run = json.loads(path.read_text())
        tp = run["model"].get("tp", 1)
        baseline = load_baseline(run["gpu_slug"], root=root or BASELINE_ROOT, tp=tp)
        run.pop("gate", None)
        failing = {(c.stage, c.key) for c in compare(run, baseline).failures}
        if "remeasured" in run:
            again = {**run, **run["remeasured"]}
            timing = {(c.stage, c.key) for c in compare(again, baseline).failures if c.timing}
            failing = {f for f in failing if f[0] not in ("kernel_ratio", "tok_s", "speedup")}
            failing |= timing
        plant = None if path.parent.name.startswith("unchanged") else path.parent.name[6:]
        results.append(
            {
                "label": path.parent.name,
                "plant": plant,
                "verdict": "FAIL" if failing else "PASS",
                "failing": sorted(f"{s} {k}" for s, k in failing),
            }
        )
        stages = sorted({f.split()[0] for f in results[-1]["failing"]})
        print(f"{path.parent.name:24s} {results[-1]['verdict']}  {', '.join(stages)}")
    (folder / "rejudged.json").write_text(json.dumps(results, indent=1) + "\n")
    unchanged = [r for r in results if r["plant"] is None]
    planted = [r for r in results if r["plant"] is not None]
    passed = sum(r["verdict"] == "PASS" for r in unchanged)
    failed = sum(r["verdict"] == "FAIL" for r in planted)
    print(
        f"rejudged: unchanged {passed}/{len(unchanged)} pass, plants {failed}/{len(planted)} fail"
    )
    return 0 if passed == len(unchanged) and failed == len(planted) else 1


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def gpu_groups(gpus: list[str], tp: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES of each job slot: ``tp`` GPUs of ``gpus`` each, in order."""
    return [",".join(gpus[i : i + tp]) for i in range(0, len(gpus) - tp + 1, tp)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="proof")
    p.add_argument("--runs", type=int, default=10, help="runs of unchanged code")
    p.add_argument(
        "--plants",
        nargs="*",
        default=None,
        choices=list(ALL_PLANTS),
        help=f"default: {', '.join(PLANTS)}; with --tp: {', '.join(TP_PLANTS)}",
    )
    p.add_argument("--gpus", nargs="+", default=["0"])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per gate (torchrun)")
    p.add_argument("--work", default="/tmp/fusionguard-proof")
    p.add_argument("--rejudge", type=Path, default=None, help="a proof folder to judge again")
    args = p.parse_args(argv)
    if args.rejudge is not None:
        return rejudge(args.rejudge)
    if args.tp < 1:
        return _usage(f"--tp must be >= 1, got {args.tp}")
    if len(args.gpus) < args.tp or len(args.gpus) % args.tp:
        return _usage(
            f"--gpus lists {len(args.gpus)} GPU(s) ({' '.join(args.gpus)}): --tp {args.tp} "
            f"takes {args.tp} per gate, so list a multiple of {args.tp}"
        )
    offered = TP_PLANTS if args.tp > 1 else PLANTS
    plants = list(offered) if args.plants is None else args.plants
    other = [name for name in plants if name not in offered]
    if other:
        where = f"with --tp {args.tp}" if args.tp > 1 else "without --tp"
        return _usage(
            f"--plants {' '.join(other)}: not offered {where} (choose from {', '.join(offered)})"
        )
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    # Plants and unchanged runs alternate, so that a pass cut short has some of both.
    unchanged = [(f"unchanged_{i + 1}", None) for i in range(args.runs)]
    planted = [(f"plant_{name}", name) for name in plants]
    jobs = [job for pair in itertools.zip_longest(planted, unchanged) for job in pair if job]
    slots = gpu_groups(args.gpus, args.tp)
    free: queue.Queue[str] = queue.Queue()
    for gpu in slots:
        free.put(gpu)
    done: list[dict] = []
    lock = threading.Lock()

    def job(label_name):
        gpu = free.get()
        try:
            result = run_one(work, *label_name, gpu, out, args.tp)
        finally:
            free.put(gpu)
        with lock:  # written as it goes: a pass cut short keeps what finished
            done.append(result)
            (out / "proof.json").write_text(json.dumps({"results": done}, indent=1) + "\n")
        # A plant must FAIL (exit 1): a run that never got to judge (2, 3) proves nothing.
        expected = 0 if result["plant"] is None else 1
        mark = "ok" if result["exit"] == expected else "UNEXPECTED"
        print(
            f"{result['label']:24s} gpu {gpu}: {result['verdict']:5s} {mark:10s} "
            f"{result['seconds']:5.0f} s  {', '.join(result['failing_stages'])}",
            flush=True,
        )
        return result

    with concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
        results = list(pool.map(job, jobs))
    unchanged = [r for r in results if r["plant"] is None]
    planted = [r for r in results if r["plant"] is not None]
    summary = {
        "unchanged_passed": sum(r["exit"] == 0 for r in unchanged),
        "unchanged_runs": len(unchanged),
        "plants_failed": sum(r["exit"] == 1 for r in planted),
        "plants": len(planted),
        "max_gate_seconds": max((r["gate_seconds"] or 0) for r in results),
        **({"tp": args.tp} if args.tp > 1 else {}),
        "results": results,
    }
    (out / "proof.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"unchanged: {summary['unchanged_passed']}/{summary['unchanged_runs']} passed; "
        f"plants: {summary['plants_failed']}/{summary['plants']} failed; "
        f"slowest gate {summary['max_gate_seconds']} s"
    )
    ok = summary["unchanged_passed"] == len(unchanged) and summary["plants_failed"] == len(planted)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
