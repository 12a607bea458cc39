"""Low-rank adaptation (Hu et al., 2021) of the attention projections, saved in PEFT's format.

``LoRALinear`` wraps a frozen ``nn.Linear``: ``y = base(x) + (x Aᵀ)·(alpha/r) Bᵀ`` with
``A (r, in)`` Kaiming-uniform and ``B (out, r)`` zero, so training starts from the base model's
exact output. Parameter names (``lora_A.weight``, ``lora_B.weight``) and the adapter files
(``adapter_config.json`` + ``adapter_model.safetensors``) follow PEFT, so an adapter trained here
loads into transformers + PEFT, and back.

The course's trainable **logit bias** (:func:`add_logit_bias`: one bias per vocabulary entry,
zeros at first, added to the LM head's logits) is saved beside the LoRA files as
``logit_bias.safetensors`` (one tensor, ``lm_head.bias``). PEFT ignores that file, so an adapter
stays PEFT-loadable; a PEFT user adds the bias with ``model.lm_head.bias =
torch.nn.Parameter(load_file(path)["lm_head.bias"])`` (:func:`load_logit_bias_into` does exactly
that, and the tests check it against qwenlite). A bias alone (no LoRA) writes only that file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from qwenlite.errors import CheckpointError, QwenliteError
from qwenlite.io import atomic_path, atomic_write_text, read_json_object
from qwenlite.model.counting import FlopCount, linear_flops, matmul_flops

DEFAULT_TARGETS = ("q_proj", "v_proj")
# The linear layers of a Qwen2 decoder layer that LoRA can adapt (attention, then MLP).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LOGIT_BIAS_FILE = "logit_bias.safetensors"
LOGIT_BIAS_KEY = "lm_head.bias"


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        base: the layer to adapt (its weight and bias are frozen).
        r: rank of the update (>= 1).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        if r < 1:
            raise QwenliteError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        self.base.requires_grad_(False)
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        layer = type(base)  # A and B run as the base runs (plain, or an accelerated Linear)
        self.lora_A = layer(base.in_features, r, bias=False, **factory)
        self.lora_B = layer(r, base.out_features, bias=False, **factory)
        self.merged = False
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(x) * self.scaling)

    def flops(self, n_tokens: int, out_features: int | None = None) -> FlopCount:
        """Base layer, then x·Aᵀ, scaling of the r-wide result, ·Bᵀ, and the add.

        Args:
            n_tokens: rows through the layer.
            out_features: count the layer as if it were this wide (base, B and the add); used
                when GQA's K/V projections are counted as full multi-head projections.
        """
        out_f = self.out_features if out_features is None else out_features
        count = linear_flops(self.base, n_tokens, out_features)
        if not self.merged:
            count["lora_A"] = matmul_flops(n_tokens, self.in_features, self.r)
            count["lora_scale"] = n_tokens * self.r
            count["lora_B"] = matmul_flops(n_tokens, self.r, out_f)
            count["lora_add"] = n_tokens * out_f
        return count

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha/r)·B A`` as a full (out, in) matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (faster inference); no-op if merged."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`; no-op if not merged."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, r: int = 4, alpha: float | None = None,
               targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every ``nn.Linear`` whose attribute name is in ``targets`` with :class:`LoRALinear`,
    freeze everything else, and return the wrapped module names.

    ``alpha`` defaults to ``r`` (scaling 1).
    """
    targets = tuple(targets)
    if r < 1:
        raise QwenliteError(f"LoRA rank must be >= 1, got {r}")
    alpha = float(r if alpha is None else alpha)
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise QwenliteError(f"no linear layer named {', '.join(targets)} to adapt")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names
    (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``)."""
    return {
        f"{PEFT_PREFIX}{name}.{part}.weight": getattr(layer, part).weight.detach()
        for name, layer in lora_layers(model).items()
        for part in ("lora_A", "lora_B")
    }


def add_logit_bias(model: nn.Module) -> nn.Parameter:
    """Give the LM head a trainable bias of zeros (one per vocabulary entry), as the course's
    ``qwen.py`` does; everything else keeps its ``requires_grad``. Returns the bias."""
    head = model.lm_head
    if head.bias is None:
        head.bias = nn.Parameter(torch.zeros(head.out_features, dtype=head.weight.dtype,
                                             device=head.weight.device))
    head.bias.requires_grad_(True)
    return head.bias


def logit_bias(model: nn.Module) -> torch.Tensor | None:
    """The LM head's bias, or None."""
    return getattr(model.lm_head, "bias", None)


def load_logit_bias_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Set ``model.lm_head.bias`` from a ``logit_bias.safetensors`` file. Works on qwenlite's
    model and on transformers' ``Qwen2ForCausalLM`` (+ PEFT) alike: how a PEFT user loads it."""
    from safetensors.torch import load_file

    try:
        bias = load_file(str(path))[LOGIT_BIAS_KEY]
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds
        raise CheckpointError(f"cannot read the logit bias {path}: {exc}") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") \
        else model.lm_head
    if tuple(bias.shape) != (head.out_features,):
        raise CheckpointError(f"logit bias {path} has shape {list(bias.shape)}, expected "
                              f"[{head.out_features}]")
    head.bias = nn.Parameter(bias.to(head.weight.dtype).to(head.weight.device),
                             requires_grad=False)
    return model


def save_adapter(model: nn.Module, directory: str | Path,
                 base_model_name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct") -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's format), and
    ``logit_bias.safetensors`` when the LM head has a bias, each atomically: a crash mid-save
    leaves the previous files intact."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    bias = logit_bias(model)
    if not layers and bias is None:
        raise QwenliteError("the model has no LoRA layers or logit bias to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if bias is not None:
        with atomic_path(directory / LOGIT_BIAS_FILE) as tmp:
            save_file({LOGIT_BIAS_KEY: bias.detach().float().contiguous().cpu()}, str(tmp))
    if not layers:
        return directory
    first = next(iter(layers.values()))
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    tensors = {k: v.float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2))
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    config = read_json_object(path, "adapter config", CheckpointError)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} is not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    return config


def is_adapter_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a LoRA adapter, a logit bias, or both."""
    directory = Path(directory)
    return (directory / ADAPTER_CONFIG).is_file() or (directory / LOGIT_BIAS_FILE).is_file()


@torch.no_grad()
def scale_adapter(model: nn.Module, lam: float) -> nn.Module:
    """Scale what the adapter adds by ``lam``: every LoRA update ``W + BA`` becomes
    ``W + lam·BA`` (through the layers' scaling, before any merge) and the logit bias ``lam``
    times itself. ``lam`` 0 gives the base model, 1 the adapter as trained."""
    if lam < 0:
        raise QwenliteError(f"an adapter scale is >= 0, got {lam}")
    for layer in lora_layers(model).values():
        if layer.merged:
            raise QwenliteError("scale the adapter before merging it")
        layer.scaling *= lam
    bias = logit_bias(model)
    if bias is not None:
        bias.mul_(lam)
    return model


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Wrap ``model`` as the adapter's config says and load its weights (strictly), and its
    logit bias when the directory has one."""
    directory = Path(directory)
    if (directory / LOGIT_BIAS_FILE).is_file():
        load_logit_bias_into(model, directory / LOGIT_BIAS_FILE)
        if not (directory / ADAPTER_CONFIG).is_file():
            return model
    return _load_lora(model, directory)


def _load_lora(model: nn.Module, directory: Path) -> nn.Module:
    from safetensors import safe_open

    config = read_adapter_config(directory)
    targets = config["target_modules"]
    if isinstance(targets, str):
        targets = [targets]
    if not lora_layers(model):
        apply_lora(model, int(config["r"]), float(config["lora_alpha"]), targets)
    expected = lora_state_dict(model)
    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            found = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"no {ADAPTER_WEIGHTS} in {directory}") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    # PEFT may store keys with or without the adapter name (".default") infix.
    found = {k.replace(".default.weight", ".weight"): v for k, v in found.items()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(f"adapter {path} does not fit this model: {what}")
    with torch.no_grad():
        for key, target in expected.items():
            if tuple(found[key].shape) != tuple(target.shape):
                raise CheckpointError(f"adapter tensor {key} has shape {list(found[key].shape)}, "
                                      f"expected {list(target.shape)}")
            target.copy_(found[key].to(target.dtype))
    return model
