"""Decode tokens/s of fusion settings, measured interleaved (docs/definitions.md, "Throughput").

A **variant** is a set of enabled fusions. The suite measures:

- ``default``: the engine's default fusions; ``none``: every step unfused;
- for each default fusion f: ``default-f`` (the default without f);
- for each other fusion f (an alternative of a default one): ``alt+f`` (the default without
  f's alternatives, with f) and ``alt-f`` (the same without f).

Speed-ups pair variants: ``all`` = default / none, and per fusion the variant with it over the
same without it (its marginal gain where it runs).

One prefill of a P-token prompt; then per round, for each variant (in alternating order, ABC
then CBA, so that drift cancels in a ratio): rewind to position P (the same context every
time), synchronize, decode G tokens (each step: ``runner.decode`` then greedy argmax) timed,
synchronize (engine.timing.decode_rate). tokens/s = batch * G / elapsed, the
garbage collector held off. The first ``warmup`` rounds are dropped (compilation, graph
capture). A speed-up's figure is the median over rounds of that round's ratio; a variant's
tokens/s the median over rounds. All variants of one batch size share one Runner, whose
CUDA graphs are captured per flag setting, on the same weights.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable, Sequence

import torch

from engine import fusions as registry
from engine.flags import FusionFlags, without_alternatives
from engine.program import Fusion
from engine.timing import decode_rate
from profiling.ranks import aligner


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    fusions: frozenset[str]

    def flags(self) -> FusionFlags:
        return FusionFlags(self.fusions)


@dataclasses.dataclass(frozen=True)
class Pairing:
    """A speed-up: tok/s of ``on`` over tok/s of ``off`` (the same but for ``name``)."""

    name: str  # "all" or a fusion name
    on: str
    off: str


def default_fusions(fusions: Iterable[Fusion] | None = None) -> frozenset[str]:
    fusions = registry.all_fusions() if fusions is None else fusions
    return frozenset(f.name for f in fusions if f.default)


def variants_and_pairings(
    fusions: Sequence[Fusion] | None = None,
) -> tuple[list[Variant], list[Pairing]]:
    """The variants the suite measures and the speed-ups it pairs them into (docstring)."""
    fusions = registry.all_fusions() if fusions is None else list(fusions)
    default = default_fusions(fusions)
    variants = {"default": Variant("default", default), "none": Variant("none", frozenset())}
    pairings = [Pairing("all", "default", "none")]
    for f in fusions:
        if f.name in default:
            off = Variant(f"default-{f.name}", default - {f.name})
            variants[off.name] = off
            pairings.append(Pairing(f.name, "default", off.name))
        else:
            base = without_alternatives(default, f)
            on, off = Variant(f"alt+{f.name}", base | {f.name}), Variant(f"alt-{f.name}", base)
            variants[on.name], variants[off.name] = on, off
            pairings.append(Pairing(f.name, on.name, off.name))
    return list(variants.values()), pairings


@dataclasses.dataclass(frozen=True)
class Settings:
    prompt_len: int = 16
    new_tokens: int = 48
    rounds: int = 6
    warmup: int = 1

    def __post_init__(self):
        if self.rounds < 5:
            raise ValueError(f"rounds must be >= 5 (a median of at least 5), got {self.rounds}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (compilation, graph capture), got {self.warmup}")
        if self.prompt_len < 1 or self.new_tokens < 1:
            raise ValueError(
                f"prompt_len and new_tokens must be >= 1, got {self.prompt_len}, {self.new_tokens}"
            )

    @property
    def max_seq_len(self) -> int:
        return self.prompt_len + self.new_tokens + 8


def random_prompt(vocab_size: int, batch: int, prompt_len: int, device, seed: int = 0):
    """Token ids [batch, prompt_len], uniform over the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).to(device)


def measure_variants(
    model,
    variants: Sequence[Variant],
    batch: int,
    settings: Settings,
    *,
    cuda_graph: bool = True,
    progress=None,
) -> dict[str, list[float]]:
    """tok/s of every variant per timed round (interleaved; see the module docstring)."""
    from engine.runner import Runner

    if cuda_graph and model.device.type != "cuda":
        raise ValueError(f"CUDA-graph decode needs a CUDA model; the model is on {model.device}")
    runner = Runner(
        model, max_batch_size=batch, max_seq_len=settings.max_seq_len, cuda_graph=cuda_graph
    )
    prompt = random_prompt(model.config.vocab_size, batch, settings.prompt_len, model.device)
    saved = model.flags
    align = aligner(getattr(model, "parallel", None), model.device)
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    try:
        with torch.inference_mode():
            first = runner.prefill(prompt).argmax(-1)
            for r in range(settings.warmup + settings.rounds):
                order = variants if r % 2 == 0 else list(reversed(variants))
                for v in order:
                    model.flags = v.flags()
                    rate = decode_rate(
                        runner, first, settings.prompt_len, settings.new_tokens, align
                    )
                    if r >= settings.warmup:
                        rates[v.name].append(rate)
                if progress is not None:
                    progress.update(1)
    finally:
        model.flags = saved
    return rates


def speedups(
    rates: dict[str, list[float]], pairings: Sequence[Pairing]
) -> dict[str, dict[str, object]]:
    """Per pairing: the per-round ratios on / off and their median."""
    out = {}
    for p in pairings:
        ratios = [a / b for a, b in zip(rates[p.on], rates[p.off], strict=True)]
        out[p.name] = {
            "on": p.on,
            "off": p.off,
            "rounds": ratios,
            "median": statistics.median(ratios),
        }
    return out


def spread(values: Sequence[float]) -> float:
    """(max - min) / median."""
    med = statistics.median(values)
    return (max(values) - min(values)) / med
