"""Tensor-parallel decode over N processes (Megatron style), with torch.distributed.

The layout (``Parallel``: this process's rank, the world size, the process group) and the
sharding rules, in the nn.Linear layout [out_features, in_features]:

- q/k/v projections column-parallel by heads: each rank holds num_attention_heads / N query
  heads and num_key_value_heads / N KV heads (their rows of q, k and v; merged [q | k | v] as
  in the single-process engine). Query head h of a rank uses its KV head h // (H / Hkv), the
  same pairing as in the full model, since both counts split into contiguous equal blocks.
  q_norm / k_norm act per head_dim: replicated.
- gate/up column-parallel: each rank holds intermediate_size / N rows of gate and the same rows
  of up, merged [gate | up] as in the single-process engine.
- o_proj and down_proj row-parallel: each rank holds the input columns matching its heads /
  its intermediate rows, and computes a partial sum of the full projection.
- embeddings, norms and lm_head replicated.

Each rank builds the model with its local head and intermediate counts (``local_config``), and
its program gets an all-reduce (SUM, in place) right after each row-parallel projection::

    o_proj -> o_proj_all_reduce -> attn_residual_add
    down_proj -> down_proj_all_reduce -> residual_add

With world size 1 nothing here is used: engine.build returns today's model and program.

Fusions under TP: o_proj_residual and down_proj_residual do not apply (their two ops are no
longer adjacent): the tensor-parallel default leaves them out (``ShardedQwen3ForCausalLM.
not_applicable`` lists them, the CLI prints them), and asking for one explicitly is an error
naming it (NotApplicable, a ValueError). The other fusions run on the local shards.

``all_reduce_residual`` (the all-reduce and the residual add in one kernel, symmetric memory:
kernels/all_reduce_residual.py) is declared in engine/fusions.py with ``needs_ranks``: the
registry lists it only in a process that builds a model with world size > 1
(``build_sharded``), never in a single process, whose baselines list exactly the
fusions listed there. It is a TP default; where its kernel cannot run
(CPU, gloo, no symmetric memory or P2P) the default leaves it out, and a request for it runs
its ops unfused; either way the engine warns once, saying why.

NVLink multicast (NVLS) is never used: importing this module sets NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine import fusions as registry
from engine.config import Qwen3Config
from engine.flags import FusionFlags
from engine.loader import load_checkpoint, random_init
from engine.program import ACT, PARAM, BoundOp, Op, Role, segments
from engine.qwen3 import Qwen3ForCausalLM, on_meta

NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def disable_multicast() -> None:
    """Switch NVLink multicast off for NCCL, symmetric memory and NVSHMEM (read when a process
    group or symmetric memory is first set up; forced, not defaulted)."""
    os.environ.update(NO_MULTICAST)


disable_multicast()

# Long enough for a slow rank to start (import torch, build the model), short enough that a
# rank that never comes gives an error instead of a hang.
INIT_TIMEOUT_S = 60.0


class ParallelError(ValueError):
    """A tensor-parallel setting that cannot work: the message names the field or option."""


class NotApplicable(ValueError):
    """A fusion asked for on a model whose program has none of its spans."""


# --------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------

# HF tensor name suffix -> the dimension split across ranks (nn.Linear layout [out, in]):
# 0 column-parallel (each rank its block of output rows), 1 row-parallel (its block of input
# columns). Every other tensor is replicated.
SPLIT_DIM = {
    "self_attn.q_proj.weight": 0,
    "self_attn.k_proj.weight": 0,
    "self_attn.v_proj.weight": 0,
    "self_attn.o_proj.weight": 1,
    "mlp.gate_proj.weight": 0,
    "mlp.up_proj.weight": 0,
    "mlp.down_proj.weight": 1,
}
# The config fields split across ranks (each must divide by the world size).
SPLIT_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def split_dim(name: str) -> int | None:
    """The dimension of HF tensor ``name`` that is split across ranks (None: replicated)."""
    return next((d for suffix, d in SPLIT_DIM.items() if name.endswith(suffix)), None)


@dataclasses.dataclass(frozen=True)
class Parallel:
    """This process's place in a tensor-parallel group: ``rank`` of ``world_size``; ``group`` a
    torch.distributed ProcessGroup (None: the default group)."""

    rank: int = 0
    world_size: int = 1
    group: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for name in ("rank", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParallelError(f"Parallel.{name} must be an integer, got {value!r}")
        if self.world_size < 1:
            raise ParallelError(f"Parallel.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ParallelError(
                f"Parallel.rank {self.rank} is out of range for world_size {self.world_size} "
                f"(ranks 0..{self.world_size - 1})"
            )

    @classmethod
    def single(cls) -> Parallel:
        """One process: the engine as it is without tensor parallelism."""
        return cls()

    @classmethod
    def from_group(cls, group=None) -> Parallel:
        """This process in an initialized process group (None: the default group)."""
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def check(self, config: Qwen3Config) -> None:
        """Raise ParallelError naming the field unless every split count divides evenly."""
        check_layout(config, self.world_size)

    def local_config(self, config: Qwen3Config) -> Qwen3Config:
        """The architecture one rank builds: its heads and intermediate rows."""
        self.check(config)
        if not self.sharded:
            return config
        return config.replace(**{f: getattr(config, f) // self.world_size for f in SPLIT_FIELDS})

    def take(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full HF tensor ``name`` (a view; replicated: ``full``)."""
        d = split_dim(name)
        if d is None or not self.sharded:
            return full
        size = full.shape[d] // self.world_size
        return full.narrow(d, self.rank * size, size)

    def full_shape(self, name: str, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The full HF tensor's shape, from the shape of this rank's part."""
        shape = list(local_shape)
        d = split_dim(name)
        if d is not None:
            shape[d] *= self.world_size
        return tuple(shape)


def check_layout(config: Qwen3Config, world_size: int, option: str = "--tp") -> None:
    """Every rank must get whole heads and an equal share of the MLP."""
    for field in SPLIT_FIELDS:
        value = getattr(config, field)
        if value % world_size:
            raise ParallelError(
                f"{config.source}: {field} ({value}) is not divisible by the tensor-parallel "
                f"size {world_size} ({option} {world_size}): every rank takes an equal share of "
                f"num_attention_heads, num_key_value_heads and intermediate_size"
            )


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ParallelError(f"environment variable {name}={raw!r} is not an integer") from None


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def rank_from_env() -> int:
    return _env_int("RANK", 0)


def check_world_size(tp: int, world_size: int) -> None:
    if tp < 1:
        raise ParallelError(f"--tp must be >= 1, got {tp}")
    if tp != world_size:
        raise ParallelError(
            f"--tp {tp} but the world size is {world_size} (WORLD_SIZE from torchrun): run one "
            f"process per rank, torchrun --nproc-per-node {tp} -m engine --tp {tp} ..."
        )


def init_distributed(
    tp: int, *, timeout_s: float = INIT_TIMEOUT_S
) -> tuple[Parallel, torch.device | None]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): nccl on CUDA (each rank its GPU, LOCAL_RANK), gloo on CPU. Returns the layout
    and the device to build on (None: the default). A rank that never comes is an error after
    ``timeout_s``, not a hang."""
    check_world_size(tp, world_size_from_env())
    if tp == 1:
        return Parallel.single(), None
    disable_multicast()
    timeout = datetime.timedelta(seconds=timeout_s)
    device = None
    try:
        if torch.cuda.is_available():
            device = torch.device("cuda", _env_int("LOCAL_RANK", rank_from_env()))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    except (RuntimeError, dist.DistError) as exc:
        raise ParallelError(
            f"the {tp} ranks did not form a process group within {timeout_s:g} s "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): start "
            f"them together, torchrun --nproc-per-node {tp} -m engine --tp {tp} ..."
        ) from exc
    return Parallel.from_group(), device


# --------------------------------------------------------------------------------------------
# The all-reduce ops and the TP-only fusion
# --------------------------------------------------------------------------------------------

# The process group, read by the all-reduce ops like a parameter: each decoder layer of a
# sharded model holds it as ``tp_group`` (not a tensor; never drawn or counted as bytes).
GROUP = Role("group", PARAM, source="tp_group")


def all_reduce_op(name: str, tensor: str) -> Op:
    """Sum ``tensor`` (the partial sum of a row-parallel projection) over the ranks, in place.
    No float64 formula: one rank holds only its own partial (kernels/all_reduce_residual.py)."""

    def fn(group, **inputs):
        x = inputs[tensor]
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    return Op(name, (Role(tensor, ACT, ("hidden",)), GROUP), tensor, fn, out_dims=("hidden",))


# The projection after which each all-reduce runs, and what it reduces.
ALL_REDUCES = {
    "o_proj": ("o_proj_all_reduce", "o"),
    "down_proj": ("down_proj_all_reduce", "mlp_out"),
}


# The fusions that need every rank (engine/fusions.py: ``needs_ranks``).
TP_FUSIONS = tuple(registry.rank_fusions())


def unavailable_reasons(model) -> dict[str, str | None]:
    """TP fusion name -> why its kernel cannot run for this model (None: it can). Checked when
    a flag setting is first cut into segments (a collective on CUDA: every rank does it
    then)."""
    return {
        f.name: f.kernel_module().unavailable_reason(model.device, model.parallel.group)
        for f in TP_FUSIONS
    }


# --------------------------------------------------------------------------------------------
# The model on one rank
# --------------------------------------------------------------------------------------------


class ShardedQwen3ForCausalLM(Qwen3ForCausalLM):
    """One rank's Qwen3: local heads and intermediate rows (``config`` is the local config,
    ``full_config`` the model's), all-reduces after the row-parallel projections."""

    def __init__(self, config: Qwen3Config, parallel: Parallel, flags: FusionFlags | None = None):
        if not parallel.sharded:
            raise ParallelError("ShardedQwen3ForCausalLM needs world_size > 1: use engine.build")
        super().__init__(parallel.local_config(config), FusionFlags.none())
        self.parallel = parallel
        self.full_config = config
        for name, tensor in ALL_REDUCES.values():
            self.ops[name] = all_reduce_op(name, tensor)
        for layer in self.model.layers:
            layer.tp_group = parallel.group
        self._warned: set[str] = set()
        self._ready = True
        self.flags = flags if flags is not None else self.default_flags()

    def __setattr__(self, name, value):
        if name == "flags" and getattr(self, "_ready", False):
            self.check_flags(value)
        super().__setattr__(name, value)

    def program(self) -> list[BoundOp]:
        out = []
        for bound in super().program():
            out.append(bound)
            if bound.op.name in ALL_REDUCES:
                op = self.ops[ALL_REDUCES[bound.op.name][0]]
                out.append(BoundOp(op, bound.module, bound.layer))
        return out

    def check_flags(self, flags: FusionFlags) -> None:
        """Refuse a flag setting that asks for a fusion this program has no span of."""
        bad = [name for name in self.not_applicable if name in flags.enabled]
        if bad:
            raise NotApplicable(
                f"fusion(s) {', '.join(bad)} do not apply under tensor parallelism "
                f"({self.parallel.world_size} ranks): an all-reduce runs after o_proj and "
                "down_proj, so their spans never occur in this model's program. Switch them off "
                "(the tensor-parallel default, flags 'default' or None, leaves them out)"
            )

    def segments(self) -> list:
        key = self.flags.key()
        if key not in self._segments:
            self.check_flags(self.flags)  # a FusionFlags changed in place after assignment
            program = self.program()
            unavailable = self.unavailable()
            runnable = []
            for fusion in self.flags.fusions():
                if fusion.name in unavailable:
                    self.warn_unavailable(fusion.name, unavailable[fusion.name])
                else:
                    runnable.append(fusion)
            self._segments[key] = segments(program, runnable, self.config, returns=("logits",))
        return self._segments[key]

    def unavailable(self) -> dict[str, str]:
        """TP fusions whose kernel cannot run for this model (CPU, gloo, no symmetric memory or
        P2P): name -> why. Nothing is checked before the model is allocated; on CUDA the first
        check is a collective (every rank makes it together: engine.build and segments do)."""
        if self.device.type == "meta":
            return {}
        reasons = unavailable_reasons(self)
        return {name: why for name, why in reasons.items() if why is not None}

    def warn_unavailable(self, name: str, reason: str) -> None:
        """Say once (rank 0) that ``name`` cannot run here and that its ops run unfused."""
        if name in self._warned or self.parallel.rank != 0:
            return
        self._warned.add(name)
        fusion = registry.get(name)
        ops = ", ".join(op for span in fusion.spans for op in span)
        warnings.warn(
            f"{name} is not available here: {reason}. Running its ops unfused ({ops}) on "
            "every rank",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def random_init_sharded(
    model: ShardedQwen3ForCausalLM, seed: int = 0, layout: Parallel | None = None
) -> ShardedQwen3ForCausalLM:
    """The single-process model's random weights (same seed, same device: engine.build's
    draw), sliced to this rank: the full model is drawn, then each rank keeps its part."""
    layout = layout or model.parallel
    with on_meta(model.dtype):
        full = Qwen3ForCausalLM(model.full_config, FusionFlags.none())
    random_init(full.allocate(model.device), seed)
    full_weights = full.hf_weight_map()
    for name, target in model.hf_weight_map().items():
        target.copy_(layout.take(name, full_weights[name]))
    model.tie_weights()
    return model


def load_checkpoint_sharded(
    model: ShardedQwen3ForCausalLM, directory: str | Path, layout: Parallel | None = None
) -> ShardedQwen3ForCausalLM:
    """A full HF checkpoint into one rank: engine/loader.py's mapping and checks (a wrong shape
    names the tensor, the file and the full shape the config needs), each tensor sliced to the
    rank's part (``layout``: another rank's part, for tests)."""
    return load_checkpoint(model, directory, shard=layout or model.parallel)


def build_sharded(
    config: Qwen3Config,
    checkpoint: str | Path | None,
    parallel: Parallel,
    *,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    flags: FusionFlags | str | None = None,
) -> ShardedQwen3ForCausalLM:
    """engine.build for one rank of ``parallel`` (world size > 1). flags: None or "default":
    the default fusions that apply under TP; anything else is checked (NotApplicable)."""
    parallel.check(config)
    registry.list_rank_fusions()  # once per process: this one now has the TP-only fusions
    with on_meta(dtype):
        model = ShardedQwen3ForCausalLM(config, parallel)
    flags = FusionFlags.from_arg(flags)  # after list_rank_fusions: names TP-only ones too
    if flags is not None:
        model.flags = flags
    model.allocate(device)
    if flags is None:
        # The default, now that the device is known: a default fusion whose kernel cannot run
        # here is left out, saying why (every rank checks together: a collective on CUDA).
        model.flags = model.default_flags()
        for name, reason in model.unavailable().items():
            if registry.get(name).default:
                model.warn_unavailable(name, reason)
    if checkpoint is not None:
        load_checkpoint_sharded(model, checkpoint)
    else:
        random_init_sharded(model, seed)
    return model.eval()
