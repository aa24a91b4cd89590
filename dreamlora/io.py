"""Saving and loading adapters as safetensors, never pickle.

- Native file: one adapter, keys `<module path>.<key>` with PEFT's names for LoRA/LoRA+/DoRA
  (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`) and `singlora_A` for SingLoRA, plus the
  method's persistent state (`AdapterLayer.state_keys`, fp32) when it keeps any; the header metadata holds
  the format, the method, the full config, the step (SingLoRA's ramp state), the name and the base's
  fingerprint (`dreamlora.fingerprint`, from 0.1 on: older files have none).
- LoRA export (`export_lora`): any method as plain PEFT LoRA keys, each layer at its factors' own rank with
  alpha = that rank (the scale is folded into B, so a reader that assumes alpha = r, as diffusers does without
  metadata, is still right). The method supplies the factors (`AdapterLayer.lora_factors`): SingLoRA becomes
  B' = s·u·A[:d_out], A' = A[:d_in]ᵀ, lossless. No file mixes key styles.
Writes are atomic: a temporary file in the same folder, then os.replace.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dreamlora import fingerprint
from dreamlora.config import AdapterConfig
from dreamlora.inject import adapter_layers, attach, attach_at, detach
from dreamlora.layer_kinds import file_key_spellings
from dreamlora.methods import METHODS

FORMAT = "dreamlora"
FORMAT_VERSION = "1"


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved adapter is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Native tensors of adapter `name` (parameters and the method's `state_keys`), keyed
    `<module path>.<file key>`."""
    out = {}
    for path, layer in adapter_layers(model, name).items():
        for key, tensor in layer.file_tensors().items():
            out[f"{path}.{key}"] = tensor.detach()
    return out


def _metadata(config: AdapterConfig, name: str, step: int, **extra: str) -> dict[str, str]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "method": config.method,
            "config": config.to_json(), "name": name, "step": str(step), **extra}


def base_fingerprint(model: nn.Module, name: str = "default") -> dict[str, str]:
    """`{"base_fingerprint": ...}` for a file's metadata: what the adapted base layers hold (`dreamlora.fingerprint`),
    so tools that combine adapters can tell whether they share a base. Empty for a model without weights in memory."""
    text = fingerprint.to_text(fingerprint.fingerprint(
        {path: layer.kind.base for path, layer in adapter_layers(model, name).items()}))
    return {} if text is None else {"base_fingerprint": text}


def base_mismatch(model: nn.Module, name: str, metadata: dict[str, str]) -> str | None:
    """Why the layers adapter `name` is attached to are not the base its file (`metadata`) was trained on; None when
    they are. A file without a fingerprint (written before it was recorded) passes: `load` checked its shapes."""
    recorded = fingerprint.from_text(metadata.get("base_fingerprint"))
    if recorded is None:
        return None
    bases = {path: layer.kind.base for path, layer in adapter_layers(model, name).items()}
    return fingerprint.mismatch(recorded, bases)


def save(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` to `path` (.safetensors). A method whose native keys are not LoRA's (SingLoRA)
    also gets its lossless LoRA export beside it, `<stem>.lora.safetensors`, unless the method cannot be written
    as plain LoRA (`unsupported_formats`). Returns the native path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter files are .safetensors; got {str(path)!r}")
    layers = adapter_layers(model, name)
    first = next(iter(layers.values()))
    atomic_save_file(adapter_state_dict(model, name), path,
                     _metadata(first.config, name, first.step, **base_fingerprint(model, name)))
    method = type(first)
    if set(method.file_keys.values()) - {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"} and (
            method.unsupported_reason("lora") is None) and _has_update(model, name):
        export_lora(model, path.with_suffix(".lora.safetensors"), name)
    return path


def _has_update(model: nn.Module, name: str) -> bool:
    """Whether some layer has a LoRA form of rank above 0 (an untrained AdaLoRA, E = 0, has none: nothing to export).
    The exact factors answer it: a truncation to the export rank never empties them, and needs no SVD here."""
    return any(layer.lora_factors() for layer in adapter_layers(model, name).values())


def lora_export_config(config: AdapterConfig, rank: int, dora: bool) -> AdapterConfig:
    """The config of the plain-LoRA export: the same targets, the file's common factor `rank` with alpha = rank
    (the scale is folded into B), DoRA when the factors carry magnitudes."""
    return AdapterConfig(method="dora" if dora else "lora", rank=rank, alpha=float(rank),
                         target_modules=config.target_modules, exclude_modules=config.exclude_modules)


def peft_lora_state_dict(model: nn.Module, name: str = "default") -> tuple[dict[str, torch.Tensor], dict]:
    """Adapter `name` as PEFT LoRA tensors (`<path>.lora_A.weight`, ...) and a PEFT LoraConfig dict. Each
    layer's rank is its factors' own (`AdapterLayer.lora_factors`): `r` is the most common one, and layers of
    another rank are listed in `rank_pattern` and `alpha_pattern` (alpha = rank, scale 1), as diffusers does."""
    layers = adapter_layers(model, name)
    method = type(next(iter(layers.values())))
    method.check_format("lora")
    # each layer at its export rank (`AdapterLayer.export_factors`); a layer pruned to rank 0 is left out
    factors = {path: f for path, layer in layers.items() if (f := layer.export_factors()[0])}
    if not factors:
        raise ValueError(f"adapter {name!r} has no layer of rank above 0 left to write")
    tensors = {f"{path}.{layers[path].kind.file_key(key)}": t for path, f in factors.items() for key, t in f.items()}
    ranks = {path: f["lora_A.weight"].shape[0] for path, f in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {path: rank for path, rank in sorted(ranks.items()) if rank != r}
    peft_config = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                   "target_modules": sorted(factors),
                   "use_dora": any("lora_magnitude_vector" in f for f in factors.values()),
                   "use_rslora": False, "lora_dropout": 0.0, "bias": "none"}
    return tensors, peft_config


def set_export_rank(model: nn.Module, rank: str | int | None, name: str = "default") -> None:
    """The rank of adapter `name` in the plain-LoRA files written after this (diffusers, PEFT, kohya): "exact",
    "auto" or an integer (`AdapterLayer.default_export_rank`); None restores the method's default."""
    from dreamlora.compress import parse_export_rank

    value = None if rank is None else parse_export_rank(rank)
    for layer in adapter_layers(model, name).values():
        layer.export_rank = value


def export_errors(model: nn.Module, name: str = "default") -> dict[str, float]:
    """The relative Frobenius error ‖ΔW − ΔW_file‖/‖ΔW‖ of each layer as the plain-LoRA files write it (0.0 where
    the file is exact), by module path."""
    return {path: layer.export_factors()[1] for path, layer in adapter_layers(model, name).items()}


def export_lora(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` as a plain PEFT-keyed LoRA (DoRA keeps its magnitudes). A method whose layers
    differ in factor rank gets a file that PEFT/diffusers read (`peft_config`'s `rank_pattern`) but
    `dreamlora.load` cannot (its config has one rank)."""
    tensors, peft_config = peft_lora_state_dict(model, name)
    first = next(iter(adapter_layers(model, name).values()))
    config = lora_export_config(first.config, peft_config["r"], peft_config["use_dora"])
    # `lora_adapter_metadata` is where diffusers (0.34+) reads a file's LoraConfig: with it, a layer whose rank
    # differs from the file's most common one keeps its own alpha (diffusers 0.34 guesses one alpha without it)
    meta = _metadata(config, name, first.step, exported_from=first.config.method, peft_config=json.dumps(peft_config),
                     lora_adapter_metadata=json.dumps(peft_config), **base_fingerprint(model, name))
    atomic_save_file(tensors, path, meta)
    return Path(path)


def _check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file before any parser sees it: never unpickle."""
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) == 9 and head[8:9] == b"{" and 0 < header_len <= size - 8:
        return  # a safetensors file: u64 header length, then a JSON header
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise ValueError(f"{str(path)!r} is a pickle/torch.save file; dreamlora only loads .safetensors "
                         "(it never unpickles: convert the file with a tool you trust)")
    raise ValueError(f"{str(path)!r} is not a safetensors file")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    _check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Attach the adapter stored at `path` (under `name`, default: the name it was saved with) and load
    its weights. Every key and shape is checked against the base; on any error the model is unchanged."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} has no dreamlora metadata (format={meta.get('format')!r}); "
                         "it was not written by dreamlora.save or export_lora")
    config = AdapterConfig.from_json(meta["config"])
    name = name or meta.get("name", "default")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    try:
        _attach_from_file(model, config, name, tensors)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot load {str(path)!r} into {type(model).__name__}: {e}") from None
    try:
        _assign(model, name, tensors, path)
        step = int(meta.get("step", "0"))
        for layer in adapter_layers(model, name).values():
            layer.step = step
    except BaseException:
        detach(model, name)
        for p in model.parameters():  # attach froze the base; a failed load must leave no trace
            p.requires_grad_(trainable.get(id(p), p.requires_grad))
        raise
    return model


def _attach_from_file(model: nn.Module, config: AdapterConfig, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """List patterns from a file are matched as `attach` matches them (string comparisons only). A regular
    expression from a file is never run: a file is untrusted input and Python's `re` can backtrack for hours on
    a crafted pattern. The file's own keys name the layers it adapts, so the adapter goes exactly there; the
    config keeps the regex as text, so the next `save` writes it back."""
    if not (isinstance(config.target_modules, str) or isinstance(config.exclude_modules, str)):
        attach(model, config, name)
        return
    suffixes = {s for key in METHODS[config.method].file_keys.values() for s in file_key_spellings(key)}
    paths = sorted({k[: -len(s) - 1] for k in tensors for s in suffixes if k.endswith("." + s)})
    if not paths:
        raise ValueError(f"it holds no {config.method} adapter tensors (keys ending in {sorted(suffixes)})")
    attach_at(model, config, name, paths)


def load_weights(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load a native file into adapter `name`, already attached with the same config (checkpoint resume)."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} has no dreamlora metadata; it was not written by dreamlora.save")
    saved, attached = AdapterConfig.from_json(meta["config"]), adapter_layers(model, name)
    current = next(iter(attached.values())).config
    if saved != current:
        raise ValueError(f"{str(path)!r} holds a {saved.method} adapter (rank {saved.rank}) but adapter {name!r} "
                         f"is {current.method} (rank {current.rank}) with other options")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    _assign(model, name, tensors, path)
    for layer in attached.values():
        layer.step = int(meta.get("step", "0"))
    return model


@torch.no_grad()
def _assign(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = {}
    for module_path, layer in adapter_layers(model, name).items():
        for key, tensor in layer.file_tensors().items():  # parameters and persistent method state
            expected[f"{module_path}.{key}"] = tensor
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{str(path)!r} does not fit this model (wrong base?): "
            f"{len(missing)} missing keys {_few(missing)}, {len(unexpected)} unexpected keys {_few(unexpected)}"
        )
    growing = {}  # key -> (layer, state attr): state that may take the file's shape (`AdapterLayer.resize_state`)
    for module_path, layer in adapter_layers(model, name).items():
        for attr, key in type(layer).state_keys.items():
            growing[f"{module_path}.{key}"] = (layer, attr)
    for key, param in expected.items():
        if tensors[key].shape != param.shape and not (key in growing and growing[key][0].resize_state(
                growing[key][1], tuple(tensors[key].shape))):
            raise ValueError(f"{str(path)!r}: {key} has shape {tuple(tensors[key].shape)} but this model's "
                             f"layer needs {tuple(param.shape)} (wrong base?)")
    for key, param in expected.items():
        if key in growing:  # a resized buffer is a new tensor: read it back from its layer
            param = getattr(growing[key][0], growing[key][1])
        param.copy_(tensors[key])


def _few(keys: list[str], n: int = 3) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"
