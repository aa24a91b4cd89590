"""A fingerprint of the base model an adapter was trained on, kept in its files' metadata (`base_fingerprint`), so
adapters meant to work together (`dreamlora.compose`) can be checked to share a base before anything is mixed.

What it holds: the number of adapted layers, and for up to `LAYERS` of them (spread over the sorted module paths)
the base weight's shape and `SAMPLES` of its values at evenly spaced flat positions. Two bases are the same when
every recorded layer exists with the same shape and the sampled values correlate at `SAME_BASE` or more. The rule
is deliberately loose: the same weights in another dtype (fp16, bf16) or a fine-tune of the same base (whose
weights moved a little) pass, while another base (other initial weights, another architecture) correlates near 0.
Shapes alone cannot tell two bases of one architecture apart (two SD 1.5 fine-tunes, two random tiny models).
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

LAYERS = 8
SAMPLES = 32
SAME_BASE = 0.9  # the correlation above which sampled weights come from one base


def _sample(weight: torch.Tensor) -> list[float]:
    flat = weight.detach().reshape(-1)
    positions = torch.linspace(0, flat.numel() - 1, min(SAMPLES, flat.numel())).round().long()
    return [float(f"{v:.5g}") for v in flat[positions.to(flat.device)].float().cpu().tolist()]


def _spread(paths: list[str], n: int = LAYERS) -> list[str]:
    if len(paths) <= n:
        return paths
    return [paths[round(i * (len(paths) - 1) / (n - 1))] for i in range(n)]


def fingerprint(bases: dict[str, nn.Module]) -> dict | None:
    """The fingerprint of the base layers `bases` (module path -> the base layer an adapter wraps); None when the
    weights are not in memory (a meta-device model)."""
    if any(b.weight.is_meta for b in bases.values()):
        return None
    layers = {path: {"shape": list(bases[path].weight.shape), "sample": _sample(bases[path].weight)}
              for path in _spread(sorted(bases))}
    return {"version": 1, "layers": len(bases), "sampled": layers}


def to_text(print_: dict | None) -> str | None:
    return None if print_ is None else json.dumps(print_, sort_keys=True)


def from_text(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) and value.get("version") == 1 else None


def _correlation(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    if va == 0.0 or vb == 0.0:
        return 1.0 if all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-6) for x, y in zip(a, b, strict=True)) else 0.0
    return cov / math.sqrt(va * vb)


def mismatch(recorded: dict, bases: dict[str, nn.Module]) -> str | None:
    """Why the base layers `bases` (path -> base layer) are not the base `recorded` was taken from; None when they
    are (or the weights are not in memory to tell)."""
    for path, entry in recorded.get("sampled", {}).items():
        if path not in bases:
            return f"the base has no layer {path!r}"
        weight = bases[path].weight
        if weight.is_meta:
            return None
        if list(weight.shape) != entry["shape"]:
            return f"layer {path!r} is {tuple(weight.shape)} here but {tuple(entry['shape'])} in the adapter's base"
        corr = _correlation(_sample(weight), entry["sample"])
        if corr < SAME_BASE:
            return (f"layer {path!r} holds other weights than the adapter's base (sampled weights correlate "
                    f"{corr:.2f} < {SAME_BASE})")
    return None
