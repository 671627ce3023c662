"""Weights: ``*.safetensors`` from a local Hugging Face checkpoint folder, or a seeded random
init. Every error names the file or the tensor.

Dtype policy: bfloat16, float16 and float32 checkpoint tensors are cast to the model's dtype
(a bf16 checkpoint into an fp32 model for tests, an fp32 one into bf16 for speed); any other
dtype (integers, fp8, float64) is rejected, since a silent cast of a quantised tensor would
compute garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.config import Qwen3Config

INDEX_FILE = "model.safetensors.index.json"
LOADABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Present in some exported checkpoints, never needed (RoPE tables are computed).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the file or tensor."""


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (from its index when sharded)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    index = directory / INDEX_FILE
    if index.is_file():
        files = [directory / name for name in sorted(set(_read_weight_map(index).values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(
                    f"{index} lists {f.name}, which does not exist in {directory}"
                )
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}")
    return files


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> file name), checked."""
    expected = 'must be a JSON object with a "weight_map" object mapping tensor names to file names'
    try:
        raw = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index}: not valid JSON ({exc}); an index {expected}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("weight_map"), dict):
        if not isinstance(raw, dict):
            got = {list: "a JSON list", str: "a JSON string"}.get(type(raw), f"{raw!r}")
        elif "weight_map" not in raw:
            got = "no weight_map field"
        else:
            got = f"a weight_map of type {type(raw['weight_map']).__name__}"
        raise CheckpointError(f"{index}: a safetensors index {expected}, got {got}")
    weight_map = raw["weight_map"]
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str):
            raise CheckpointError(
                f"{index}: weight_map[{name!r}] must be a file name (a string), got {file_name!r}"
            )
    if not weight_map:
        raise CheckpointError(f"{index}: weight_map is empty; an index {expected}")
    return weight_map


def _open(path: Path):
    # safetensors' own errors (a truncated file, a corrupt header) name no file.
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc


def _get_tensor(f, name: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read tensor {name!r} ({exc})") from exc


def load_config(directory: str | Path) -> Qwen3Config:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    return Qwen3Config.from_hf_json(directory / "config.json")


@torch.no_grad()
def load_checkpoint(
    model: torch.nn.Module, directory: str | Path, *, shard=None
) -> torch.nn.Module:
    """Copy a Hugging Face Qwen3 checkpoint into ``model`` (a Qwen3ForCausalLM).

    Accepts one or several ``*.safetensors`` files (with ``model.safetensors.index.json`` when
    sharded). With tied embeddings ``lm_head.weight`` is normally absent (the LM head is the
    embedding); if present it is skipped. Raises CheckpointError naming the tensor and file for
    a missing, unexpected, wrongly shaped or wrongly typed tensor, or one holding NaN or inf.

    ``shard``: a tensor-parallel rank's layout (engine.parallel.Parallel): each full tensor is
    checked against ``shard.full_shape(name, local shape)``, then ``shard.take(name, tensor)``
    (the rank's part) is copied into the rank's model.
    """
    files = checkpoint_files(directory)
    targets = model.hf_weight_map()
    tied = model.config.tie_word_embeddings
    loaded: dict[str, Path] = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                if name not in targets:
                    raise CheckpointError(
                        f"unexpected tensor {name!r} in {path}: a Qwen3 model with this config "
                        f"({model.config.num_hidden_layers} layers) has no such weight"
                    )
                if name in loaded:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {loaded[name]} and {path}"
                    )
                tensor = _get_tensor(f, name, path)
                _check_finite(tensor, targets[name].dtype, name, path)
                if shard is not None:
                    full = shard.full_shape(name, tuple(targets[name].shape))
                    _check_shape(tensor, full, name, path)
                    tensor = shard.take(name, tensor)
                _copy_checked(targets[name], tensor, name, path)
                loaded[name] = path
    missing = [name for name in targets if name not in loaded]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensor(s) in {directory}: {shown}{more}")
    model.tie_weights()
    return model


def _check_shape(tensor: torch.Tensor, shape: tuple, name: str, path: Path) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            f"tensor {name!r} in {path} has shape {tuple(tensor.shape)}; the config needs "
            f"{tuple(shape)}"
        )


def _check_finite(tensor: torch.Tensor, dtype: torch.dtype, name: str, path: Path) -> None:
    """A NaN or inf weight, in the file or once cast to the model's ``dtype``, would decode
    garbage with no error. Checked on the whole tensor, before a tensor-parallel rank takes
    its part (every rank then fails alike)."""
    if tensor.dtype not in LOADABLE_DTYPES:
        return  # refused by _copy_checked, naming the dtype
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        first = tuple(int(i) for i in (~finite).nonzero()[0])
        raise CheckpointError(
            f"tensor {name!r} in {path} holds {bad} NaN or inf value(s) (the first at index "
            f"{first}): the checkpoint is corrupt"
        )
    narrower = torch.finfo(dtype).max < torch.finfo(tensor.dtype).max
    if narrower and not bool(torch.isfinite(tensor.to(dtype)).all()):
        raise CheckpointError(
            f"tensor {name!r} in {path} overflows {dtype} (values beyond its range become "
            "inf): load it in a wider --dtype"
        )


def _copy_checked(target: torch.Tensor, tensor: torch.Tensor, name: str, path: Path) -> None:
    _check_shape(tensor, tuple(target.shape), name, path)
    if tensor.dtype not in LOADABLE_DTYPES:
        raise CheckpointError(
            f"tensor {name!r} in {path} has dtype {tensor.dtype}; loadable: bfloat16, float16, "
            "float32 (cast to the model dtype)"
        )
    target.copy_(tensor)


@torch.no_grad()
def random_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights: matrices ~N(0, 0.02) (Qwen's initializer_range), norms = 1.

    Drawn on the model's device with a private generator (the global RNG is untouched); the
    same seed on the same device gives the same weights.
    """
    generator = torch.Generator(device=model.device).manual_seed(seed)
    for name, param in model.named_parameters():  # tied weights are listed once
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    return model
