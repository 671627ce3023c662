"""The measurements of the suite, stage by stage, for every registered fusion.

Each stage returns plain JSON-able data; profiling/gate.py lists the stages, runs them and
compares a run with a baseline, profiling/baselines.py turns a run into a baseline and stores
it, ``python -m profiling`` writes the report.

1. launches   kernels per decode step (= per token at batch 1) per variant, mode (eager, CUDA
              graph) and batch size, attributed to every segment (fusion step or unfused op)
2. numerics   every fusion's numerics rule at the model's shapes through the fused callable
              the engine calls, in the model's dtype and fp32; and the whole engine (default
              fusions vs all unfused) against an fp32 copy of itself
3. kernels    every fusion step's time over its unfused ops and its peers, at decode sizes
4. e2e        decode tok/s of the variants, interleaved; speed-ups per pairing
and, for the report only: eager decode (host-bound: not gated) and the time breakdown.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from engine import fusions as registry
from engine.flags import FusionFlags
from engine.program import bytes_moved, span_instances, span_ops
from kernels.runtime import INTERPRETING, backend, gpu_name, gpu_slug
from profiling import throughput
from profiling.launches import profile_decode
from profiling.numerics import NumericsResult, check_fusion, judge, judge_model, tf32_off

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "fusionguard-report/2"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run measures. The gate measures what its baseline's plan says."""

    prompt_len: int = 16
    new_tokens: int = 48
    rounds: int = 6
    batches: tuple[int, ...] = (1, 8)
    kernel_rows: tuple[int, ...] = (1, 8)
    kernel_rounds: int = 33  # the median of 33 rounds: docs/definitions.md, "Kernel timing"
    numerics_rows: tuple[int, ...] = (1, 8, 64)
    launch_steps: int = 3

    def settings(self) -> throughput.Settings:
        return throughput.Settings(self.prompt_len, self.new_tokens, self.rounds)

    def to_json(self) -> dict:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        )


CPU_PLAN = Plan(prompt_len=4, new_tokens=4, rounds=5, batches=(1,), numerics_rows=(1, 8))

# ---------------------------------------------------------------------------------------------
# Where and what
# ---------------------------------------------------------------------------------------------


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """HEAD (with -dirty), or FUSIONGUARD_COMMIT where the tree has no .git (a copied tree)."""
    if os.environ.get("FUSIONGUARD_COMMIT"):
        return os.environ["FUSIONGUARD_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit:
        return None
    return commit + ("-dirty" if dirty else "")


def environment() -> dict:
    import triton

    return {
        "gpu": gpu_name(),
        "gpu_slug": gpu_slug(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "backend": backend(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


CONFIG_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def world_size(model) -> int:
    """The tensor-parallel size of ``model`` (1: the single-process engine)."""
    parallel = getattr(model, "parallel", None)
    return parallel.world_size if parallel is not None else 1


def applicable_fusions(model) -> list:
    """The registered fusions with a span in ``model``'s program whose kernel can run here,
    in registry order (the ones that cannot run: model.unavailable(), each with why)."""
    skip = {*model.not_applicable, *model.unavailable()}
    return [f for f in registry.all_fusions() if f.name not in skip]


def variants_and_pairings(model):
    return throughput.variants_and_pairings(applicable_fusions(model))


def model_summary(model) -> dict:
    """The model dimensions, dtype and fusions (instances, kernels per instance) of a run.
    Under tensor parallelism ``config`` is the whole model's, ``tp`` the rank count, and the
    instances are those of one rank's program (every rank runs the same program)."""
    program = model.program()
    config = getattr(model, "full_config", model.config)
    fusions = {}
    for f in registry.all_fusions():
        # Under TP o_proj_residual and down_proj_residual have no span: 0 instances.
        ops = span_ops(program, f) if span_instances(program, f) else ()
        fusions[f.name] = {
            "spans": [list(s) for s in f.spans],
            "kernel": f.kernel,
            "default": f.default,
            "instances_per_step": len(span_instances(program, f)),
            "fused_kernels": f.fused_kernels,
            "span_ops": len(ops),
            "alternatives": sorted(g.name for g in registry.all_fusions() if g.conflicts_with(f)),
        }
    return {
        "config": {name: getattr(config, name) for name in CONFIG_FIELDS},
        "dtype": str(model.dtype).removeprefix("torch."),
        "tp": world_size(model),
        "default_fusions": sorted(model.default_flags().enabled),
        "fusions": fusions,
    }


# ---------------------------------------------------------------------------------------------
# 1. Launches
# ---------------------------------------------------------------------------------------------


def launch_variants(model=None) -> list[throughput.Variant]:
    """default, none, and alt+f for every fusion outside the default (where f runs)."""
    variants, _ = throughput.variants_and_pairings(
        None if model is None else applicable_fusions(model)
    )
    return [v for v in variants if v.name in ("default", "none") or v.name.startswith("alt+")]


def launch_keys(plan: Plan, model=None) -> list[tuple[str, bool, int]]:
    """(variant, cuda_graph, batch) combinations counted: default and none eager and in CUDA
    graphs at each decode batch size; an alternative's variant in a graph at batch 1."""
    keys = []
    for v in launch_variants(model):
        if v.name in ("default", "none"):
            keys.append((v.name, False, 1))
            keys += [(v.name, True, batch) for batch in sorted({1, max(plan.batches)})]
        else:
            keys.append((v.name, True, 1))
    return keys


def launch_key(variant: str, cuda_graph: bool, batch: int) -> str:
    return f"{variant}/{'graph' if cuda_graph else 'eager'}-b{batch}"


def segment_names(model) -> list[str]:
    return sorted({op for op in model.ops} | {f.name for f in registry.all_fusions()})


def count_variant(model, variant, cuda_graph: bool, batch: int, plan: Plan) -> dict:
    from engine.runner import Runner

    saved = model.flags
    model.flags = variant.flags()
    try:
        runner = Runner(
            model,
            max_batch_size=batch,
            max_seq_len=plan.prompt_len + plan.launch_steps + 8,
            cuda_graph=cuda_graph,
        )
        counts = profile_decode(
            runner,
            plan.launch_steps,
            batch=batch,
            prompt_len=plan.prompt_len,
            ranges=segment_names(model),
        )
    finally:
        model.flags = saved
    data = counts.to_json()
    segments = {
        name: {
            "instances": r["instances_per_step"],
            "per_instance": r["per_instance"],
            "uniform": r["uniform"],
            "kernel_names": r["kernel_names"],
            **({"us_per_step": r["us_per_step"]} if "us_per_step" in r else {}),
        }
        for name, r in data["ranges"].items()
    }
    return {
        "variant": variant.name,
        "fusions": sorted(variant.fusions),
        "mode": "graph" if cuda_graph else "eager",
        "batch": batch,
        "kernels_per_step": data["kernels_per_step"],
        "memcpy_per_step": data["memcpy_per_step"],
        "memset_per_step": data["memset_per_step"],
        "uniform": data["uniform"],
        "kernel_us_per_step": data["kernel_us_per_step"],
        "replay_kernels_seen": data["replay_kernels_seen"],
        "segments": segments,
    }


def measure_launches(model, plan: Plan, progress=None) -> dict:
    variants = {v.name: v for v in launch_variants(model)}
    out = {}
    for name, graph, batch in launch_keys(plan, model):
        out[launch_key(name, graph, batch)] = count_variant(
            model, variants[name], graph, batch, plan
        )
        if progress is not None:
            progress.update(1)
    return out


# ---------------------------------------------------------------------------------------------
# 2. Numerics
# ---------------------------------------------------------------------------------------------


def measure_fusion_numerics(model, plan: Plan, seed: int) -> list[NumericsResult]:
    """Each applicable fusion at this model's (under TP: this rank's) shapes. A fusion that
    needs every rank is checked by measure_rank_fusion_numerics."""
    program = model.program()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    results = []
    for fusion in applicable_fusions(model):
        if fusion.needs_ranks:
            continue
        # A kernel that spans several steps: the whole, then each step alone (same kernel).
        for checked in (fusion, *fusion.stage_fusions()):
            for dtype in dict.fromkeys((model.dtype, torch.float32)):
                for rows in plan.numerics_rows:
                    results += check_fusion(
                        checked, program, model.config, rows, dtype, model.device, generator
                    )
    return results


def measure_model_numerics(model, plan: Plan, seed: int, steps: int = 3) -> NumericsResult:
    """Default fusions vs all unfused, both in the model's dtype, against an fp32 copy of the
    same weights run unfused (profiling.numerics.judge_model). Under TP the copy is the whole
    single-process model (engine.build draws the weights each rank holds a slice of), run on
    every rank, against the sharded model's logits."""
    import engine
    from engine.runner import Runner

    if world_size(model) > 1:
        # random_init_sharded slices engine.build's draw (same seed, device and dtype).
        full = engine.build(
            model.full_config, dtype=model.dtype, device=model.device, flags="none", seed=0
        )
        # The reference must hold the weights this rank holds a slice of (else both the
        # fused and the unfused error are large, and their ratio proves nothing).
        whole = full.hf_weight_map()
        for name, part in model.hf_weight_map().items():
            if not torch.equal(model.parallel.take(name, whole[name]), part):
                raise RuntimeError(f"the whole-model reference's {name} is not this rank's")
        del whole
        weights = full.state_dict()
        del full
        config = model.full_config
    else:
        weights, config = model.state_dict(), model.config
    reference = engine.build(config, dtype=torch.float32, device=model.device, flags="none")
    reference.load_state_dict({k: v.float() for k, v in weights.items()})
    del weights
    prompt = throughput.random_prompt(
        model.config.vocab_size, 2, plan.prompt_len, model.device, seed
    )

    def logits(m, flags, tokens=None):
        saved = m.flags
        m.flags = flags
        try:
            runner = Runner(m, max_batch_size=2, max_seq_len=plan.prompt_len + steps + 2)
            with torch.inference_mode():
                out = [runner.prefill(prompt)]
                for i in range(steps):
                    token = out[-1].argmax(-1) if tokens is None else tokens[i]
                    out.append(runner.decode(token))
            return torch.stack(out, 1)
        finally:
            m.flags = saved

    fused = logits(model, model.default_flags())
    tokens = [fused[:, i].argmax(-1) for i in range(steps)]  # teacher-forced on fused tokens
    unfused = logits(model, FusionFlags.none(), tokens)
    with tf32_off():
        ref = logits(reference, FusionFlags.none(), tokens).double()
    del reference
    return judge_model("engine.logits", fused, ref, unfused, rows=2)


def model_numerics_skip_reason(model, share=lambda v: v) -> str | None:
    """Why the whole-model check is skipped (None: it runs): an fp32 copy of the whole model
    (plus, under TP, the whole model in its dtype to slice from) must fit in half the free
    memory. Decided by rank 0 (``share``): free memory differs a little between ranks."""
    if model.device.type != "cuda":
        return share(None)
    config = getattr(model, "full_config", model.config)
    # Under TP: a rank's parameters times the rank count (over-counts the replicated ones).
    params = sum(p.numel() for p in model.parameters()) * world_size(model)
    itemsize = torch.finfo(model.dtype).bits // 8
    need = params * (4 + (itemsize if world_size(model) > 1 else 0))
    free, _ = torch.cuda.mem_get_info(model.device)
    reason = None
    if need > free / 2:
        reason = (
            f"the whole-model check needs an fp32 copy of {config.source} ({need / 2**30:.0f} "
            f"GiB), more than half the free GPU memory ({free / 2**30:.0f} GiB): skipped; the "
            "per-fusion checks ran (check the whole model on a smaller --size)"
        )
    return share(reason)


def measure_numerics(model, plan: Plan, seed: int = 0, share=lambda v: v) -> list:
    """The per-fusion checks and the whole-model check (or, where it cannot fit, a skipped
    entry with its reason). Under TP every rank calls it (collectives inside)."""
    results: list = [*measure_fusion_numerics(model, plan, seed)]
    # Registered and spanned (a TP model): checked, or skipped saying why its kernel cannot run.
    for fusion in registry.all_fusions():
        if fusion.needs_ranks and fusion.name not in model.not_applicable:
            results += measure_rank_fusion_numerics(model, fusion, plan, seed)
    reason = model_numerics_skip_reason(model, share)
    if reason is None:
        results.append(measure_model_numerics(model, plan, seed))
    else:
        print(f"numerics: {reason}")
        results.append(SkippedCheck("engine.logits", reason))
    return results


@dataclasses.dataclass
class SkippedCheck:
    """A numerics check that did not run, and why (never a failure, never a pass)."""

    name: str
    reason: str

    def to_json(self) -> dict:
        return {"name": self.name, "skipped": self.reason, "ok": True, "failures": []}


def _rank_inputs(model, rows: int, dtype: torch.dtype, seed: int):
    """This rank's partial sum (its own draw) and the residual (the same on every rank)."""
    rank = model.parallel.rank
    hidden = model.config.hidden_size
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed * 31 + rank + 1))
    residual = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed))
    return x.to(model.device, dtype), residual.to(model.device, dtype)


def measure_rank_fusion_numerics(model, fusion, plan: Plan, seed: int) -> list:
    """A fusion that needs every rank (``Fusion.needs_ranks``: the all-reduce of this rank's
    partial + the residual add) against the gathered float64 sum (a collective), held to its
    unfused ops' error (NCCL's all-reduce + the add). Where its kernel cannot run (CPU, gloo,
    no symmetric memory) a skipped entry says why."""
    kernel = fusion.kernel_module()
    launch = getattr(kernel, fusion.kernel)
    check = f"{fusion.name}.{fusion.outputs[0]}"
    group = model.parallel.group
    reason = kernel.unavailable_reason(model.device, group)  # a collective on CUDA
    if reason is not None:
        return [SkippedCheck(check, f"kernel unavailable: {reason}")]
    results = []
    for dtype in dict.fromkeys((model.dtype, torch.float32)):
        for rows in plan.numerics_rows:
            x, residual = _rank_inputs(model, rows, dtype, seed)
            exact = kernel.gathered_float64_reference(x, residual, group)
            with tf32_off():
                unfused = kernel.reference(x.clone(), residual.clone(), group)
            fused = launch(x.clone(), residual.clone(), group)
            results.append(judge(check, fused, exact, unfused, rows=rows))
    return results


# ---------------------------------------------------------------------------------------------
# 3. Kernel time ratios
# ---------------------------------------------------------------------------------------------


def ratio_key(fusion: str, rows: int, reference: str) -> str:
    return f"{fusion}/m{rows}/{reference}"


def measure_kernel_ratios(
    model, plan: Plan, *, only: set[str] | None = None, progress=None
) -> dict[str, dict]:
    """fused / reference per fusion, decode size and reference (unfused ops, each peer); and
    per op the step runs alone, op / a copy of its bytes (``step_op_ratios``). ``only``:
    measure just these ratio keys' (fusion or op, rows) (a re-measurement)."""
    from profiling.kernel_timing import time_fusion

    def wanted(name: str, rows: int) -> bool:
        return only is None or any(k.startswith(f"{name}/m{rows}/") for k in only)

    program = model.program()
    out = {}
    # A kernel that spans several steps: the whole, then each step launched alone (the same
    # device code), so that a step that slows inside it has a figure of its own.
    timed = [g for f in applicable_fusions(model) for g in (f, *f.stage_fusions())]
    for fusion in timed:
        for rows in plan.kernel_rows:
            result = None
            if wanted(fusion.name, rows) and fusion.needs_ranks:
                from profiling.kernel_timing import time_rank_fusion

                # Every rank times the same chains (each replay's all-reduces meet the peers');
                # None where its kernel cannot run here: nothing to time.
                result = time_rank_fusion(
                    fusion,
                    model.parallel,
                    model.config.hidden_size,
                    rows,
                    model.dtype,
                    rounds=plan.kernel_rounds,
                )
            elif wanted(fusion.name, rows):
                result = time_fusion(
                    fusion, program, model.config, rows, model.dtype, rounds=plan.kernel_rounds
                )
            if result is not None:
                out.update(_ratio_entries(result))
            if progress is not None:
                progress.update(1)
    out.update(step_op_ratios(model, plan, wanted))
    return out


def step_op_ratios(model, plan: Plan, wanted=lambda name, rows: True) -> dict[str, dict]:
    """op / copy of its bytes for every op the decode step runs alone (kernel_timing's
    ``time_step_op``), at each decode size, after ``prompt_len + new_tokens // 2`` tokens (the
    middle of the timed decode). Single-process models only: under tensor parallelism each
    op runs on a shard, and its figure is not defined yet."""
    from profiling.kernel_timing import step_op_inputs, step_op_names, time_step_op

    if world_size(model) > 1:
        return {}
    context_len = plan.prompt_len + plan.new_tokens // 2
    out = {}
    for rows in plan.kernel_rows:
        names = [n for n in step_op_names(model) if wanted(n, rows)]
        if not names:
            continue
        inputs = step_op_inputs(model, rows, context_len)
        for name in names:
            result = time_step_op(
                model, name, inputs[name], rows, context_len, rounds=plan.kernel_rounds
            )
            out.update(_ratio_entries(result))
    return out


def _ratio_entries(result) -> dict[str, dict]:
    return {
        ratio_key(result.fusion, result.rows, ref): {
            "ratio": result.ratio(ref),
            "rounds": result.ratios(ref),
            "fused_us": result.median_us("fused"),
            "reference_us": result.median_us(ref),
            "path": result.path,
        }
        for ref in result.references()
    }


# ---------------------------------------------------------------------------------------------
# 4. End to end
# ---------------------------------------------------------------------------------------------


def measure_e2e(model, plan: Plan, *, batches=None, progress=None) -> dict[str, dict]:
    """Per batch size: tok/s of every variant (CUDA-graph decode) and the speed-ups."""
    variants, pairings = variants_and_pairings(model)
    out = {}
    for batch in plan.batches if batches is None else batches:
        rates = throughput.measure_variants(
            model, variants, batch, plan.settings(), cuda_graph=True, progress=progress
        )
        out[f"b{batch}"] = {
            "batch": batch,
            "variants": {
                name: {"tok_s": r, "median": _median(r), "spread": throughput.spread(r)}
                for name, r in rates.items()
            },
            "speedups": throughput.speedups(rates, pairings),
        }
    return out


def measure_eager(model, plan: Plan) -> dict:
    """Eager decode tok/s, default vs none (report only: host-bound, so not gated)."""
    variants = [v for v in variants_and_pairings(model)[0] if v.name in ("default", "none")]
    settings = throughput.Settings(plan.prompt_len, plan.new_tokens, 5)
    rates = throughput.measure_variants(model, variants, 1, settings, cuda_graph=False)
    return {
        "gated": False,
        "reason": (
            "eager decode is host-bound (the host's Python and launch overhead per kernel, not "
            "the GPU, sets its pace, and varies by tens of percent between runs on a shared "
            "host); its launch counts are gated, its kernel time is in the breakdown"
        ),
        "variants": {
            name: {"tok_s": r, "median": _median(r), "spread": throughput.spread(r)}
            for name, r in rates.items()
        },
    }


def _median(values):
    import statistics

    return statistics.median(values)


# ---------------------------------------------------------------------------------------------
# The time breakdown's floors
# ---------------------------------------------------------------------------------------------


def segment_floors(model, batch: int, context_len: int, bandwidth_tb_s: float | None) -> dict:
    """Bytes each segment must move per decode step, and its bandwidth floor in µs."""
    from profiling.kernel_timing import floor_us

    program = model.program()
    itemsize = torch.finfo(model.dtype).bits // 8
    out: dict[str, dict] = {}
    for name, op in model.ops.items():
        count = sum(1 for b in program if b.op.name == name)
        per = bytes_moved([op], [op.writes], model.config, batch, itemsize, context_len)
        out[name] = {"bytes_per_step": per * count}
    for f in registry.all_fusions():
        total = 0
        for start, stop in span_instances(program, f):
            ops = [b.op for b in program[start:stop]]
            total += bytes_moved(ops, f.outputs, model.config, batch, itemsize, context_len)
        out[f.name] = {"bytes_per_step": total}
    for entry in out.values():
        entry["floor_us"] = (
            floor_us(entry["bytes_per_step"], bandwidth_tb_s) if bandwidth_tb_s else None
        )
    return out


def staged_fusions(model) -> list:
    """The applicable fusions whose kernel spans several steps and records per-stage
    timestamps (its module's ``recording_stage_times`` and ``stage_times_us``)."""
    return [
        f
        for f in applicable_fusions(model)
        if f.stages and hasattr(f.kernel_module(), "recording_stage_times")
    ]


def staged_variant(model, fusion):
    """The variant that runs ``fusion``: default if it is a default fusion, else alt+f."""
    variants = {v.name: v for v in launch_variants(model)}
    return variants["default" if fusion.default else f"alt+{fusion.name}"]


def measure_stage_times(model, plan: Plan) -> dict:
    """For each fusion whose kernel spans several steps (compiled kernels only: the stamps are
    the GPU's %globaltimer): eager decode of the variant that runs it, under torch.profiler,
    with the kernel's stamps recorded. Per decode step: the variant's segment times (its trace,
    as the breakdown reads any variant's) and each stage's time from the stamps (mean per call
    times the instances a step), and the stages' sum over the kernel's own time."""
    if INTERPRETING:
        return {}
    import statistics
    import tempfile

    from engine.runner import Runner
    from profiling.breakdown import segment_times
    from profiling.launches import record_decode_trace

    out = {}
    for fusion in staged_fusions(model):
        module = fusion.kernel_module()
        variant = staged_variant(model, fusion)
        saved = model.flags
        model.flags = variant.flags()
        try:
            runner = Runner(model, max_seq_len=plan.prompt_len + plan.launch_steps + 4)
            with module.recording_stage_times() as calls, tempfile.TemporaryDirectory() as tmp:
                path = record_decode_trace(
                    runner, plan.launch_steps, Path(tmp) / "t.json", prompt_len=plan.prompt_len
                )
                times = segment_times(path, segment_names(model))
        finally:
            model.flags = saved
        segment = times["segments"][fusion.name]
        instances = segment["instances_per_step"]
        # The profiled decode steps are the last calls (the prefill and warm-up come first).
        profiled = calls[-round(instances * times["steps"]) :]
        per_call = [module.stage_times_us(stamps) for stamps in profiled]
        stages = {
            stage.name: instances * statistics.mean(c[stage.name] for c in per_call)
            for stage in fusion.stages
        }
        out[fusion.name] = {
            "variant": variant.name,
            "calls": len(per_call),  # kernel calls in the profiled steps
            "kernel_us_per_step": segment["us_per_step"],
            "stage_us_per_step": stages,
            "stages_over_kernel": sum(stages.values()) / segment["us_per_step"],
            "times": times,
        }
    return out


def report_header(model, plan: Plan) -> dict:
    return {
        "schema": SCHEMA,
        **environment(),
        "interpreted": INTERPRETING,
        "model": model_summary(model),
        "plan": plan.to_json(),
    }


# ---------------------------------------------------------------------------------------------
# Tensor parallel: every rank's launch data
# ---------------------------------------------------------------------------------------------


def rank_launch_data(model, current: dict) -> dict:
    """What this rank launches, flat: the segments a decode step runs per launch variant (the
    program's plan, on any device) and, where counted (GPU), kernels per step per key."""
    data = {}
    saved = model.flags
    try:
        for v in launch_variants(model):
            model.flags = v.flags()
            data[f"segments/{v.name}"] = len(model.segments())
    finally:
        model.flags = saved
    for key, entry in current.get("launches", {}).items():
        data[f"kernels/{key}"] = entry["kernels_per_step"]
        data[f"memcpy/{key}"] = entry["memcpy_per_step"]
    return data


def tp_summary(model, current: dict, ranks) -> dict:
    """Every rank's launch data (gathered: a collective) and whether they agree; each rank's
    default tok/s where decode was timed (not compared: rank 0's figures are the run's)."""
    import torch.distributed as dist

    from profiling.ranks import differences

    mine = rank_launch_data(model, current)
    rates = {bkey: b["variants"]["default"]["median"] for bkey, b in current.get("e2e", {}).items()}
    gathered = ranks.gather({"launches": mine, "default_tok_s": rates})
    per_rank = [g["launches"] for g in gathered]
    diffs = differences(per_rank)
    return {
        "world_size": ranks.world_size,
        "backend": dist.get_backend(ranks.parallel.group),
        "local_config": {name: getattr(model.config, name) for name in CONFIG_FIELDS},
        "not_applicable": list(model.not_applicable),
        "ranks": [
            {"rank": r, "launches": g["launches"], "default_tok_s": g["default_tok_s"]}
            for r, g in enumerate(gathered)
        ],
        "launches_equal": not diffs,
        "launch_differences": diffs,
    }
