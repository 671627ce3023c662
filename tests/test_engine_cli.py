"""``python -m engine``: a user error (bad argument, config or checkpoint) is one line
``error: ...`` naming the argument, field or file, exit code 2, no traceback (--debug shows
it); the cache holds exactly prompt + new tokens - 1 positions.

The subprocess tests import torch (a few seconds each): the many argument and config variants
run in-process through main(), a few representative ones as a real process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import small_config

import engine
from engine.__main__ import cache_positions, main

ROOT = Path(__file__).resolve().parents[1]


def _write_config(directory: Path, **changes) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps({**small_config().to_hf_dict(), **changes}))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", "--dtype", "float32", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _user_error_in_process(capsys, *args: str) -> str:
    """main() on a small config: must exit 2 (SystemExit, as from the command line)."""
    with pytest.raises(SystemExit) as excinfo:
        main(["--dtype", "float32", *args])
    assert excinfo.value.code == 2
    return capsys.readouterr().err


# --- As a process: exit code, one-line message, no traceback ---------------------------------


@pytest.mark.parametrize("case", ["argument", "config", "checkpoint"])
def test_user_error_exits_2_without_traceback(tmp_path, case):
    config = _write_config(tmp_path)
    if case == "argument":
        args, names = ["--config", str(config), "--max-new-tokens", "-1"], ["--max-new-tokens"]
    elif case == "config":
        config = _write_config(tmp_path, num_key_value_heads=0)
        args, names = ["--config", str(config)], [str(config), "num_key_value_heads"]
    else:  # a config.json beside a corrupt weights file
        (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
        args, names = ["--checkpoint", str(tmp_path)], [str(tmp_path / "model.safetensors")]
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: " in result.stderr
    for name in names:
        assert name in result.stderr, result.stderr
    if case != "argument":  # argparse adds its usage lines; ours is a single line
        (line,) = [x for x in result.stderr.splitlines() if "error" in x]
        assert line.startswith(f"error: {names[0]}: "), line


def test_debug_shows_the_traceback(tmp_path):
    config = _write_config(tmp_path, num_key_value_heads=0)
    result = _cli("--config", str(config), "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "num_key_value_heads" in result.stderr


def test_prompt_plus_new_tokens_may_fill_max_position_embeddings(tmp_path):
    """60 prompt + 5 new tokens use 64 cache positions: the 5th new token is never fed back."""
    config = _write_config(tmp_path, max_position_embeddings=64)
    result = _cli("--config", str(config), "--prompt-len", "60", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "decode:" in result.stdout


# --- In-process (fast): every argument, the other config errors -------------------------------


@pytest.mark.parametrize("option", ["--prompt-len", "--max-new-tokens", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_sizes_must_be_at_least_1(tmp_path, capsys, option, value):
    err = _user_error_in_process(capsys, "--config", str(_write_config(tmp_path)), option, value)
    assert f"error: argument {option}: must be an integer >= 1, got {value}" in err, err


def test_config_that_is_not_an_object(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    err = _user_error_in_process(capsys, "--config", str(path))
    assert err.splitlines()[-1].startswith(f"error: {path}: a config file must hold a JSON object")


def test_missing_config_file(tmp_path, capsys):
    err = _user_error_in_process(capsys, "--config", str(tmp_path / "nope.json"))
    assert err.splitlines()[-1] == f"error: {tmp_path / 'nope.json'}: config file not found"


def test_prompt_too_long_for_max_position_embeddings(tmp_path, capsys):
    config = _write_config(tmp_path, max_position_embeddings=64)
    err = _user_error_in_process(
        capsys, "--config", str(config), "--prompt-len", "61", "--max-new-tokens", "5"
    )
    line = err.splitlines()[-1]
    assert line.startswith("error: --prompt-len 61 + --max-new-tokens 5 need 65 positions"), line
    assert f"{config}: max_position_embeddings is 64" in line


def test_cache_positions_agree_with_the_runner(device):
    """The CLI sizes the cache with cache_positions(); generate() needs exactly that many."""
    model = engine.build(small_config(), dtype=torch.float32, device=device)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), device=device)
    assert cache_positions(6, 3) == 8
    tokens = engine.Runner(model, max_seq_len=8).generate(prompt, 3)
    assert tokens.shape == (1, 3)
    with pytest.raises(ValueError, match="needs 8 cache positions; max_seq_len is 7"):
        engine.Runner(model, max_seq_len=7).generate(prompt, 3)


# --- The printed figures: prefill and decode apart, warm-up excluded ---------------------------


def test_printed_prefill_and_decode_exclude_the_first_slow_step(monkeypatch, capsys):
    """The first prefill and the first (greedy) decode step sleep SLOW_S (as compilation or
    CUDA-graph capture would take): had either been timed, the printed figures could not be
    below it."""
    from engine.config import SMALL_CONFIG_PATH
    from engine.runner import Runner

    slow_s, steps, rounds = 4.0, 4, 2
    calls = {"prefill": 0, "decode_greedy": 0}

    def slow_first(name):
        original = getattr(Runner, name)

        def call(self, *args):
            calls[name] += 1
            if calls[name] == 1:
                time.sleep(slow_s)
            return original(self, *args)

        return call

    for name in calls:
        monkeypatch.setattr(Runner, name, slow_first(name))
    args = ["--config", str(SMALL_CONFIG_PATH), "--prompt-len", "4"]
    args += ["--max-new-tokens", str(steps + 1), "--rounds", str(rounds)]
    assert main(["--dtype", "float32", *args]) == 0
    out = capsys.readouterr().out
    prefill = re.search(r"^prefill: ([\d.]+) tok/s \(([\d.]+) ms, after an untimed", out, re.M)
    decode = re.search(
        rf"^decode: ([\d.]+) tok/s \(([\d.]+) ms/step; median of {rounds} timed run\(s\) of "
        rf"{steps} steps, after an untimed (warm-up )?run( that compiled the kernels)?\)$",
        out,
        re.M,
    )
    assert prefill and decode, out
    assert float(prefill[2]) < 1e3 * slow_s
    assert abs(4 / float(prefill[1]) - float(prefill[2]) / 1e3) < 1e-3 * float(prefill[2])
    ms_per_step = float(decode[2])
    assert ms_per_step < 1e3 * slow_s / steps, out
    assert abs(1e3 / float(decode[1]) - ms_per_step) <= 0.01 * ms_per_step  # batch 1
    # one untimed run and `rounds` timed runs of the decode steps; two prefills
    assert calls == {"prefill": 2, "decode_greedy": steps * (1 + rounds)}
