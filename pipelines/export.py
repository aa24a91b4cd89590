"""Writing trained adapters for other tools: diffusers' pipeline LoRA file, the kohya file (kohya, LyCORIS,
A1111/Forge, ComfyUI) and, for DoRA, a ComfyUI file of its own.

All start from the core's lossless LoRA factors (alpha = r, scale folded into B), so SingLoRA goes out
as plain LoRA and DoRA keeps its magnitudes. Files are written under a temporary name and renamed.

Which tool reads which file (also recorded in run.json by `write_tool_files`):
- diffusers `pipe.load_lora_weights(run_dir)`: `pytorch_lora_weights.safetensors` (PEFT keys + LoraConfig metadata);
- kohya sd-scripts, LyCORIS, A1111/Forge and ComfyUI: `kohya_lora.safetensors` (`lora_unet_…`/`lora_te_…` keys);
- ComfyUI with DoRA: `comfyui_lora.safetensors`, the kohya file with `dora_scale` compensated for ComfyUI's rule.
  ComfyUI does not read PEFT-keyed attention weights (`…attn1.to_q.lora_A.weight`): it drops them with
  "lora key not loaded", so the diffusers file is never the one to give it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

import dreamlora
from dreamlora.io import atomic_save_file

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "kohya_lora.safetensors"
COMFYUI_WEIGHT_NAME = "comfyui_lora.safetensors"
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
# transformers 4's CLIPTextModel keeps every module under `text_model.`; transformers 5 drops that level.
CLIP_TEXT_LEVEL = "text_model."


def text_encoder_path(path: str) -> str:
    """A CLIP text-encoder module path in transformers 4's form (`text_model.encoder.layers.0…`), whichever
    transformers built the model: the form kohya names, A1111/ComfyUI/LyCORIS look up and every diffusers
    release reads (diffusers strips the level again on transformers 5)."""
    return CLIP_TEXT_LEVEL + path.removeprefix(CLIP_TEXT_LEVEL)


def has_adapter(model: nn.Module | None, name: str) -> bool:
    return model is not None and name in dreamlora.adapter_names(model)


def write_diffusers_lora(output_dir: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None,
                         name: str = "default") -> Path:
    """`pytorch_lora_weights.safetensors` as diffusers' own `save_lora_weights` writes it (PEFT keys under
    `unet.` / `text_encoder.`, LoraConfig metadata), so `pipe.load_lora_weights(output_dir)` reads it."""
    from diffusers import StableDiffusionPipeline

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet_layers, unet_meta = dreamlora.peft_lora_state_dict(unet, name)
    te_layers, te_meta = (_text_encoder_peft(text_encoder, name) if has_adapter(text_encoder, name)
                          else (None, None))
    # diffusers 0.34-0.3x index these LoraConfig fields unconditionally (KeyError 'rank_pattern' without them)
    unet_meta = {"rank_pattern": {}, "alpha_pattern": {}, **unet_meta}
    te_meta = te_meta and {"rank_pattern": {}, "alpha_pattern": {}, **te_meta}
    with tempfile.TemporaryDirectory(dir=out, prefix=".export.") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers={k: v.contiguous() for k, v in unet_layers.items()},
            text_encoder_lora_layers=te_layers and {k: v.contiguous() for k, v in te_layers.items()},
            unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=te_meta,
        )
        os.replace(Path(tmp) / DIFFUSERS_WEIGHT_NAME, out / DIFFUSERS_WEIGHT_NAME)
    return out / DIFFUSERS_WEIGHT_NAME


def _text_encoder_peft(text_encoder: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The text encoder's PEFT tensors and LoraConfig, the same whichever transformers built the model."""
    layers, meta = dreamlora.peft_lora_state_dict(text_encoder, name)
    # Keys in transformers 4's form (diffusers strips `text_model.` itself on transformers 5); target modules
    # without it, which PEFT matches as a suffix of the module names of both layouts.
    layers = {text_encoder_path(k): v for k, v in layers.items()}
    meta = {**meta, "target_modules": sorted(p.removeprefix(CLIP_TEXT_LEVEL) for p in meta["target_modules"])}
    # transformers' PEFT loader wants PEFT's own saved name for DoRA magnitudes (`lora_magnitude_vector.weight`);
    # without `.weight` it silently drops them. diffusers' UNet loader takes the bare name. Both checked by
    # loading back (tests/test_train.py).
    layers = {(k + ".weight" if k.endswith(".lora_magnitude_vector") else k): v for k, v in layers.items()}
    return layers, meta


def kohya_state_dict(model: nn.Module, component: str, name: str = "default") -> dict[str, torch.Tensor]:
    """`lora_unet_<path>.lora_down.weight` / `.lora_up.weight` / `.alpha` (= r); DoRA adds `.dora_scale`, the
    per-output-row magnitude shaped (d_out, 1[, 1, 1]): LyCORIS's `wd_on_output` form (its default since
    4.x), which LyCORIS and kohya merge exactly as PEFT does. ComfyUI reads it differently (`comfyui_state_dict`);
    A1111 normalises per input column and cannot express it (README)."""
    out = {}
    for path, layer in dreamlora.adapter_layers(model, name).items():
        if layer.kind.is_embedding:
            raise ValueError(f"{path}: embedding adapters have no kohya LoRA form")
        key = _kohya_key(component, path)
        factors = layer.lora_factors()
        out[f"{key}.lora_down.weight"] = factors["lora_A.weight"].contiguous()
        out[f"{key}.lora_up.weight"] = factors["lora_B.weight"].contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(layer.rank))
        if "lora_magnitude_vector" in factors:
            out[f"{key}.dora_scale"] = _per_row(factors["lora_magnitude_vector"], layer)
    return out


def _kohya_key(component: str, path: str) -> str:
    if component == "text_encoder":
        path = text_encoder_path(path)
    return f"{KOHYA_PREFIXES[component]}_{path.replace('.', '_')}"


def _per_row(vector: torch.Tensor, layer) -> torch.Tensor:
    """A per-output-row vector shaped (d_out, 1[, 1, 1]), always 2-D or more: ComfyUI broadcasts a 1-D
    `dora_scale` (N,) into an N×N outer product."""
    return vector.reshape(-1, *[1] * (layer.kind.base.weight.dim() - 1)).contiguous()


@torch.no_grad()
def comfyui_state_dict(model: nn.Module, component: str, name: str = "default") -> dict[str, torch.Tensor]:
    """The kohya tensors, with each DoRA `dora_scale` rewritten for ComfyUI (0.3.x).

    ComfyUI merges a per-row `dora_scale` as dora_scale·(W0+ΔW)/‖W0‖ — the norm of the *original* weight —
    where DoRA (PEFT, LyCORIS, dreamlora) divides by ‖W0+ΔW‖. Writing m·‖W0‖/‖W0+ΔW‖ per row makes ComfyUI's
    rule give DoRA's weight exactly. (Valid while ComfyUI keeps that rule; its open PR #15458 would change it.)
    Other methods have no `dora_scale`: the result equals `kohya_state_dict`."""
    out = kohya_state_dict(model, component, name)
    for path, layer in dreamlora.adapter_layers(model, name).items():
        key = f"{_kohya_key(component, path)}.dora_scale"
        if key not in out:
            continue
        w0 = layer.kind.weight_matrix().float()  # (d_out, d_in)
        factors = layer.lora_factors()
        delta = layer.kind.up_matrix(factors["lora_B.weight"]) @ layer.kind.down_matrix(factors["lora_A.weight"])
        magnitude = factors["lora_magnitude_vector"].reshape(-1).float()
        out[key] = _per_row(magnitude * w0.norm(dim=1) / (w0 + delta).norm(dim=1), layer)
    return out


def _tool_tensors(unet: nn.Module, text_encoder: nn.Module | None, name: str, builder) -> dict[str, torch.Tensor]:
    tensors = builder(unet, "unet", name)
    if has_adapter(text_encoder, name):
        tensors.update(builder(text_encoder, "text_encoder", name))
    return tensors


def _kohya_metadata(unet: nn.Module, name: str, **extra: str) -> dict[str, str]:
    config = dreamlora.adapter_config(unet, name)
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
            "ss_network_alpha": str(config.rank), "dreamlora_method": config.method, **extra}


def write_kohya_lora(output_dir: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None,
                     name: str = "default") -> Path:
    path = Path(output_dir) / KOHYA_WEIGHT_NAME
    atomic_save_file(_tool_tensors(unet, text_encoder, name, kohya_state_dict), path, _kohya_metadata(unet, name))
    return path


def write_comfyui_lora(output_dir: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None,
                       name: str = "default") -> Path:
    """`comfyui_lora.safetensors`: the kohya file with ComfyUI's DoRA compensation (`comfyui_state_dict`)."""
    path = Path(output_dir) / COMFYUI_WEIGHT_NAME
    meta = _kohya_metadata(unet, name, dreamlora_target="ComfyUI 0.3.x (dora_scale compensated for its DoRA rule)")
    atomic_save_file(_tool_tensors(unet, text_encoder, name, comfyui_state_dict), path, meta)
    return path


def write_tool_files(output_dir: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None,
                     name: str = "default", kohya: bool = True) -> dict[str, str | None]:
    """Write the diffusers file and (unless `kohya` is False) the kohya file, plus the ComfyUI file for DoRA.
    Returns which file each tool reads (file names in `output_dir`; None: no file that tool reads right)."""
    write_diffusers_lora(output_dir, unet, text_encoder, name)
    files: dict[str, str | None] = {"diffusers": DIFFUSERS_WEIGHT_NAME, "kohya": None, "lycoris": None,
                                    "comfyui": None, "a1111": None}
    if not kohya:
        return files
    write_kohya_lora(output_dir, unet, text_encoder, name)
    is_dora = dreamlora.adapter_config(unet, name).method == "dora"
    comfy = write_comfyui_lora(output_dir, unet, text_encoder, name).name if is_dora else KOHYA_WEIGHT_NAME
    files.update(kohya=KOHYA_WEIGHT_NAME, lycoris=KOHYA_WEIGHT_NAME, comfyui=comfy,
                 a1111=None if is_dora else KOHYA_WEIGHT_NAME)  # A1111 cannot express per-row DoRA (README)
    return files
