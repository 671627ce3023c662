"""GPU smoke run of the engine: Qwen3-0.6B default, bf16, random weights, batch 1.

For each of fused/unfused x eager/cuda-graph: prefill + decode, decode tokens/s (median of a
few timed repeats after a warm-up, CUDA synchronized), and whether CUDA-graph decode gives the
greedy tokens of eager decode on the same path. (Fused vs unfused tokens may differ here: bf16
logits of random weights are near-flat and tie; tests/test_fused_vs_unfused.py judges that.)
Prints a compact table and writes JSON to --out (default $OUT, else ./out).
Meant to finish well under 2 minutes on an H100.

    python scripts/gpu_engine_smoke.py [--out DIR] [--prompt-len 128] [--decode-steps 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import engine
import kernels  # noqa: F401  (first: compiled vs interpreted Triton)
from kernels.runtime import gpu_name


def _time_decode(runner, prompt, steps: int, repeats: int) -> tuple[list[float], torch.Tensor]:
    """Seconds per decode run of ``steps`` tokens (after the prefill), and the tokens."""
    times, tokens = [], None
    for _ in range(repeats):
        token = runner.prefill(prompt).argmax(-1)
        out = [token]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            token = runner.decode(token).argmax(-1)
            out.append(token)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens = torch.stack(out, 1)
    return times, tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "out")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = engine.build(dtype=torch.bfloat16, device="cuda")
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (1, args.prompt_len), device="cuda")
    max_seq = args.prompt_len + args.decode_steps + 1
    rows, eager_tokens = [], {}
    for cuda_graph in (False, True):
        for fused in (True, False):
            model.flags.fuse_o_proj_residual = fused
            runner = engine.Runner(model, max_seq_len=max_seq, cuda_graph=cuda_graph)
            # Warm-up: compiles the Triton kernels, captures the graph.
            _time_decode(runner, prompt, 4, 1)
            times, tokens = _time_decode(runner, prompt, args.decode_steps, args.repeats)
            if not cuda_graph:
                eager_tokens[fused] = tokens
            median = statistics.median(times)
            rows.append(
                {
                    "mode": "cuda_graph" if cuda_graph else "eager",
                    "fused": fused,
                    "decode_tok_per_s": args.decode_steps / median,
                    "ms_per_token": 1e3 * median / args.decode_steps,
                    "repeats_s": times,
                    "tokens_equal_eager": bool(torch.equal(tokens, eager_tokens[fused])),
                    "graphs_captured": len(runner.captured_graphs),
                }
            )
    result = {
        "device": gpu_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "model": "Qwen3-0.6B architecture, random weights, bf16",
        "layers": c.num_hidden_layers,
        "batch_size": 1,
        "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}")
    print(f"Qwen3-0.6B bf16 batch 1, prompt {args.prompt_len}, {args.decode_steps} decode steps")
    print(f"{'mode':<11} {'path':<8} {'tok/s':>9} {'ms/tok':>8}  tokens==eager")
    for r in rows:
        path = "fused" if r["fused"] else "unfused"
        print(
            f"{r['mode']:<11} {path:<8} {r['decode_tok_per_s']:>9.1f} {r['ms_per_token']:>8.3f}"
            f"  {r['tokens_equal_eager']}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_engine_smoke.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'gpu_engine_smoke.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
