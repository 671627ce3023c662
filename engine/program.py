"""The model as a program of ops, and fusions that replace runs of ops.

An **op** is one step of the unfused model, one kernel: ``o_proj`` (a GEMM), ``attn_residual_add``
(an add), ``input_norm`` (RMSNorm)... It reads named **roles** (activations held in the step's
state, parameters of a module, constants of the config, the step context) and writes one
activation. A model is a flat list of bound ops (each bound to the module its parameters live
on: a decoder layer, or the model itself), which is what runs when no fusion is on.

A **fusion** (the registry: engine/fusions.py) names the run of consecutive ops it replaces
(its *span*, e.g. ``("o_proj", "attn_residual_add")``) and a fused callable that takes the
span's external inputs by role name and returns what the span writes that is read later. Which
fusions are on is a run-time choice (engine/flags.py): the program is cut into **segments**,
either one fused call or one unfused op, and every segment runs inside a marker of its name
(the fusion's or the op's), so that the profiler attributes kernels to it. Two fusions whose
spans share an op are alternatives: they cannot be on together.

Everything the suite needs about a fusion is derived from its span: its float64 reference
(the span's ops in float64), its unfused path (the span's ops), its inputs at model shapes
(the roles' dimensions), the kernels it saves (the span's ops launch one kernel each).
"""

from __future__ import annotations

import dataclasses
import importlib
import operator
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

import torch

from kernels.markers import mark

ACT, PARAM, CONST, CTX = "act", "param", "const", "ctx"


@dataclasses.dataclass(frozen=True)
class Role:
    """One input of an op.

    kind ``act``: an activation of the step's state, shape [rows, *dims]; ``param``: a tensor
    found at ``source`` (an attribute path) on the op's module, shape ``dims`` (``init`` says
    how the suite draws one: "weight" ~ N(0, 0.02), "norm" ~ 1 + 0.2 N(0, 1)); ``const``: the
    config attribute ``source``; ``ctx``: the step context (positions, batch layout).
    ``dims`` name config dimensions (see ``dim``). ``draw(config, rows, dtype, device,
    generator)``, where given, is how the suite draws a role that dims cannot describe (the
    step context, a KV cache).
    """

    name: str
    kind: str = ACT
    dims: tuple[str, ...] = ()
    source: str = ""
    init: str = "weight"
    draw: Callable[..., Any] | None = None


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of the unfused model; ``fn`` launches ``kernels`` kernels.

    ``fn(**inputs)`` takes the roles by name and returns the tensor written to ``writes``
    (shape [rows, *out_dims]).
    ``fn64``, where given, is the same formula in float64 without intermediate rounding (the
    reference of every fusion whose span holds this op). ``accumulates`` names the (input,
    weight) roles of a dot product: its float32 accumulation order may differ between
    implementations (the numerics bound allows for it). ``group`` is the op's row in the time
    breakdown (gemm, norm, attention, other).
    """

    name: str
    reads: tuple[Role, ...]
    writes: str
    fn: Callable[..., torch.Tensor]
    fn64: Callable[..., torch.Tensor] | None = None
    group: str = "other"
    kernels: int = 1
    accumulates: tuple[str, str] | None = None
    out_dims: tuple[str, ...] = ()
    # Bytes the op reads beyond its roles' dims (the KV cache of attention):
    # extra_bytes(config, batch, context_len, itemsize)
    extra_bytes: Callable[..., int] | None = None
    # The float64 formula with the rounding the fused kernels' contract keeps when this op's
    # output is an intermediate of a span (the normalised input rounded to the input dtype as
    # transformers does; the residual stream stored in it): fn64_rounded(dtype, **inputs).
    fn64_rounded: Callable[..., torch.Tensor] | None = None
    # How an error bound on its inputs carries to its output (float64):
    # propagate(inputs, bounds) -> bound, where bounds maps input roles to elementwise bounds.
    # None: by evaluating the op on inputs moved by the bound both ways (exact for adds).
    propagate: Callable[..., torch.Tensor] | None = None

    def role(self, name: str) -> Role:
        return next(r for r in self.reads if r.name == name)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a fusion whose kernel spans several: ``ops``, a run of the span's ops;
    ``fused(**inputs)`` launches the same kernel for this step alone, taking the run's external
    inputs by role name and returning ``outputs``."""

    name: str
    ops: tuple[str, ...]
    fused: Callable[..., Any]
    outputs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Fusion:
    """One registered fusion: what it replaces and the kernel that does it in one launch.

    ``name`` is also its flag, marker, JSON key and test id. ``spans``: the op-name runs it
    replaces (usually one; add+RMSNorm has two: before a layer's input norm and before the
    final norm). ``fused(**inputs)`` takes the span's external inputs by role name and returns
    ``outputs`` (a tensor, or a tuple in that order). ``kernel``: the kernel file it calls
    (kernels/<kernel>.py; tuned tables kernels/configs/<kernel>/), ``kernel_names`` the GPU
    kernels it may launch (the Nsight Compute check). ``peers``: other one-launch
    implementations of the same span (same signature as ``fused``), timed beside it.
    ``default``: on in the engine's default flags. ``needs_ranks``: its spans exist only in
    a tensor-parallel rank's program and its kernel is a collective (every rank calls it
    together): the registry lists it only in a process that builds a sharded model
    (engine/fusions.py), and the suite measures it on every rank through its kernel module's
    ``unavailable_reason(device, group)``, launcher ``<kernel>(x, residual, group)`` (x: this
    rank's partial), ``reference`` (the unfused ops) and ``gathered_float64_reference``.
    ``stages``: for a kernel that spans several steps in one launch, those steps in order
    (their ops together are the span); each can be launched alone, so that the suite checks
    numerics step by step and reads each step's time from the kernel's own timestamps
    (its module's ``recording_stage_times`` and ``stage_times_us``).
    """

    name: str
    spans: tuple[tuple[str, ...], ...]
    fused: Callable[..., Any]
    outputs: tuple[str, ...]
    kernel: str
    kernel_names: tuple[str, ...]
    doc: str
    fused_kernels: int = 1
    default: bool = True
    peers: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    needs_ranks: bool = False
    stages: tuple[Stage, ...] = ()

    def __post_init__(self):
        if self.stages:
            run = tuple(op for stage in self.stages for op in stage.ops)
            for span in self.spans:
                if span != run:
                    raise ProgramError(
                        f"fusion {self.name!r}: its stages run {run}, but its span is {span}: "
                        "the stages, in order, must cover every span exactly"
                    )

    def stage_fusions(self) -> list[Fusion]:
        """Each stage as a one-span fusion of its own (named ``<fusion>.<stage>``), its
        ``fused`` the same kernel launched for that stage alone: what the numerics and the
        kernel-time figures per stage run. Not registered: no flag turns a stage on."""
        return [
            Fusion(
                f"{self.name}.{stage.name}",
                spans=(stage.ops,),
                fused=stage.fused,
                outputs=stage.outputs,
                kernel=self.kernel,
                kernel_names=self.kernel_names,
                doc=f"{self.name}, stage {stage.name} alone",
                default=False,
            )
            for stage in self.stages
        ]

    @property
    def ops(self) -> frozenset[str]:
        return frozenset(name for span in self.spans for name in span)

    def kernel_module(self) -> ModuleType:
        """kernels/<kernel>.py, imported: what it exports (a GEMV kernel's ``select_config``,
        ``tuning_candidates``, ``ROWS_PER_OUTPUT``: kernels/gemv.py) is how the suite asks
        about the kernel without naming it."""
        return importlib.import_module(f"kernels.{self.kernel}")

    def conflicts_with(self, other: Fusion) -> bool:
        """Alternatives: the two replace a common op, so they can never both be on."""
        return other.name != self.name and bool(self.ops & other.ops)


# --------------------------------------------------------------------------------------------
# Programs and segments
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BoundOp:
    """An op at its place in a model: the module its parameters live on, its layer."""

    op: Op
    module: Any
    layer: int | None  # None: before or after the decoder layers (embedding, final norm, head)


def external_reads(ops: Sequence[Op]) -> tuple[Role, ...]:
    """The roles a run of ops reads that no earlier op of the run writes (first reads first)."""
    written: set[str] = set()
    seen: dict[str, Role] = {}
    for op in ops:
        for role in op.reads:
            if not (role.kind == ACT and role.name in written):
                seen.setdefault(role.name, role)
        written.add(op.writes)
    return tuple(seen.values())


def live_writes(
    program: Sequence[BoundOp], start: int, stop: int, returns: Iterable[str] = ()
) -> set[str]:
    """What ops start..stop-1 write that a later op reads before it is written again (or that
    the program returns: ``returns``)."""
    pending = {b.op.writes for b in program[start:stop]}
    live = set()
    for bound in program[stop:]:
        live |= pending & {r.name for r in bound.op.reads if r.kind == ACT}
        pending -= live | {bound.op.writes}
        if not pending:
            break
    return live | (pending & set(returns))


def _resolver(role: Role, module: Any, config: Any) -> Callable[[dict], Any]:
    if role.kind == ACT:
        return operator.itemgetter(role.name)
    if role.kind == CTX:
        return operator.itemgetter("ctx")
    if role.kind == CONST:
        value = getattr(config, role.source)
        return lambda state: value
    getter = operator.attrgetter(role.source)  # looked up per call: the runner sets KV caches
    return lambda state: getter(module)


@dataclasses.dataclass
class Segment:
    """One call of a program: a fused kernel (``fusion`` set) or one unfused op."""

    name: str
    layer: int | None
    ops: tuple[BoundOp, ...]
    fusion: Fusion | None
    call: Callable[..., Any]
    inputs: tuple[tuple[str, Callable[[dict], Any]], ...]
    outputs: tuple[str, ...]

    def run(self, state: dict) -> None:
        result = self.call(**{name: get(state) for name, get in self.inputs})
        if len(self.outputs) == 1:
            state[self.outputs[0]] = result
        else:
            for name, value in zip(self.outputs, result, strict=True):
                state[name] = value


class ProgramError(ValueError):
    """A fusion does not fit the program (a mistake in a fusion's declaration)."""


def _fused_segment(
    fusion: Fusion, program: Sequence[BoundOp], start: int, stop: int, config, returns
) -> Segment:
    ops = [b.op for b in program[start:stop]]
    reads = external_reads(ops)
    live = live_writes(program, start, stop, returns)
    missing = live - set(fusion.outputs)
    extra = set(fusion.outputs) - {op.writes for op in ops}
    if missing or extra:
        raise ProgramError(
            f"fusion {fusion.name!r} over {[op.name for op in ops]} returns {fusion.outputs}, "
            f"but the program reads {sorted(live)} of what the span writes later"
            + (f"; it cannot return {sorted(extra)}" if extra else "")
        )
    inputs = []
    for role in reads:
        # A role comes from the first op of the span that reads it (parameters of that op's
        # module: a span may cross a layer boundary).
        owner = next(b for b in program[start:stop] if role in b.op.reads)
        inputs.append((role.name, _resolver(role, owner.module, config)))
    return Segment(
        fusion.name,
        program[start].layer,
        tuple(program[start:stop]),
        fusion,
        fusion.fused,
        tuple(inputs),
        fusion.outputs,
    )


def _op_segment(bound: BoundOp, config) -> Segment:
    op = bound.op
    inputs = tuple((r.name, _resolver(r, bound.module, config)) for r in op.reads)
    return Segment(op.name, bound.layer, (bound,), None, op.fn, inputs, (op.writes,))


def _span_at(fusion: Fusion, program: Sequence[BoundOp], i: int) -> int:
    """Length of the span of ``fusion`` that starts at op ``i`` (0: none)."""
    for span in fusion.spans:
        names = tuple(b.op.name for b in program[i : i + len(span)])
        if names == span:
            return len(span)
    return 0


def segments(
    program: Sequence[BoundOp], fusions: Iterable[Fusion], config, returns: Iterable[str] = ()
) -> list[Segment]:
    """Cut ``program`` into segments: every span of an enabled fusion becomes one fused call,
    every other op runs alone. ``fusions`` must be free of alternatives (engine/flags.py);
    ``returns``: what the program's caller reads at the end."""
    fusions = list(fusions)
    out: list[Segment] = []
    i = 0
    while i < len(program):
        for fusion in fusions:
            length = _span_at(fusion, program, i)
            if length:
                out.append(_fused_segment(fusion, program, i, i + length, config, returns))
                i += length
                break
        else:
            out.append(_op_segment(program[i], config))
            i += 1
    return out


def span_instances(program: Sequence[BoundOp], fusion: Fusion) -> list[tuple[int, int]]:
    """(start, stop) of every place where ``fusion``'s spans match ``program``."""
    found, i = [], 0
    while i < len(program):
        length = _span_at(fusion, program, i)
        if length:
            found.append((i, i + length))
            i += length
        else:
            i += 1
    return found


def run_segments(segments: Sequence[Segment], state: dict) -> dict:
    """Run the segments in order, each in a marker of its name, layers in ``layer.{i}``."""
    i, n = 0, len(segments)
    while i < n:
        layer = segments[i].layer
        j = i
        while j < n and segments[j].layer == layer:
            j += 1
        if layer is None:
            for seg in segments[i:j]:
                with mark(seg.name):
                    seg.run(state)
        else:
            with mark(f"layer.{layer}"):
                for seg in segments[i:j]:
                    with mark(seg.name):
                        seg.run(state)
        i = j
    return state


# --------------------------------------------------------------------------------------------
# A span outside the model: what numerics and kernel timing call
# --------------------------------------------------------------------------------------------


def span_ops(program: Sequence[BoundOp], fusion: Fusion) -> tuple[Op, ...]:
    """The ops of ``fusion``'s first span as the program has them."""
    instances = span_instances(program, fusion)
    if not instances:
        raise ProgramError(f"fusion {fusion.name!r} matches no run of ops in this model")
    start, stop = instances[0]
    return tuple(b.op for b in program[start:stop])


def run_ops(
    ops: Sequence[Op], inputs: dict[str, Any], formula: Callable[[Op], Callable] = lambda op: op.fn
) -> dict[str, Any]:
    """The ops one after the other, each through ``formula(op)`` (its kernel by default);
    returns the inputs and every write."""
    state = dict(inputs)
    for op in ops:
        state[op.writes] = formula(op)(**{r.name: state[r.name] for r in op.reads})
    return state


def run_unfused(ops: Sequence[Op], inputs: dict[str, Any]) -> dict[str, Any]:
    """The span's ops one after the other (the path a fusion replaces); returns every write."""
    return run_ops(ops, inputs)


def run_float64(
    ops: Sequence[Op], inputs: dict[str, Any], dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """The span's formula in float64 on upcast inputs. With ``dtype``, the intermediates whose
    rounding the fused kernels' contract keeps (``Op.fn64_rounded``) are rounded to it; every
    other step is exact."""
    state = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    for i, op in enumerate(ops):
        if op.fn64 is None:
            raise ProgramError(f"op {op.name!r} has no float64 formula: it cannot be in a span")
        args = {r.name: state[r.name] for r in op.reads}
        intermediate = i < len(ops) - 1
        if dtype is not None and intermediate and op.fn64_rounded is not None:
            state[op.writes] = op.fn64_rounded(dtype, **args)
        else:
            state[op.writes] = op.fn64(**args)
    return state


def call_fused(fusion: Fusion, ops: Sequence[Op], inputs: dict[str, Any]) -> dict[str, Any]:
    """The fused callable as a segment calls it, its results by output name."""
    reads = [r.name for r in external_reads(ops)]
    result = fusion.fused(**{name: inputs[name] for name in reads})
    if len(fusion.outputs) == 1:
        return {fusion.outputs[0]: result}
    return dict(zip(fusion.outputs, result, strict=True))


def dim(config, name: str) -> int:
    """A named model dimension: hidden, q_size, qkv_size, intermediate, gate_up, vocab."""
    sizes = {
        "hidden": config.hidden_size,
        "q_size": config.num_attention_heads * config.head_dim,
        "qkv_size": config.qkv_size,
        "intermediate": config.intermediate_size,
        "gate_up": 2 * config.intermediate_size,
        "vocab": config.vocab_size,
        "head_dim": config.head_dim,
    }
    if name not in sizes:
        raise ProgramError(f"unknown dimension {name!r}; known: {', '.join(sizes)}")
    return sizes[name]


def draw_inputs(
    ops: Sequence[Op],
    config,
    rows: int,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Fresh inputs of a span at the model's shapes: activations ~ N(0, 1) [rows, ...],
    weights ~ N(0, 0.02), norm weights ~ 1 + 0.2 N(0, 1), constants from the config, and
    roles with a ``draw`` of their own as it says. Never zeros."""
    kw = {"device": device, "generator": generator}
    inputs: dict[str, Any] = {}
    for role in external_reads(ops):
        shape = tuple(dim(config, d) for d in role.dims)
        if role.draw is not None:
            inputs[role.name] = role.draw(config, rows, dtype, device, generator)
        elif role.kind == ACT:
            inputs[role.name] = torch.randn(rows, *shape, **kw).to(dtype)
        elif role.kind == PARAM:
            noise = torch.randn(*shape, **kw)
            value = 1 + 0.2 * noise if role.init == "norm" else 0.02 * noise
            inputs[role.name] = value.to(dtype)
        elif role.kind == CONST:
            inputs[role.name] = getattr(config, role.source)
        else:
            raise ProgramError(f"role {role.name!r} ({role.kind}) cannot be drawn")
    return inputs


def bytes_moved(
    ops: Sequence[Op], outputs: Iterable[str], config, rows: int, itemsize: int, context_len: int
) -> int:
    """The fewest bytes a run of ops must move: every external input read once (weights whole,
    activations [rows, ...]), every output written once, plus what ops declare beyond their
    roles (the KV cache read by attention). The bandwidth floor of a step is this over the
    measured copy bandwidth."""

    def size(dims):
        n = 1
        for d in dims:
            n *= dim(config, d)
        return n

    total = 0
    for role in external_reads(ops):
        if role.kind == PARAM and role.dims:
            total += size(role.dims) * itemsize
        elif role.kind == ACT and role.dims:
            total += rows * size(role.dims) * itemsize
    out_dims = {op.writes: op.out_dims for op in ops}
    for name in outputs:
        total += rows * size(out_dims[name]) * itemsize
    for op in ops:
        if op.extra_bytes is not None:
            total += op.extra_bytes(config, rows, context_len, itemsize)
    return total
