"""A small Qwen3 inference engine (nano-vllm style: pure torch + Triton, no flash-attn) that
runs the registered fusions (engine/fusions.py) behind flags.

    import engine
    model = engine.build()                       # Qwen3-0.6B architecture, random weights
    model = engine.build(checkpoint="path/hf")   # a local HF Qwen3 checkpoint
    runner = engine.Runner(model, cuda_graph=True)
    tokens = runner.generate(prompt_ids, max_new_tokens=64)
    model.flags.o_proj_residual = False          # that step unfused, same weights
    model.flags = engine.FusionFlags.none()      # every step unfused

Tensor parallel (one process per rank, e.g. under torchrun; engine/parallel.py)::

    model = engine.build(parallel=engine.Parallel.from_group())   # this rank's shard
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import Qwen3Config, UnsupportedConfigError, default_config
from engine.flags import FusionFlags
from engine.loader import CheckpointError, load_checkpoint, load_config, random_init
from engine.memory import check_fits, memory_need
from engine.parallel import Parallel, build_sharded
from engine.qwen3 import Qwen3ForCausalLM, on_meta
from engine.runner import Runner

__all__ = [
    "CheckpointError",
    "FusionFlags",
    "Parallel",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Runner",
    "UnsupportedConfigError",
    "build",
    "default_config",
    "load_checkpoint",
    "random_init",
]


def build(
    config: Qwen3Config | str | Path | None = None,
    checkpoint: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    seed: int = 0,
    flags: FusionFlags | str | None = None,
    parallel: Parallel | None = None,
) -> Qwen3ForCausalLM:
    """A ready Qwen3ForCausalLM in eval mode, without gradients.

    config: a Qwen3Config, a config.json path, or None (the checkpoint's config.json if a
    checkpoint is given, else the embedded Qwen3-0.6B default). checkpoint: a local HF folder
    with *.safetensors; without it the weights are random (seeded). device: None picks cuda
    when available, else cpu. flags: the fusions to run (a FusionFlags, or "default", "none",
    "name,name"); None is the default set. parallel: this process's tensor-parallel rank
    (engine.parallel.Parallel); with world size > 1 the model is that rank's shard
    (engine.parallel.ShardedQwen3ForCausalLM: the same weights as with world size 1, sliced),
    and None or "default" flags mean the default fusions that apply under tensor parallelism.
    """
    if checkpoint is not None:
        checkpoint_config = load_config(checkpoint)
        config = checkpoint_config if config is None else config
    if config is None:
        config = default_config()
    elif not isinstance(config, Qwen3Config):
        config = Qwen3Config.from_hf_json(config)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if parallel is not None and parallel.sharded:
        return build_sharded(
            config, checkpoint, parallel, dtype=dtype, device=device, seed=seed, flags=flags
        )
    # Before the model is made: a config of a billion layers would grow the process unbounded.
    check_fits(memory_need(config, dtype), device, f"{config.source}: the model's weights")
    with on_meta(dtype):
        model = Qwen3ForCausalLM(config, FusionFlags.from_arg(flags))
    model.allocate(device)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    else:
        random_init(model, seed)
    return model.eval()
