"""The profiling suite over tensor-parallel ranks (``torchrun --nproc-per-node N -m profiling``).

Every rank runs every stage in lockstep: the same flag settings, shapes, rounds and replays in
the same order, so that each collective of the sharded model meets its peers. Nothing a rank
decides may depend on its own clock or memory: such a decision is rank 0's, broadcast
(``Ranks.share``). Only rank 0 prints and writes; what the other ranks measured reaches it
through ``Ranks.gather``.

With one process (no torchrun) ``Ranks.single()`` makes every helper a no-op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from engine.parallel import Parallel


@dataclasses.dataclass(frozen=True)
class Ranks:
    parallel: Parallel
    device: torch.device | None = None

    @classmethod
    def single(cls) -> Ranks:
        return cls(Parallel.single())

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def rank(self) -> int:
        return self.parallel.rank

    @property
    def sharded(self) -> bool:
        return self.parallel.sharded

    @property
    def root(self) -> bool:
        return self.parallel.rank == 0

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a collective: every rank calls it)."""
        if not self.sharded:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.parallel.group)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every rank's ``value``, in rank order, on every rank (a collective)."""
        if not self.sharded:
            return [value]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.parallel.group)
        return out

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier(group=self.parallel.group)


def differences(per_rank: list[dict]) -> list[str]:
    """Where ranks' figures differ from rank 0's, one line each (empty: they agree)."""
    out = []
    first = per_rank[0]
    for rank, data in enumerate(per_rank[1:], 1):
        for key in sorted(set(first) | set(data)):
            if first.get(key) != data.get(key):
                out.append(f"{key}: rank 0 {first.get(key)}, rank {rank} {data.get(key)}")
    return out


def aligner(parallel, device: torch.device) -> Callable[[], None] | None:
    """For ranks of a sharded model: a call that starts a timed region on every rank together
    (a tiny all-reduce on the device, then wait for it: the ranks' GPUs leave it together and
    so do their hosts). Without it a rank whose host arrives late (a longer ``gc.collect``,
    say) charges its wait to every peer's timer, since each collective meets the late rank.
    None for a single process."""
    if parallel is None or not parallel.sharded:
        return None
    flag = torch.ones(1, device=device)

    def align() -> None:
        dist.all_reduce(flag, group=parallel.group)
        if flag.device.type == "cuda":
            torch.cuda.synchronize(flag.device)

    return align
