"""Composing trained adapters into one with weights w (LoRAHub: Huang et al., COLM 2024), by either rule of `RULES`:

- "factors", LoRAHub's own: per layer Â = Σ wᵢ·Aᵢ and B̂ = Σ wᵢ·Bᵢ over the adapters' plain-LoRA factors (the scale
  folded into B, alpha = rank, as `lora_factors()` and the LoRA export write them). The update B̂Â has cross terms
  wᵢwⱼ·BᵢAⱼ, so it is not a sum of updates, and it needs every adapter on the same layers with the same factor rank.
- "updates": ΔŴ = Σ wᵢ·ΔWᵢ exactly, as concatenated factors Â = [A₁; …; A_k], B̂ = [w₁B₁ | … | w_kB_k] of rank Σrᵢ,
  never a d_out×d_in matrix. Any ranks and layers (a layer an adapter lacks gets nothing from it). Where Σrᵢ exceeds
  min(d_in, d_out) the update is re-factored exactly at that rank (`compress.spectrum`: its rank cannot be higher).

The result is a plain LoRA adapter (alpha = its rank: scale 1) attached to the model. `Composition.set_weights(w)`
writes the mixed factors into it in place, so a search tries candidates without copying the model, and the
composed adapter saves, exports and loads like a trained one. Which methods may be mixed, and by which rule, each
method says (`AdapterLayer.composition`): DoRA is refused, ReLoRA is taken by its exact accumulated update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dreamlora import compress
from dreamlora.config import AdapterConfig
from dreamlora.inject import adapter_layers, attach_at, exact_targets
from dreamlora.layer_kinds import kind_of
from dreamlora.methods import METHODS

RULES = {"factors": "LoRAHub's rule: Â = Σ wᵢ·Aᵢ, B̂ = Σ wᵢ·Bᵢ (same layers and ranks; cross terms wᵢwⱼ·BᵢAⱼ)",
         "updates": "the exact mixture ΔŴ = Σ wᵢ·ΔWᵢ, as concatenated factors of rank Σrᵢ"}

# path -> (A, B): one adapter's plain-LoRA factors per layer, in the layer kind's shapes, scale folded into B
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class CompositionError(ValueError):
    """Adapters that cannot be composed as asked; the message names the adapter."""


def check_method(method: str, rule: str, label: str) -> str | None:
    """Raise `CompositionError` when adapter `label` (a `method` adapter) cannot be composed by `rule`; return a note
    when it is composed in a way worth saying (ReLoRA: from its materialised update), else None."""
    if rule not in RULES:
        raise CompositionError(f"unknown composition rule {rule!r}; known: {', '.join(RULES)}")
    cls = METHODS[method]
    reason = cls.unsupported_reason("lora")
    if reason is not None:
        raise CompositionError(f"{label}: a {method} adapter has no exact LoRA factors ({reason}), which composition "
                               "mixes")
    if cls.composition is None:
        raise CompositionError(f"{label}: {method} adapters cannot be composed: {cls.composition_note}")
    if cls.composition == "updates" and rule == "factors":
        raise CompositionError(f"{label}: the 'factors' rule mixes trained B·A pairs, and {cls.composition_note}; "
                               "compose it with the 'updates' rule")
    if cls.composition == "updates":
        return cls.composition_note or None
    return None


def adapter_factors(model: nn.Module, name: str) -> Factors:
    """Adapter `name`'s exact plain-LoRA factors per layer (fp32; a layer pruned to rank 0 is left out). The user's
    scale (`set_scale`) is not in them."""
    out = {}
    for path, layer in adapter_layers(model, name).items():
        factors = layer.lora_factors()
        if factors:
            out[path] = (factors["lora_A.weight"].detach().float(), factors["lora_B.weight"].detach().float())
    return out


def check_factors_rule(library: Mapping[str, Factors]) -> None:
    """The factor rule's precondition: every adapter on the same layers with the same factor rank per layer."""
    labels = list(library)
    first = library[labels[0]]
    for label in labels[1:]:
        other = library[label]
        if set(other) != set(first):
            only = sorted(set(other) ^ set(first))
            raise CompositionError(
                f"the 'factors' rule needs the same adapted layers in every adapter, and {label} and {labels[0]} "
                f"differ on {len(only)} layers (e.g. {only[0]!r}); compose them with the 'updates' rule")
        for path, (down, _) in other.items():
            if down.shape != first[path][0].shape:
                raise CompositionError(
                    f"the 'factors' rule needs equal factor ranks, and {path!r} has rank {down.shape[0]} in {label} "
                    f"but {first[path][0].shape[0]} in {labels[0]}; compose them with the 'updates' rule")


def mix(library: Sequence[Factors], weights: Sequence[float], rule: str, path: str) -> tuple[torch.Tensor, ...]:
    """The composed (A, B) of layer `path` under `rule`."""
    parts = [(float(w), f[path]) for w, f in zip(weights, library, strict=True) if path in f]
    if rule == "factors":
        down = sum(w * a for w, (a, _) in parts)
        up = sum(w * b for w, (_, b) in parts)
        return down, up
    return torch.cat([a for _, (a, _) in parts], 0), torch.cat([w * b for w, (_, b) in parts], 1)


class Composition:
    """A plain LoRA adapter `name` on `model` holding the mix of `library` (label -> `Factors`, in the order of the
    weights; the labels name adapters in errors) under `rule`; `set_weights` rewrites it in place.

    Its rank is the largest a layer needs (Σrᵢ under "updates", at most min(d_in, d_out) of that layer), zero-padded
    where a layer needs less. One adapter has one rank, so a layer needing more than min(d_in, d_out) of the
    smallest layer can only get the best approximation at that rank: `truncated` lists such layers, and
    `set_weights` returns their relative error (an empty dict: the composition is exact)."""

    def __init__(self, model: nn.Module, library: Mapping[str, Factors], rule: str, name: str = "composed"):
        if rule not in RULES:
            raise CompositionError(f"unknown composition rule {rule!r}; known: {', '.join(RULES)}")
        if not library:
            raise CompositionError("nothing to compose: no adapters given")
        if rule == "factors":
            check_factors_rule(library)
        self.rule, self.library = rule, list(library.values())
        paths = sorted(set().union(*self.library))
        if not paths:
            raise CompositionError("the adapters have no layer with an update to compose")
        kinds = {path: kind_of(base) for path, base in exact_targets(model, paths).items()}
        needed = {p: sum(f[p][0].shape[0] for f in self.library if p in f) if rule == "updates"
                  else self.library[0][p][0].shape[0] for p in paths}
        exact = {p: min(needed[p], kinds[p].d_in, kinds[p].d_out) for p in paths}
        limit = min(min(k.d_in, k.d_out) for k in kinds.values())
        self.rank = min(max(exact.values()), limit)
        self.truncated = sorted(p for p in paths if exact[p] > self.rank)
        config = AdapterConfig(method="lora", rank=self.rank, alpha=float(self.rank), target_modules=paths)
        attach_at(model, config, name, paths)
        self.layers = adapter_layers(model, name)

    @torch.no_grad()
    def set_weights(self, weights: Sequence[float]) -> dict[str, float]:
        """Write the mix with `weights` (one per adapter, in `labels` order) into the composed adapter. Returns the
        relative Frobenius error of each layer that could not be held exactly (see the class docstring)."""
        if len(weights) != len(self.library):
            raise ValueError(f"{len(weights)} weights for {len(self.library)} adapters")
        errors = {}
        for path, layer in self.layers.items():
            down, up = mix(self.library, weights, self.rule, path)
            if down.shape[0] > self.rank:  # exact re-factoring below Σrᵢ (or the best one at self.rank)
                down, up, error = compress.refactor(layer.kind, down, up, self.rank)
                if error > 0.0 and path in self.truncated:
                    errors[path] = error
            rank = down.shape[0]
            layer.lora_A.zero_()[:rank].copy_(down)
            layer.lora_B.zero_()[:, :rank].copy_(up)
        return errors

