"""Attaching adapters to any torch module: finding targets, wrapping them, and managing named adapters.

A matched layer is replaced by a `LayerWithAdapters` host that keeps the original as `base_layer` (PEFT's
layout, so module paths in files read the same) and runs its active adapters after it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from dreamlora.config import AdapterConfig
from dreamlora.layer_kinds import UnsupportedLayer, kind_of
from dreamlora.methods import METHODS, AdapterLayer

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class LayerWithAdapters(nn.Module):
    """A base layer plus named adapters; y = base(x), then each active adapter in attach order."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self._active: list[AdapterLayer] = []  # cached so forward does not walk the ModuleDict

    def refresh(self) -> None:
        self._active = [a for a in self.adapters.values() if a.enabled]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        for adapter in self._active:
            y = adapter(x, y)
        return y

    def __getattr__(self, name: str):
        # Code that reads `attn.to_q.weight` or `.in_features` keeps working on the wrapped layer. Private names
        # are not passed through: hooks that libraries keep on a module (accelerate's `_hf_hook`, `_old_forward`)
        # belong to the base layer alone, and the host answering for them made accelerate detach the base's
        # offload hook from the host ("LayerWithAdapters does not have a parameter named weight").
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("base_layer", "adapters"):
                raise
            return getattr(self._modules["base_layer"], name)


def _matches(name: str, patterns: list[str] | str) -> str | None:
    """The pattern that selects `name` under PEFT's rules, or None."""
    if isinstance(patterns, str):
        return patterns if re.fullmatch(patterns, name) else None
    for p in patterns:
        if name == p or name.endswith("." + p):
            return p
    return None


def _logical_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules(), but a host counts as the layer it wraps and its insides are not listed."""
    for child_name, child in model.named_children():
        path = f"{prefix}{child_name}"
        yield path, child
        if not isinstance(child, LayerWithAdapters):
            yield from _logical_modules(child, path + ".")


def hosts(model: nn.Module) -> Iterator[tuple[str, LayerWithAdapters]]:
    for path, module in _logical_modules(model):
        if isinstance(module, LayerWithAdapters):
            yield path, module


# Training hooks ask for a model's adapters every step; walking a UNet's ~1,000 modules each time cost ~10% of a
# tiny-model step. So the (name -> path -> layer) index is cached on the model and rebuilt whenever attach,
# detach or merge has run anywhere since (a global generation counter), which keeps nested models right too.
_INDEX_ATTR = "_dreamlora_index"
_generation = 0


def _changed() -> None:
    global _generation
    _generation += 1


def _index(model: nn.Module) -> dict[str, dict[str, AdapterLayer]]:
    cached = model.__dict__.get(_INDEX_ATTR)
    if cached is not None and cached[0] == _generation:
        return cached[1]
    index: dict[str, dict[str, AdapterLayer]] = {}
    for path, host in hosts(model):
        for name, layer in host.adapters.items():
            index.setdefault(name, {})[path] = layer
    model.__dict__[_INDEX_ATTR] = (_generation, index)
    return index


def adapter_layers(model: nn.Module, name: str) -> dict[str, AdapterLayer]:
    """Module path -> the adapter layer of adapter `name`."""
    layers = _index(model).get(name)
    if not layers:
        known = ", ".join(adapter_names(model)) or "none"
        raise KeyError(f"no adapter named {name!r} on this model (attached: {known})")
    return dict(layers)


def adapter_names(model: nn.Module) -> list[str]:
    return list(_index(model))


def adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    return next(iter(adapter_layers(model, name).values())).config


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def find_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """Module path -> base layer for every module the config selects; errors name the culprit."""
    targets: dict[str, nn.Module] = {}
    for path, module in _logical_modules(model):
        pattern = _matches(path, config.target_modules)
        if pattern is None or _matches(path, config.exclude_modules):
            continue
        base = module.base_layer if isinstance(module, LayerWithAdapters) else module
        try:
            kind_of(base)
        except UnsupportedLayer as e:
            raise TypeError(
                f"target_modules pattern {pattern!r} matched {path!r} ({type(base).__name__}): {e}"
            ) from None
        targets[path] = base
    if not targets:
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of {type(model).__name__}; "
            f"some module names: {_sample_names(model)}"
        )
    return targets


def _sample_names(model: nn.Module, limit: int = 8) -> str:
    leaves = [p for p, m in _logical_modules(model) if not list(m.children()) or isinstance(m, LayerWithAdapters)]
    shown = ", ".join(leaves[:limit])
    return shown + (", ..." if len(leaves) > limit else "") if shown else "(none)"


def attach(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Attach adapter `name` to every layer `config` selects, freeze the base, and return `model`.

    Nothing changes on the model if any matched layer is refused (bad rank, unsupported type)."""
    _check_new_name(model, name)
    return _attach_layers(model, config, name, find_targets(model, config))


def attach_at(model: nn.Module, config: AdapterConfig, name: str, paths: Iterable[str]) -> nn.Module:
    """`attach` at exactly the module `paths`, without evaluating `config`'s patterns. `load` uses it for a
    file whose patterns are regular expressions: a pattern read from a file is never run, the file's own keys
    name the layers."""
    _check_new_name(model, name)
    return _attach_layers(model, config, name, exact_targets(model, paths))


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name {name!r} must be an identifier (letters, digits, _ and -)")
    if hasattr(nn.ModuleDict(), name):  # ModuleDict refuses such keys, and only after the hosts were installed
        raise ValueError(f"adapter name {name!r} is the name of an nn.ModuleDict attribute; pick another name")
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} is already attached; detach it or pick another name")


def exact_targets(model: nn.Module, paths: Iterable[str]) -> dict[str, nn.Module]:
    """Module path -> base layer for exactly `paths` (logical paths: a host counts as the layer it wraps)."""
    logical = dict(_logical_modules(model))
    targets: dict[str, nn.Module] = {}
    for path in paths:
        if path not in logical:
            raise ValueError(f"{type(model).__name__} has no module {path!r}; some module names: "
                             f"{_sample_names(model)}")
        module = logical[path]
        base = module.base_layer if isinstance(module, LayerWithAdapters) else module
        try:
            kind_of(base)
        except UnsupportedLayer as e:
            raise TypeError(f"module {path!r} ({type(base).__name__}): {e}") from None
        targets[path] = base
    if not targets:
        raise ValueError("no module paths given")
    return targets


def _attach_layers(model: nn.Module, config: AdapterConfig, name: str, targets: dict[str, nn.Module]) -> nn.Module:
    method = METHODS[config.method]
    new_layers: dict[str, AdapterLayer] = {}
    for path, base in targets.items():
        kind = kind_of(base)
        if config.rank > min(kind.d_in, kind.d_out):
            raise ValueError(
                f"AdapterConfig.rank={config.rank} exceeds what {path!r} allows: "
                f"min(d_in={kind.d_in}, d_out={kind.d_out}) = {min(kind.d_in, kind.d_out)}"
            )
        new_layers[path] = method(kind, config)

    adapter_params = {id(p) for _, h in hosts(model) for p in h.adapters.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)
    for path, layer in new_layers.items():
        host = model.get_submodule(path)
        if not isinstance(host, LayerWithAdapters):
            host = LayerWithAdapters(host)
            _set_module(model, path, host)
        host.adapters[name] = layer
        host.refresh()
    _changed()
    return model


def _settle(model: nn.Module, path: str, host: LayerWithAdapters) -> None:
    """After adapters were removed from `host`: give the layer its original module back if none is left."""
    if len(host.adapters) == 0:
        _set_module(model, path, host.base_layer)
    else:
        host.refresh()


def detach(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter `name`; layers left with no adapter get their original module back."""
    for path in adapter_layers(model, name):
        host = model.get_submodule(path)
        del host.adapters[name]
        _settle(model, path, host)
    _changed()
    return model


def set_enabled(model: nn.Module, name: str, enabled: bool) -> None:
    for path, layer in adapter_layers(model, name).items():
        layer.enabled = enabled
        model.get_submodule(path).refresh()


def enable(model: nn.Module, name: str) -> None:
    set_enabled(model, name, True)


def disable(model: nn.Module, name: str) -> None:
    set_enabled(model, name, False)


def set_scale(model: nn.Module, name: str, scale: float) -> None:
    """Multiply adapter `name`'s update by `scale` (1.0 is as trained; 0.0 keeps DoRA's magnitude rescale)."""
    for layer in adapter_layers(model, name).values():
        layer.multiplier = float(scale)


@torch.no_grad()
def merge(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Fold adapters (default: every enabled one) into the base weights, one way, in attach order.

    The sum is taken in fp32 and rounded once to the base dtype. Merged adapters are removed; layers left
    with none get their original module back, so a fully merged model has no dreamlora code in its path."""
    wanted = None if names is None else set(names)
    if wanted is not None:
        missing = wanted - set(adapter_names(model))
        if missing:
            raise KeyError(f"cannot merge unknown adapters {sorted(missing)}")
    for path, host in list(hosts(model)):
        chosen = [(n, layer) for n, layer in host.adapters.items()
                  if (layer.enabled if wanted is None else n in wanted)]
        if chosen:
            kind = chosen[0][1].kind
            w = kind.weight_matrix().float()
            for _, layer in chosen:  # chained in fp32: rounding after each adapter would round k times
                w = layer.merge_into(w)
            weight = host.base_layer.weight
            weight.copy_(kind.weight_from_matrix(w).to(weight.dtype))
            for n, _ in chosen:
                del host.adapters[n]
            for other in host.adapters.values():
                other.base_weight_changed()
        _settle(model, path, host)
    _changed()
    return model
