"""``python -m engine``: generate with the embedded Qwen3-0.6B default (random weights) or a
checkpoint, and print decode tokens/s.

    python -m engine                       # fused path, eager
    python -m engine --unfused --cuda-graph
    python -m engine --config small.json   # a smaller architecture (CPU)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import engine
import kernels  # noqa: F401  (first: picks compiled or interpreted Triton)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="local Hugging Face Qwen3 folder (*.safetensors)")
    p.add_argument("--config", help="an HF Qwen3 config.json (default: Qwen3-0.6B)")
    p.add_argument("--unfused", action="store_true", help="o_proj then add (2 kernels)")
    p.add_argument("--cuda-graph", action="store_true", help="replay decode as CUDA graphs")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print(
            "No CUDA GPU: Triton kernels run through the interpreter (TRITON_INTERPRET=1), "
            "which is slow; the 0.6B default takes minutes per token here. For a quick run use "
            "a small architecture: --config path/to/small_config.json (an HF Qwen3 config.json).",
            file=sys.stderr,
        )
    model = engine.build(
        args.config,
        args.checkpoint,
        dtype=getattr(torch, args.dtype),
        seed=args.seed,
        fuse_o_proj_residual=not args.unfused,
    )
    c = model.config
    runner = engine.Runner(
        model,
        max_batch_size=args.batch_size,
        max_seq_len=args.prompt_len + args.max_new_tokens,
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
    mode = (
        f"{'unfused' if args.unfused else 'fused'}, {'cuda-graph' if args.cuda_graph else 'eager'}"
    )
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
