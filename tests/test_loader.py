"""Checkpoint loading (single file, sharded, tied) and the loader's errors, each naming the
file or tensor; seeded random init."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from engine_helpers import hf_qwen3, save_hf_checkpoint, small_config
from safetensors import SafetensorError

import engine
import engine.loader
from engine.loader import CheckpointError


def _hf_state(hf_model):
    return {k: v.detach() for k, v in hf_model.state_dict().items()}


def _assert_matches_hf(model, hf_model):
    state = _hf_state(hf_model)
    for name, target in model.hf_weight_map().items():
        assert torch.equal(target, state[name].to(target.dtype)), name
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_loads_every_tensor(tmp_path, tied):
    hf = hf_qwen3(small_config(tie_word_embeddings=tied))
    save_hf_checkpoint(hf, tmp_path)
    stored = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not tied)
    model = engine.build(checkpoint=tmp_path, dtype=torch.float32, device="cpu")
    assert model.config.tie_word_embeddings == tied
    _assert_matches_hf(model, hf)


def test_sharded_checkpoint(tmp_path):
    hf = hf_qwen3(small_config(num_hidden_layers=3))
    save_hf_checkpoint(hf, tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    model = engine.build(checkpoint=tmp_path, dtype=torch.float32, device="cpu")
    _assert_matches_hf(model, hf)


def test_casts_bf16_checkpoint_to_model_dtype(tmp_path):
    hf = hf_qwen3(small_config(), dtype=torch.bfloat16)
    save_hf_checkpoint(hf, tmp_path)
    model = engine.build(checkpoint=tmp_path, dtype=torch.float32, device="cpu")
    assert model.dtype == torch.float32
    _assert_matches_hf(model, hf)


@pytest.fixture
def checkpoint(tmp_path):
    save_hf_checkpoint(hf_qwen3(small_config(tie_word_embeddings=False)), tmp_path)
    return tmp_path


def _rewrite(directory, edit):
    path = directory / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    return path


def _build(directory):
    return engine.build(checkpoint=directory, dtype=torch.float32, device="cpu")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found.*nope"):
        _build(tmp_path / "nope")


def test_no_safetensors(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files in"):
        _build(checkpoint)


def test_missing_tensor(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_norm"
    ):
        _build(checkpoint)


def test_missing_lm_head_when_untied(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing tensor.*'lm_head.weight'"):
        _build(checkpoint)


def test_unexpected_tensor(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.ones(2)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor 'model\.layers\.7.*model\.safetensors"
    ):
        _build(checkpoint)


def test_wrong_shape(checkpoint):
    def edit(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][
            :, :5
        ].contiguous()

    _rewrite(checkpoint, edit)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight'.*shape"):
        _build(checkpoint)


def test_unsupported_dtype(checkpoint):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)

    _rewrite(checkpoint, edit)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*dtype torch\.int32"):
        _build(checkpoint)


def test_index_lists_a_missing_shard(tmp_path):
    save_hf_checkpoint(hf_qwen3(small_config()), tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists {victim.name}, which does not exist"):
        _build(tmp_path)


def test_not_qwen3(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    raw.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (checkpoint / "config.json").write_text(json.dumps(raw))
    with pytest.raises(engine.UnsupportedConfigError, match=r"config\.json.*is not Qwen3"):
        _build(checkpoint)


def test_config_disagreeing_with_weights(checkpoint):
    with pytest.raises(CheckpointError, match="shape"):
        engine.build(
            small_config(intermediate_size=96, tie_word_embeddings=False),
            checkpoint,
            dtype=torch.float32,
            device="cpu",
        )


def test_random_init_is_seeded():
    config = small_config()
    a, b, c = (engine.build(config, dtype=torch.float32, device="cpu", seed=s) for s in (3, 3, 4))
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            assert (pa == 1).all(), name
        else:
            assert not torch.equal(pa, pc), name
            assert abs(pa.std().item() - 0.02) < 0.005, name


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(checkpoint, damage):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"not safetensors " * 64}
    path.write_bytes(damaged.get(damage, b""))
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as excinfo:
        _build(checkpoint)
    assert str(excinfo.value).startswith(f"{path}: ")


def test_unreadable_tensor_names_file_and_tensor(checkpoint, monkeypatch):
    """safetensors' own error from get_tensor (e.g. a file changed under the mmap) is wrapped."""
    real_open = engine.loader.safe_open
    victim = "model.layers.1.mlp.gate_proj.weight"

    class Failing:
        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, name):
            if name == victim:
                raise SafetensorError("Error while deserializing: boom")
            return self._f.get_tensor(name)

    monkeypatch.setattr(engine.loader, "safe_open", Failing)
    path = checkpoint / "model.safetensors"
    with pytest.raises(CheckpointError, match=rf"cannot read tensor '{victim}' \(.*boom") as exc:
        _build(checkpoint)
    assert str(exc.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("index", "got"),
    [
        (["model-00001-of-00002.safetensors"], "got a JSON list"),
        ({"metadata": {}}, "got no weight_map field"),
        ({"weight_map": ["model.safetensors"]}, "got a weight_map of type list"),
    ],
    ids=["list", "no-weight-map", "weight-map-list"],
)
def test_index_must_be_an_object_with_a_weight_map(checkpoint, index, got):
    path = checkpoint / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as excinfo:
        _build(checkpoint)
    assert str(excinfo.value) == (
        f'{path}: a safetensors index must be a JSON object with a "weight_map" object mapping '
        f"tensor names to file names, {got}"
    )


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ({"model.norm.weight": 3}, r"weight_map\['model\.norm\.weight'\] must be a file name"),
        ({"model.norm.weight": None}, r"weight_map\['model\.norm\.weight'\] must be a file name"),
        ({}, "weight_map is empty"),
    ],
    ids=["int", "null", "empty"],
)
def test_index_weight_map_maps_names_to_file_names(checkpoint, weight_map, message):
    path = checkpoint / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message) as excinfo:
        _build(checkpoint)
    assert str(excinfo.value).startswith(f"{path}: ")
