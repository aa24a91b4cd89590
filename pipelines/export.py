"""Writing trained adapters for other tools: diffusers' pipeline LoRA file and the kohya/A1111 format.

Both start from the core's lossless LoRA factors (alpha = r, scale folded into B), so SingLoRA goes out
as plain LoRA and DoRA keeps its magnitudes. Files are written under a temporary name and renamed.
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
# kohya names SD 1.x text-encoder modules from transformers 4's CLIPTextModel, which had a `text_model.` level.
KOHYA_PREFIXES = {"unet": ("lora_unet", ""), "text_encoder": ("lora_te", "text_model.")}


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
    te_layers, te_meta = (dreamlora.peft_lora_state_dict(text_encoder, name) if has_adapter(text_encoder, name)
                          else (None, None))
    if te_layers:
        # The text encoder goes through transformers' PEFT loader, which wants PEFT's own saved name for DoRA
        # magnitudes (`lora_magnitude_vector.weight`); without `.weight` it silently drops them. diffusers'
        # UNet loader takes the bare name. Both checked by loading back (tests/test_train.py).
        te_layers = {(k + ".weight" if k.endswith(".lora_magnitude_vector") else k): v for k, v in te_layers.items()}
    with tempfile.TemporaryDirectory(dir=out, prefix=".export.") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers={k: v.contiguous() for k, v in unet_layers.items()},
            text_encoder_lora_layers=te_layers and {k: v.contiguous() for k, v in te_layers.items()},
            unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=te_meta,
        )
        os.replace(Path(tmp) / DIFFUSERS_WEIGHT_NAME, out / DIFFUSERS_WEIGHT_NAME)
    return out / DIFFUSERS_WEIGHT_NAME


def kohya_state_dict(model: nn.Module, component: str, name: str = "default") -> dict[str, torch.Tensor]:
    """`lora_unet_<path>.lora_down.weight` / `.lora_up.weight` / `.alpha` (= r); DoRA adds `.dora_scale`, the
    per-output magnitude shaped (d_out, 1[, 1, 1]) as LyCORIS stores it for output-side decomposition."""
    prefix, inner = KOHYA_PREFIXES[component]
    out = {}
    for path, layer in dreamlora.adapter_layers(model, name).items():
        key = f"{prefix}_{(inner + path).replace('.', '_')}"
        factors = layer.lora_factors()
        if layer.kind.is_embedding:
            raise ValueError(f"{path}: embedding adapters have no kohya LoRA form")
        out[f"{key}.lora_down.weight"] = factors["lora_A.weight"]
        out[f"{key}.lora_up.weight"] = factors["lora_B.weight"]
        out[f"{key}.alpha"] = torch.tensor(float(layer.rank))
        if "lora_magnitude_vector" in factors:
            weight_dims = layer.kind.base.weight.dim()
            out[f"{key}.dora_scale"] = factors["lora_magnitude_vector"].reshape(-1, *[1] * (weight_dims - 1))
    return out


def write_kohya_lora(output_dir: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None,
                     name: str = "default") -> Path:
    tensors = kohya_state_dict(unet, "unet", name)
    if has_adapter(text_encoder, name):
        tensors.update(kohya_state_dict(text_encoder, "text_encoder", name))
    config = dreamlora.adapter_config(unet, name)
    path = Path(output_dir) / KOHYA_WEIGHT_NAME
    atomic_save_file(tensors, path, {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
                                     "ss_network_alpha": str(config.rank), "dreamlora_method": config.method})
    return path
