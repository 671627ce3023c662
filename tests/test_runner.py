"""Runner: KV cache consistency, batching, sampling, CUDA graphs, markers, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import assert_logits_close, small_config

import engine

ROOT = Path(__file__).resolve().parents[1]
# fp32, interpreter: incremental decode and a full prefill compute the same sums in a
# different order (SDPA vs the decode kernel): ~1e-6 of logits ~0.5.
FP32_MAX_ABS, FP32_NORM_REL = 1e-4, 1e-4


@pytest.fixture
def model(device):
    return engine.build(small_config(), dtype=torch.float32, device=device)


def test_decode_continues_the_prefill(model, device):
    """Decoding token by token gives the logits a fresh prefill of the whole text gives."""
    runner = engine.Runner(model, max_batch_size=2, max_seq_len=32)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), device=device)
    tokens = runner.generate(prompt, 4)
    decoded_logits = runner.decode(tokens[:, -1])
    full = torch.cat([prompt, tokens], dim=1)
    assert_logits_close(
        decoded_logits,
        engine.Runner(model, max_batch_size=2, max_seq_len=32).prefill(full),
        max_abs=FP32_MAX_ABS,
        norm_rel=FP32_NORM_REL,
        what="decode vs prefill",
    )


def test_sequences_of_a_batch_are_independent(model, device):
    prompt = torch.randint(0, model.config.vocab_size, (3, 4), device=device)
    batched = engine.Runner(model, max_batch_size=3, max_seq_len=16).generate(prompt, 5)
    alone = engine.Runner(model, max_batch_size=1, max_seq_len=16)
    for b in range(3):
        assert torch.equal(batched[b], alone.generate(prompt[b : b + 1], 5)[0]), f"sequence {b}"


def test_prefill_resets_the_cache(model, device):
    runner = engine.Runner(model, max_seq_len=16)
    prompt = torch.randint(0, model.config.vocab_size, (1, 4), device=device)
    first = runner.generate(prompt, 6)
    runner.generate(torch.randint(0, model.config.vocab_size, (1, 7), device=device), 3)
    assert torch.equal(runner.generate(prompt, 6), first)


def test_sampling(model, device):
    runner = engine.Runner(model, max_seq_len=32)
    prompt = torch.randint(0, model.config.vocab_size, (1, 4), device=device)
    greedy = runner.generate(prompt, 6)

    def sampled(seed, **kw):
        gen = torch.Generator(device=device).manual_seed(seed)
        return runner.generate(prompt, 6, generator=gen, **kw)

    assert torch.equal(sampled(1, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sampled(5, temperature=1.5), sampled(5, temperature=1.5))
    # Random weights give a near-flat distribution over 512 tokens: 6 draws at temperature 5
    # equal to greedy would be a ~1e-16 event.
    assert not torch.equal(sampled(7, temperature=5.0), greedy)
    with pytest.raises(ValueError, match="temperature"):
        runner.generate(prompt, 2, temperature=-1.0)


def test_errors(model, device):
    runner = engine.Runner(model, max_batch_size=2, max_seq_len=8)
    ids = torch.randint(0, model.config.vocab_size, (2, 4), device=device)
    with pytest.raises(ValueError, match="max_seq_len is 8"):
        runner.generate(ids, 6)
    with pytest.raises(ValueError, match="batch size 3"):
        runner.prefill(torch.zeros(3, 2, dtype=torch.long, device=device))
    runner.prefill(ids)
    with pytest.raises(ValueError, match="last prefill had batch size 2"):
        runner.decode(ids[:1, 0])
    for _ in range(4):
        runner.decode(ids[:, 0])
    with pytest.raises(ValueError, match="KV cache is full"):
        runner.decode(ids[:, 0])


def test_markers_per_decode_step(model, device):
    """decode_step once, each layer once, o_proj_residual once per layer, per step."""
    from torch.profiler import profile

    runner = engine.Runner(model, max_seq_len=16)
    token = runner.prefill(torch.randint(0, 512, (1, 3), device=device)).argmax(-1)
    steps = 2
    with profile() as prof:
        for _ in range(steps):
            token = runner.decode(token).argmax(-1)
    counts = {}
    for event in prof.events():
        # On a GPU each range also shows as a device-side annotation: count the host ones.
        if event.device_type == torch.autograd.DeviceType.CPU:
            counts[event.name] = counts.get(event.name, 0) + 1
    layers = model.config.num_hidden_layers
    assert counts.get("decode_step") == steps
    assert counts.get("o_proj_residual") == steps * layers
    for i in range(layers):
        assert counts.get(f"layer.{i}") == steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_cuda_graph_on_cpu_warns_and_decodes_eagerly(model):
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        runner = engine.Runner(model, max_seq_len=16, cuda_graph=True)
    prompt = torch.randint(0, 512, (1, 3))
    eager = engine.Runner(model, max_seq_len=16).generate(prompt, 4)
    assert torch.equal(runner.generate(prompt, 4), eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decode_equals_eager(dtype):
    """Same tokens and logits from graph replay as from eager decode, per batch size and
    after switching fusions (graphs are captured per flag setting)."""
    model = engine.build(small_config(num_hidden_layers=4), dtype=dtype, device="cuda")
    settings = ("default", "none", "o_proj_residual,add_rms_norm,norm_gate_up_silu", "default")
    for batch in (1, 3):
        prompt = torch.randint(0, 512, (batch, 5), device="cuda")
        for spec in settings:
            model.flags = engine.FusionFlags.parse(spec)
            fused = spec
            eager = engine.Runner(model, max_batch_size=4, max_seq_len=64)
            graphed = engine.Runner(model, max_batch_size=4, max_seq_len=64, cuda_graph=True)
            expected = eager.generate(prompt, 12)
            got = graphed.generate(prompt, 12)
            assert torch.equal(got, expected), f"batch {batch} fused={fused}"
            # generate() decodes greedily: the argmax in the graph, a key of its own.
            assert graphed.captured_graphs == [(batch, model.flags.key(), "greedy")]
    # Flipping the flag on one runner mid-generation uses (and captures) the other graph.
    runner = engine.Runner(model, max_seq_len=64, cuda_graph=True)
    reference = engine.Runner(model, max_seq_len=64)
    prompt = torch.randint(0, 512, (1, 5), device="cuda")
    token, ref_token = runner.prefill(prompt).argmax(-1), reference.prefill(prompt).argmax(-1)
    for step in range(12):
        model.flags.o_proj_residual = step % 3 != 0
        logits, ref_logits = runner.decode(token), reference.decode(ref_token)
        token, ref_token = logits.argmax(-1), ref_logits.argmax(-1)
        assert torch.equal(token, ref_token), f"step {step}"
        assert_logits_close(logits, ref_logits, max_abs=1e-2, norm_rel=1e-2, what=f"step {step}")
    without = tuple(sorted(engine.FusionFlags.default().enabled - {"o_proj_residual"}))
    assert sorted(runner.captured_graphs) == sorted(
        [(1, without), (1, engine.FusionFlags.default().key())]
    )


def test_decode_greedy_is_decode_then_argmax(model, device):
    """Eager (and on a GPU, graphed) greedy steps give the tokens decode + argmax gives, when
    the returned buffer is passed back and when another tensor is passed in."""
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), device=device)
    graphs = [False, True] if device.type == "cuda" else [False]
    for cuda_graph in graphs:
        reference = engine.Runner(model, max_batch_size=2, max_seq_len=32)
        runner = engine.Runner(model, max_batch_size=2, max_seq_len=32, cuda_graph=cuda_graph)
        ref = reference.prefill(prompt).argmax(-1)
        token = runner.prefill(prompt).argmax(-1)
        for step in range(8):
            ref = reference.decode(ref).argmax(-1)
            # Steps 0-1 warm up and capture; from then on the graph's own buffer comes back,
            # except at step 5, where a copy goes in.
            token = runner.decode_greedy(token.clone() if step == 5 else token)
            assert token.dtype == torch.int64 and torch.equal(token, ref), (cuda_graph, step)
        if cuda_graph:
            assert runner.captured_graphs == [(2, model.flags.key(), "greedy")]


@pytest.mark.gpu
def test_qwen3_0_6b_cuda_graph_tokens_equal_eager():
    model = engine.build(dtype=torch.bfloat16, device="cuda")
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    for spec in ("default", "none"):
        model.flags = engine.FusionFlags.parse(spec)
        eager = engine.Runner(model, max_seq_len=64).generate(prompt, 16)
        graphed = engine.Runner(model, max_seq_len=64, cuda_graph=True).generate(prompt, 16)
        assert torch.equal(graphed, eager), f"fusions {spec}"


def test_cli_runs_a_small_config(tmp_path):
    config_path = tmp_path / "small.json"
    config_path.write_text(json.dumps(small_config().to_hf_dict()))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "--config",
            str(config_path),
            "--prompt-len",
            "4",
            "--max-new-tokens",
            "3",
            "--fusions",
            "none",
            "--dtype",
            "float32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "decode:" in result.stdout and "tok/s" in result.stdout
    if not torch.cuda.is_available():
        assert "interpreter" in result.stderr
