"""``python -m engine``: generate with the embedded Qwen3-0.6B default (random weights) or a
checkpoint, and print prefill and decode tokens/s.

    python -m engine                                # default fusions, eager
    python -m engine --fusions none --cuda-graph    # every step unfused, CUDA graphs
    python -m engine --fusions o_proj_residual,add_rms_norm
    python -m engine --fusions alt+mlp_block        # the default, the MLP block in one launch
    python -m engine --config engine/small_config.json   # the small architecture (CPU)
    torchrun --nproc-per-node 2 -m engine --tp 2    # tensor parallel over 2 processes

Timing: one untimed prefill and one untimed run of the decode steps first (Triton compiles,
the CUDA graph is captured), then a timed prefill, then --rounds timed runs of the decode
steps from the same context (engine.timing.decode_rate, as the profiling suite times decode);
the decode figure is their median.

Exit codes: docs/definitions.md, "Exit codes" (0 ok, 2 user error). --debug re-raises a user
error with its traceback; any other exception is a bug and raises as usual.

With --tp N (under torchrun: WORLD_SIZE, RANK, LOCAL_RANK from its environment) each process
runs one rank's shard (engine/parallel.py): gloo on CPU, nccl on CUDA (one GPU per rank).
Only rank 0 prints; every rank checks the same inputs, so its errors are everyone's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import engine
from engine import fusions as registry
from engine import parallel as tp
from engine.config import SMALL_CONFIG_PATH, Qwen3Config
from engine.memory import check_fits, memory_need
from engine.timing import decode_rate, sync
from kernels.runtime import check_backend


def _shown_path(path) -> str:
    """``path`` relative to the working directory where it is inside it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return str(path)
    return str(path) if relative.startswith("..") else relative


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="local Hugging Face Qwen3 folder (*.safetensors)")
    p.add_argument(
        "--config",
        help="an HF Qwen3 config.json (default: Qwen3-0.6B; "
        f"{_shown_path(SMALL_CONFIG_PATH)}: a 2-layer model that runs in seconds on a CPU)",
    )
    p.add_argument(
        "--fusions",
        default="default",
        help="fusions to run: 'default', 'none', a variant of one fusion f ('default-f'; "
        "'alt+f', 'alt-f' for f outside the default) or comma-separated names "
        f"(registered: {', '.join(f.name for f in registry.all_fusions())}; with --tp > 1 "
        f"also {', '.join(f.name for f in tp.TP_FUSIONS)}, and not "
        "o_proj_residual, down_proj_residual)",
    )
    p.add_argument("--cuda-graph", action="store_true", help="replay decode as CUDA graphs")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rounds",
        type=int,
        default=3 if torch.cuda.is_available() else 1,
        help="timed decode runs after one untimed run; the figure is their median (default 3; "
        "1 without a GPU, where the interpreter's timings mean nothing)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel size: run under torchrun --nproc-per-node N (default 1)",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = p.parse_args(argv)
    # Checked before anything is built: a bad size would otherwise fail much later with a
    # message about the cache (max_seq_len), which is no option of this command.
    for option in ("--prompt-len", "--max-new-tokens", "--batch-size", "--tp", "--rounds"):
        value = getattr(args, option.removeprefix("--").replace("-", "_"))
        if value < 1:
            p.error(f"argument {option}: must be an integer >= 1, got {value}")
    if not 0 <= args.seed < 2**63:  # torch's generators take a 64-bit seed
        p.error(f"argument --seed: must be an integer in 0..2**63-1, got {args.seed}")
    return args


# User errors (exit 2). UnsupportedConfigError and CheckpointError are ValueErrors; OSError
# covers a missing or unreadable file. Caught only around reading the config and checkpoint
# and sizing the cache (see main), so a ValueError from a bug in generation keeps its traceback.
USER_ERRORS = (OSError, ValueError)
EXIT_USER_ERROR = 2
QUIET_RANK_EXIT_DELAY_S = 2.0


@contextlib.contextmanager
def _user_errors(debug: bool, rank: int = 0):
    """Turn a user error into ``error: <message>`` on stderr and exit 2 (--debug: re-raise).
    Under tensor parallelism only rank 0 prints it (every rank checks the same inputs)."""
    try:
        yield
    except USER_ERRORS as exc:
        if debug:
            raise
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        else:
            # torchrun stops the other ranks when the first one exits: leave rank 0, which
            # fails the same check, the time to print it.
            time.sleep(QUIET_RANK_EXIT_DELAY_S)
        raise SystemExit(EXIT_USER_ERROR) from None


def cache_positions(prompt_len: int, max_new_tokens: int) -> int:
    """KV-cache positions a generation needs: the prefill writes prompt_len, then each of the
    max_new_tokens - 1 decode steps writes one; the last new token is never fed back."""
    return prompt_len + max_new_tokens - 1


def _config(args) -> Qwen3Config:
    """The architecture engine.build will use (read early under --tp: the layout check)."""
    if args.config is not None:
        return Qwen3Config.from_hf_json(args.config)
    if args.checkpoint is not None:
        return engine.load_config(args.checkpoint)
    return engine.default_config()


def _check_sizes(args, config: Qwen3Config, device: torch.device | None) -> None:
    """The cache positions against the config, then weights, KV cache and activations against
    the device's free memory (a shard's share under --tp), before anything is allocated."""
    max_seq_len = cache_positions(args.prompt_len, args.max_new_tokens)
    if max_seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} need "
            f"{max_seq_len} positions (the last new token is not cached); {config.source}: "
            f"max_position_embeddings is {config.max_position_embeddings}"
        )
    need = memory_need(
        config,
        getattr(torch, args.dtype),
        batch=args.batch_size,
        seq_len=max_seq_len,
        prompt_len=args.prompt_len,
    )
    if args.tp > 1:  # weights, cache and most activations split over the ranks
        need = type(need)(*(n // args.tp for n in dataclasses.astuple(need)))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_fits(
        need,
        device,
        f"{config.source} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}, vocab {config.vocab_size}; {args.dtype}) "
        f"with --batch-size {args.batch_size}, --prompt-len "
        f"{args.prompt_len}, --max-new-tokens {args.max_new_tokens}"
        + (f", --tp {args.tp} (per rank)" if args.tp > 1 else ""),
    )


def _start_parallel(args) -> tuple[tp.Parallel, torch.device | None]:
    """--tp 1 without torchrun: one process, as without tensor parallelism. Otherwise the
    layout is checked against the config (naming the field), --tp against WORLD_SIZE, and
    this process joins the group."""
    world_size = tp.world_size_from_env()
    if args.tp == 1 and world_size == 1:
        return tp.Parallel.single(), None
    tp.check_layout(_config(args), args.tp)
    tp.check_world_size(args.tp, world_size)
    return tp.init_distributed(args.tp)


def main(argv=None) -> int:
    args = _parse(argv)
    with _user_errors(args.debug):
        check_backend()
        launched = args.tp > 1 or tp.world_size_from_env() > 1
        rank = tp.rank_from_env() if launched else 0
    with _user_errors(args.debug, rank):
        parallel, device = _start_parallel(args)
    try:
        return _generate(args, parallel, device)
    finally:
        if parallel.sharded and dist.is_initialized():
            dist.destroy_process_group()


def _generate(args, parallel: tp.Parallel, device: torch.device | None) -> int:
    on_gpu = torch.cuda.is_available()
    # Only rank 0 speaks (stdout, notes).
    say = print if parallel.rank == 0 else (lambda *a, **k: None)
    with _user_errors(args.debug, parallel.rank):
        _check_sizes(args, _config(args), device)
        model = engine.build(
            args.config,
            args.checkpoint,
            dtype=getattr(torch, args.dtype),
            device=device,
            seed=args.seed,
            flags=args.fusions,
            parallel=parallel,
        )
        c = model.config
        cuda_graph = args.cuda_graph and model.device.type == "cuda"
        if args.cuda_graph and not cuda_graph:
            say(
                f"--cuda-graph: CUDA graphs need a CUDA GPU; the model is on {model.device}, "
                "so decode runs eagerly",
                file=sys.stderr,
            )
        runner = engine.Runner(
            model,
            max_batch_size=args.batch_size,
            max_seq_len=cache_positions(args.prompt_len, args.max_new_tokens),
            cuda_graph=cuda_graph,
        )
    if not on_gpu:
        hint = "No CUDA GPU: Triton kernels run through the interpreter (slow; its timings mean "
        hint += "nothing)."
        if args.config is None and args.checkpoint is None:
            hint += (
                " The 0.6B default takes minutes per token here; for a quick run use the small "
                f"architecture: --config {_shown_path(SMALL_CONFIG_PATH)}"
            )
        say(hint, file=sys.stderr)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    prompt = torch.randint(
        0,
        c.vocab_size,
        (args.batch_size, args.prompt_len),
        device=model.device,
        generator=generator,
    )
    fusions = ", ".join(model.flags.key()) or "none"
    mode = f"fusions: {fusions}; {'cuda-graph' if cuda_graph else 'eager'}"
    shown = c
    if parallel.sharded:
        dist.broadcast(prompt, src=0)  # every rank decodes the same prompt
        shown = model.full_config
        mode += f"; tensor parallel {parallel.world_size} ranks ({dist.get_backend()})"
        if model.not_applicable:
            mode += f", not applicable: {', '.join(model.not_applicable)}"
    say(
        f"Qwen3 {shown.num_hidden_layers} layers, hidden {shown.hidden_size}, {args.dtype}, "
        f"{model.device} ({mode}), batch {args.batch_size}, prompt {args.prompt_len}"
    )
    prefill_s, rates = _timed(runner, prompt, args.max_new_tokens - 1, args.rounds)
    say(
        f"prefill: {args.batch_size * args.prompt_len / prefill_s:.1f} tok/s "
        f"({1e3 * prefill_s:.2f} ms, after an untimed prefill)"
    )
    if rates:
        rate = statistics.median(rates)
        if cuda_graph:
            warmup = "an untimed run that compiled the kernels and captured the CUDA graph"
        elif model.device.type == "cuda":
            warmup = "an untimed run that compiled the kernels"
        else:
            warmup = "an untimed warm-up run"
        say(
            f"decode: {rate:.1f} tok/s ({1e3 * args.batch_size / rate:.2f} ms/step; median of "
            f"{len(rates)} timed run(s) of {args.max_new_tokens - 1} steps, after {warmup})"
        )
    else:
        say("decode: no decode steps (--max-new-tokens 1: the prefill gives the one new token)")
    return 0


def _timed(runner, prompt: torch.Tensor, steps: int, rounds: int) -> tuple[float, list[float]]:
    """Prefill seconds and decode tok/s per timed run, each after an untimed run of the same
    work (compilation and graph capture stay out of the figures)."""
    with torch.inference_mode():
        first = runner.prefill(prompt).argmax(-1)
        # The first decode step of a CUDA-graph runner runs eagerly, the second captures.
        for _ in range(0 if not steps else 1 if steps >= 2 else 2):
            decode_rate(runner, first, prompt.shape[1], steps)
        sync(runner.device)
        start = time.perf_counter()
        first = runner.prefill(prompt).argmax(-1)
        sync(runner.device)
        prefill_s = time.perf_counter() - start
        rates = [decode_rate(runner, first, prompt.shape[1], steps) for _ in range(rounds)]
    return prefill_s, rates if steps else []


if __name__ == "__main__":
    sys.exit(main())
