"""Strict loading of Qwen2.5 safetensors checkpoints (single file or sharded).

Every tensor in the checkpoint must be a parameter of the model and every parameter must be in the
checkpoint (a tied ``lm_head.weight`` may be absent: it shares the embedding); every shape is
checked. Parameters are materialised one tensor at a time from memory-mapped files, straight into
the requested dtype, so loading needs about one copy of the weights in RAM, not two.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwenlite.errors import CheckpointError
from qwenlite.model.config import QwenConfig, resolve_dtype
from qwenlite.model.decoder import QwenForCausalLM

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def checkpoint_files(directory: Path) -> dict[str, list[str]]:
    """Map each safetensors file of a checkpoint directory to the tensor names it should hold
    (an empty list for a single-file checkpoint, whose names are read from the file)."""
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{directory / INDEX} is not a valid safetensors index: {exc}") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        for file in files:
            if not (directory / file).is_file():
                raise CheckpointError(f"shard {directory / file} named in {INDEX} is missing")
        return files
    if (directory / SINGLE).is_file():
        return {SINGLE: []}
    raise CheckpointError(f"no {SINGLE} or {INDEX} in {directory}")


def load_model(
    weights: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> QwenForCausalLM:
    """Load a Qwen2.5 checkpoint directory into a plain :class:`QwenForCausalLM` in eval mode
    (:func:`qwenlite.load_model` also applies the CPU acceleration, :mod:`qwenlite.accel`).

    Args:
        weights: directory with ``config.json`` and ``model.safetensors`` (or an index + shards).
        dtype: ``torch.float32``/``torch.bfloat16`` or ``"fp32"``/``"bf16"``.
        device: where the parameters go.

    Raises:
        CheckpointError: one line naming the file/tensor and what was expected vs found.
    """
    from safetensors import safe_open

    dtype = resolve_dtype(dtype)
    directory = Path(weights)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = QwenConfig.from_json(directory / "config.json")
    files = checkpoint_files(directory)

    with torch.device("meta"):
        model = QwenForCausalLM(config)
    expected = {name: p for name, p in model.named_parameters()}  # tied head listed once
    tied = config.tie_word_embeddings
    loaded: set[str] = set()
    for file, names_in_index in files.items():
        path = directory / file
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several error types
            raise CheckpointError(f"cannot read {path}: {exc}") from None
        with handle as f:
            names = list(f.keys())
            if names_in_index and set(names_in_index) - set(names):
                missing = sorted(set(names_in_index) - set(names))[0]
                raise CheckpointError(f"{path} lacks tensor {missing} that {INDEX} places there")
            for name in names:
                if name == "lm_head.weight" and tied:
                    continue  # tied: the head is the embedding; an extra copy is ignored
                if name not in expected:
                    raise CheckpointError(f"unexpected tensor {name} in {path} for this config")
                param = expected[name]
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(param.shape):
                    raise CheckpointError(
                        f"tensor {name} in {path} has shape {list(shape)}, "
                        f"expected {list(param.shape)}"
                    )
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:  # noqa: BLE001
                    raise CheckpointError(f"cannot read tensor {name} from {path}: {exc}") from None
                _assign(model, name, tensor.to(device=device, dtype=dtype))
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {directory} is missing tensor {missing[0]}{more}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    return model.eval()


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))


def init_random(config: QwenConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> QwenForCausalLM:
    """A randomly initialised model (tests, FLOPS counting, benchmarks without weights)."""
    gen = torch.Generator().manual_seed(seed)
    model = QwenForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype).eval()


def checkpoint_id(weights: str | Path) -> dict:
    """What identifies a checkpoint without a machine path: its directory's name and a hash of
    its ``config.json`` and its safetensors headers (names, dtypes, shapes, offsets)."""
    import hashlib
    import struct

    weights = Path(weights)
    h = hashlib.sha256()
    for path in [weights / "config.json", *sorted(weights.glob("*.safetensors"))]:
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                size = struct.unpack("<Q", f.read(8))[0]
                h.update(f.read(size))
            else:
                h.update(f.read())
    return {"name": weights.name, "sha256": h.hexdigest()[:16]}
