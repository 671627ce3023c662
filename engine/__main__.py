"""``python -m engine``: generate with the embedded Qwen3-0.6B default (random weights) or a
checkpoint, and print decode tokens/s.

    python -m engine                                # default fusions, eager
    python -m engine --fusions none --cuda-graph    # every step unfused, CUDA graphs
    python -m engine --fusions o_proj_residual,add_rms_norm
    python -m engine --config small.json            # a smaller architecture (CPU)
    torchrun --nproc-per-node 2 -m engine --tp 2    # tensor parallel over 2 processes

Exit codes: docs/definitions.md, "Exit codes" (0 ok, 2 user error). --debug re-raises a user
error with its traceback; any other exception is a bug and raises as usual.

With --tp N (under torchrun: WORLD_SIZE, RANK, LOCAL_RANK from its environment) each process
runs one rank's shard (engine/parallel.py): gloo on CPU, nccl on CUDA (one GPU per rank).
Only rank 0 prints; every rank checks the same inputs, so its errors are everyone's.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torch.distributed as dist

import engine
from engine import fusions as registry
from engine import parallel as tp
from engine.config import Qwen3Config


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="local Hugging Face Qwen3 folder (*.safetensors)")
    p.add_argument("--config", help="an HF Qwen3 config.json (default: Qwen3-0.6B)")
    p.add_argument(
        "--fusions",
        default="default",
        help="fusions to run: 'default', 'none' or comma-separated names "
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
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel size: run under torchrun --nproc-per-node N (default 1)",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = p.parse_args(argv)
    # Checked before anything is built: a bad size would otherwise fail much later with a
    # message about the cache (max_seq_len), which is no option of this command.
    for option in ("--prompt-len", "--max-new-tokens", "--batch-size", "--tp"):
        value = getattr(args, option.removeprefix("--").replace("-", "_"))
        if value < 1:
            p.error(f"argument {option}: must be an integer >= 1, got {value}")
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
    # Only rank 0 speaks (stdout, notes, progress bar).
    say = print if parallel.rank == 0 else (lambda *a, **k: None)
    if not on_gpu:
        say(
            "No CUDA GPU: Triton kernels run through the interpreter, "
            "which is slow; the 0.6B default takes minutes per token here. For a quick run use "
            "a small architecture: --config path/to/small_config.json (an HF Qwen3 config.json).",
            file=sys.stderr,
        )
    with _user_errors(args.debug, parallel.rank):
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
        max_seq_len = cache_positions(args.prompt_len, args.max_new_tokens)
        if max_seq_len > c.max_position_embeddings:
            raise ValueError(
                f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} need "
                f"{max_seq_len} positions (the last new token is not cached); {c.source}: "
                f"max_position_embeddings is {c.max_position_embeddings}"
            )
        runner = engine.Runner(
            model,
            max_batch_size=args.batch_size,
            max_seq_len=max_seq_len,
            cuda_graph=args.cuda_graph,
        )
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    prompt = torch.randint(
        0,
        c.vocab_size,
        (args.batch_size, args.prompt_len),
        device=model.device,
        generator=generator,
    )
    fusions = ", ".join(model.flags.key()) or "none"
    mode = f"fusions: {fusions}; {'cuda-graph' if args.cuda_graph else 'eager'}"
    if parallel.sharded:
        dist.broadcast(prompt, src=0)  # every rank decodes the same prompt
        full = model.full_config
        mode += f"; tensor parallel {parallel.world_size} ranks ({dist.get_backend()})"
        if model.not_applicable:
            mode += f", not applicable: {', '.join(model.not_applicable)}"
        say(
            f"Qwen3 {full.num_hidden_layers} layers, hidden {full.hidden_size}, {args.dtype}, "
            f"{model.device} ({mode}), batch {args.batch_size}, prompt {args.prompt_len}"
        )
    else:
        say(
            f"Qwen3 {c.num_hidden_layers} layers, hidden {c.hidden_size}, {args.dtype}, "
            f"{model.device} ({mode}), batch {args.batch_size}, prompt {args.prompt_len}"
        )
    # Time prefill and decode apart: prefill, then decode the remaining tokens.
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    start = time.perf_counter()
    logits = runner.prefill(prompt)
    sync()
    prefill_s = time.perf_counter() - start
    token = logits.argmax(-1)
    decode_steps = args.max_new_tokens - 1
    from tqdm.auto import tqdm

    start = time.perf_counter()
    steps = tqdm(range(decode_steps), unit="tok", desc="decode", disable=parallel.rank != 0)
    for _ in steps:
        token = runner.decode(token).argmax(-1)
    sync()
    decode_s = time.perf_counter() - start
    say(f"prefill: {args.batch_size * args.prompt_len / prefill_s:.1f} tok/s ({prefill_s:.3f} s)")
    if decode_steps > 0:
        say(
            f"decode: {decode_steps * args.batch_size / decode_s:.1f} tok/s "
            f"({1e3 * decode_s / decode_steps:.2f} ms/step, first step includes "
            f"{'graph capture and ' if args.cuda_graph else ''}warm-up)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
