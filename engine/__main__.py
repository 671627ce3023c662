"""``python -m engine``: generate with the embedded Qwen3-0.6B default (random weights) or a
checkpoint, and print decode tokens/s.

    python -m engine                                # default fusions, eager
    python -m engine --fusions none --cuda-graph    # every step unfused, CUDA graphs
    python -m engine --fusions o_proj_residual,add_rms_norm
    python -m engine --config small.json            # a smaller architecture (CPU)

Exit codes: 0 ok, 2 user error (bad argument, config or checkpoint). A user error prints one
line ``error: <message>`` naming the argument, field or file, without a traceback; --debug
re-raises it with its traceback. Any other exception is a bug and raises as usual.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

import engine
from engine import fusions as registry


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="local Hugging Face Qwen3 folder (*.safetensors)")
    p.add_argument("--config", help="an HF Qwen3 config.json (default: Qwen3-0.6B)")
    p.add_argument(
        "--fusions",
        default="default",
        help="fusions to run: 'default', 'none' or comma-separated names "
        f"(registered: {', '.join(f.name for f in registry.all_fusions())})",
    )
    p.add_argument("--cuda-graph", action="store_true", help="replay decode as CUDA graphs")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = p.parse_args(argv)
    # Checked before anything is built: a bad size would otherwise fail much later with a
    # message about the cache (max_seq_len), which is no option of this command.
    for option in ("--prompt-len", "--max-new-tokens", "--batch-size"):
        value = getattr(args, option.removeprefix("--").replace("-", "_"))
        if value < 1:
            p.error(f"argument {option}: must be an integer >= 1, got {value}")
    return args


# User errors (exit 2). UnsupportedConfigError and CheckpointError are ValueErrors; OSError
# covers a missing or unreadable file. Caught only around reading the config and checkpoint
# and sizing the cache (see main), so a ValueError from a bug in generation keeps its traceback.
USER_ERRORS = (OSError, ValueError)
EXIT_USER_ERROR = 2


@contextlib.contextmanager
def _user_errors(debug: bool):
    """Turn a user error into ``error: <message>`` on stderr and exit 2 (--debug: re-raise)."""
    try:
        yield
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def cache_positions(prompt_len: int, max_new_tokens: int) -> int:
    """KV-cache positions a generation needs: the prefill writes prompt_len, then each of the
    max_new_tokens - 1 decode steps writes one; the last new token is never fed back."""
    return prompt_len + max_new_tokens - 1


def main(argv=None) -> int:
    args = _parse(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print(
            "No CUDA GPU: Triton kernels run through the interpreter, "
            "which is slow; the 0.6B default takes minutes per token here. For a quick run use "
            "a small architecture: --config path/to/small_config.json (an HF Qwen3 config.json).",
            file=sys.stderr,
        )
    with _user_errors(args.debug):
        model = engine.build(
            args.config,
            args.checkpoint,
            dtype=getattr(torch, args.dtype),
            seed=args.seed,
            flags=engine.FusionFlags.parse(args.fusions),
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
    print(
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
    for _ in tqdm(range(decode_steps), unit="tok", desc="decode"):
        token = runner.decode(token).argmax(-1)
    sync()
    decode_s = time.perf_counter() - start
    print(f"prefill: {args.batch_size * args.prompt_len / prefill_s:.1f} tok/s ({prefill_s:.3f} s)")
    if decode_steps > 0:
        print(
            f"decode: {decode_steps * args.batch_size / decode_s:.1f} tok/s "
            f"({1e3 * decode_s / decode_steps:.2f} ms/step, first step includes "
            f"{'graph capture and ' if args.cuda_graph else ''}warm-up)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
