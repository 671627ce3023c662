"""Decode tokens/s, timed one way for the engine's command line and the profiling suite.

One timed run: rewind the runner to ``prompt_len`` (the same context every time),
synchronize, decode ``new_tokens`` steps (each ``runner.decode_greedy``: the step and its
greedy argmax, both inside the CUDA graph when graphed, one replay a token), synchronize.
tokens/s = batch * new_tokens / elapsed, the garbage collector held off (eager decode is
host-bound). Warm-up (compilation, CUDA-graph capture) is the caller's: time runs after one
untimed run of the same steps.
"""

from __future__ import annotations

import gc
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(runner, token, prompt_len: int, new_tokens: int, align=None) -> float:
    """Tokens/s of ``new_tokens`` decode steps from position ``prompt_len`` (docstring).
    ``align``: called right before the timer starts (tensor parallel: every rank together)."""
    runner.rewind(prompt_len)
    sync(runner.device)
    # The youngest generation only: a full collection walks every object of the process
    # (~40 ms with torch and the suite imported, ~4 s over a run of the gate's decode stage),
    # and none can run while the collector is off anyway.
    gc.collect(0)
    gc.disable()
    try:
        if align is not None:
            align()
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = runner.decode_greedy(token)
        sync(runner.device)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return token.shape[0] * new_tokens / elapsed
