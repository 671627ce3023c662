"""Decode tokens/s, fused vs unfused, eager vs CUDA graph (DESIGN.md D5).

Per repeat: prefill a P-token prompt (not timed), synchronize, start the clock, decode G
tokens (each step: ``runner.decode`` then greedy argmax, which is how a token is decoded),
synchronize, stop; the garbage collector is held off meanwhile. tokens/s = batch * G /
elapsed. The first ``warmup`` repeats are dropped (Triton compilation, cuBLAS heuristics, the
CUDA-graph capture). The median of the remaining repeats (>= 5) is the figure; all repeats
are kept so that the spread can set the gate's tolerance (profiling/baselines.py).

Every mode gets a fresh Runner: CUDA graphs are captured per Runner, so a context that changes
what a step launches (a forced kernel configuration, a monkeypatched step) is captured too.
Launch counts per token come from profiling/launches.py on yet another fresh Runner.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kernels.runtime import INTERPRETING, gpu_name, gpu_slug
from profiling.launches import O_PROJ_RANGE, LaunchCounts, profile_decode, random_prompt

REPO_ROOT = Path(__file__).resolve().parent.parent
MIN_REPEATS = 5
SCHEMA = "fusionguard-throughput/1"


@dataclasses.dataclass(frozen=True)
class Mode:
    """One measured configuration of the decode path."""

    fused: bool
    cuda_graph: bool
    batch: int = 1

    @property
    def key(self) -> str:
        """e.g. "graph-b1": fused and unfused of one key are compared with each other."""
        return f"{'graph' if self.cuda_graph else 'eager'}-b{self.batch}"

    @property
    def path(self) -> str:
        return "fused" if self.fused else "unfused"

    def __str__(self) -> str:
        return f"{self.path} {self.key}"


@dataclasses.dataclass(frozen=True)
class Settings:
    prompt_len: int = 16
    new_tokens: int = 64
    repeats: int = MIN_REPEATS
    warmup: int = 2
    launch_steps: int = 3  # decode steps profiled for the launch counts

    def __post_init__(self):
        if self.repeats < MIN_REPEATS:
            raise ValueError(f"repeats must be >= {MIN_REPEATS} (D5), got {self.repeats}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (compilation, graph capture), got {self.warmup}")
        if self.prompt_len < 1 or self.new_tokens < 1 or self.launch_steps < 1:
            raise ValueError(
                "prompt_len, new_tokens and launch_steps must be >= 1, got "
                f"{self.prompt_len}, {self.new_tokens}, {self.launch_steps}"
            )

    @property
    def max_seq_len(self) -> int:
        return self.prompt_len + max(self.new_tokens, self.launch_steps + 3) + 1


@dataclasses.dataclass
class ThroughputResult:
    mode: Mode
    tokens_per_s: list[float]  # every timed repeat (warm-up dropped)
    launches: LaunchCounts | None = None
    launches_error: str | None = None  # why there are no counts (e.g. no CUDA device)

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def spread(self) -> float:
        """(max - min) / median over the repeats."""
        return (max(self.tokens_per_s) - min(self.tokens_per_s)) / self.median

    @property
    def mad_rel(self) -> float:
        """Median absolute deviation / median over the repeats."""
        med = self.median
        return statistics.median(abs(x - med) for x in self.tokens_per_s) / med

    def to_json(self) -> dict:
        out = {
            "tok_s_median": self.median,
            "tok_s_repeats": self.tokens_per_s,
            "spread_rel": self.spread,
            "mad_rel": self.mad_rel,
            "launches_per_token": None,
            "o_proj_residual_per_token": None,
            "o_proj_residual_per_layer": None,
            "memcpy_per_token": None,
            "memset_per_token": None,
        }
        if self.launches is not None:
            c = self.launches
            out.update(
                launches_per_token=c.kernels_per_step,
                o_proj_residual_per_token=c.range_per_step(O_PROJ_RANGE),
                o_proj_residual_per_layer=c.range_per_instance(O_PROJ_RANGE),
                memcpy_per_token=c.memcpy_per_step,
                memset_per_token=c.memset_per_step,
                launch_count_mode=c.mode,
                launch_counts_uniform=c.uniform,
                replay_kernels_seen=c.replay_kernels_seen,
            )
        else:
            out["launches_error"] = self.launches_error
        return out


@contextmanager
def fusion(model, fused: bool) -> Iterator[None]:
    """Set ``model.flags.fuse_o_proj_residual`` for the block, then restore it."""
    previous = model.flags.fuse_o_proj_residual
    model.flags.fuse_o_proj_residual = fused
    try:
        yield
    finally:
        model.flags.fuse_o_proj_residual = previous


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_runner(model, mode: Mode, settings: Settings):
    from engine.runner import Runner

    return Runner(
        model,
        max_batch_size=mode.batch,
        max_seq_len=settings.max_seq_len,
        cuda_graph=mode.cuda_graph,
    )


def time_decode(runner, batch: int, settings: Settings, *, seed: int = 0) -> list[float]:
    """tokens/s of each repeat after the warm-up ones (see the module docstring)."""
    prompt = random_prompt(runner, batch, settings.prompt_len, seed)
    rates = []
    gc_was_enabled = gc.isenabled()
    with torch.inference_mode():
        for repeat in range(settings.warmup + settings.repeats):
            token = runner.prefill(prompt).argmax(-1)
            _sync(runner.device)
            # Eager decode is host-bound: keep the garbage collector out of the timed steps.
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                for _ in range(settings.new_tokens):
                    token = runner.decode(token).argmax(-1)
                _sync(runner.device)
                elapsed = time.perf_counter() - start
            finally:
                if gc_was_enabled:
                    gc.enable()
            if repeat >= settings.warmup:
                rates.append(batch * settings.new_tokens / elapsed)
    return rates


def measure_mode(
    model, mode: Mode, settings: Settings = Settings(), *, count_launches: bool = True
) -> ThroughputResult:
    """Decode tokens/s of one mode, with launch counts per token (on CUDA)."""
    if mode.cuda_graph and model.device.type != "cuda":
        raise ValueError(f"mode {mode} needs a CUDA model; the model is on {model.device}")
    with fusion(model, mode.fused):
        rates = time_decode(make_runner(model, mode, settings), mode.batch, settings)
        result = ThroughputResult(mode, rates)
        if not count_launches:
            result.launches_error = "not counted"
        elif model.device.type != "cuda":
            result.launches_error = "no CUDA device: the profiler sees no kernels"
        else:
            result.launches = profile_decode(
                make_runner(model, mode, settings),
                settings.launch_steps,
                batch=mode.batch,
                prompt_len=settings.prompt_len,
            )
    return result


def default_modes(model, batches: Iterable[int] = (1,)) -> list[Mode]:
    """Fused and unfused; eager, and CUDA graph where the model is on a GPU."""
    graph_options = (False, True) if model.device.type == "cuda" else (False,)
    return [
        Mode(fused, graph, batch)
        for batch in batches
        for graph in graph_options
        for fused in (True, False)
    ]


# --------------------------------------------------------------------------------------------
# The report: all modes plus where they were measured
# --------------------------------------------------------------------------------------------


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """HEAD (with -dirty), or FUSIONGUARD_COMMIT where the tree has no .git (a copied tree)."""
    if os.environ.get("FUSIONGUARD_COMMIT"):
        return os.environ["FUSIONGUARD_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def config_summary(config) -> dict:
    """The model dimensions that decide decode cost (compared before any gate)."""
    fields = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
    )
    return {f: getattr(config, f) for f in fields if hasattr(config, f)}


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": gpu_name(),
        "gpu_slug": gpu_slug(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "interpreted": INTERPRETING,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def report_json(results: list[ThroughputResult], model, settings: Settings) -> dict:
    """The throughput JSON: environment, config, settings, and per mode key fused/unfused."""
    modes: dict[str, dict] = {}
    for r in results:
        modes.setdefault(r.mode.key, {"batch": r.mode.batch, "cuda_graph": r.mode.cuda_graph})
        modes[r.mode.key][r.mode.path] = r.to_json()
    for entry in modes.values():
        if "fused" in entry and "unfused" in entry:
            entry["speedup"] = entry["fused"]["tok_s_median"] / entry["unfused"]["tok_s_median"]
    return {
        "schema": SCHEMA,
        **environment(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "config": config_summary(model.config),
        "settings": dataclasses.asdict(settings),
        "modes": modes,
    }


def measure_all(
    model,
    modes: list[Mode],
    settings: Settings = Settings(),
    *,
    progress=None,
) -> list[ThroughputResult]:
    """measure_mode for each mode; ``progress`` (e.g. a tqdm bar) is updated once per mode."""
    results = []
    for mode in modes:
        if progress is not None:
            progress.set_postfix_str(str(mode))
        results.append(measure_mode(model, mode, settings))
        if progress is not None:
            progress.update(1)
    return results
