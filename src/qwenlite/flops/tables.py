"""Breakdown keys grouped by component, and the text tables of ``python -m qwenlite.flops``."""

from __future__ import annotations

import re

from qwenlite.model.counting import FlopCount

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_LORA_PARTS = ("lora_A", "lora_scale", "lora_B", "lora_add")


def _strip_phase(key: str) -> str:
    for phase in ("prefill.", "decode."):
        if key.startswith(phase):
            return key[len(phase):]
    return key


def component(key: str) -> tuple[str, int | None]:
    """Map a breakdown key to ``(component, layer index or None)``.

    ``model.layers.3.self_attn.q_proj.matmul`` -> ``("self_attn.q_proj", 3)``; a projection's
    LoRA parts go to ``<projection>.lora``, a norm's parts to the norm; ``model.norm.*`` ->
    ``final_norm``; ``lm_head.matmul`` -> ``lm_head``. A ``prefill.``/``decode.`` prefix is
    dropped.
    """
    key = _strip_phase(key)
    match = _LAYER_KEY.match(key)
    rest = match.group(2) if match else key
    path, _, leaf = rest.rpartition(".")
    if path == "model.norm":
        name = "final_norm"
    elif leaf in ("matmul", "bias"):
        name = path
    elif leaf in _LORA_PARTS:
        name = f"{path}.lora"
    elif path.endswith("layernorm"):
        name = path
    else:
        name = rest
    return name, int(match.group(1)) if match else None


def summarize(count: FlopCount) -> tuple[dict[str, int], dict[str, int], int]:
    """Group an itemized count by component.

    Returns:
        ``(components, per_layer, n_layers)``: every component's total (decoder-layer
        components summed over layers, in first-seen order), the first layer's share of each
        per-layer component (all layers cost the same in a forward), and the number of layers.
    """
    components: dict[str, int] = {}
    per_layer: dict[str, int] = {}
    layers = set()
    for key, value in count.items():
        name, layer = component(key)
        components[name] = components.get(name, 0) + int(value)
        if layer is not None:
            layers.add(layer)
            if layer == 0:
                per_layer[name] = per_layer.get(name, 0) + int(value)
    return components, per_layer, len(layers)


def fmt_count(n: int) -> str:
    return f"{n:,}"


def text_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def breakdown_table(count: FlopCount) -> str:
    """A readable per-component table: one layer, all layers, share of the total."""
    components, per_layer, n_layers = summarize(count)
    total = count.total() or 1
    rows = []
    for name, value in components.items():
        one = fmt_count(per_layer[name]) if name in per_layer else ""
        rows.append((name, one, fmt_count(value), f"{100 * value / total:.2f}%"))
    layer_sum = sum(per_layer.values())
    rows.append((f"one decoder layer (× {n_layers})", fmt_count(layer_sum),
                 fmt_count(sum(components[k] for k in per_layer)),
                 f"{100 * sum(components[k] for k in per_layer) / total:.2f}%"))
    rows.append(("total", "", fmt_count(count.total()), "100.00%"))
    return text_table(rows, ("component", "per layer", "all layers", "share"))
