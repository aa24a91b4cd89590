"""Loading Stable Diffusion components from a local diffusers folder or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class SDComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def diffusers_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`from_pretrained`'s dtype argument under the name the installed diffusers takes: `dtype` from 0.40.0 (PR
    #14205), which deprecates `torch_dtype` with a FutureWarning; `torch_dtype` before (the floor is 0.34)."""
    from importlib.metadata import version

    from packaging.version import Version

    return {"dtype" if Version(version("diffusers")) >= Version("0.40.0") else "torch_dtype": dtype}


def check_model_path(path: str, flag: str = "--pretrained_model_name_or_path") -> None:
    """A local folder must look like a diffusers SD folder; anything else is taken as a hub id."""
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not (p / "model_index.json").is_file():
        raise ValueError(f"{flag} {path!r} is not a diffusers Stable Diffusion folder (no model_index.json)")


def load_components(path: str, revision: str | None = None, variant: str | None = None) -> SDComponents:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_path(path)
    kw = {"revision": revision}
    return SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
    )


def encode_prompts(tokenizer, text_encoder: torch.nn.Module, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden states for `prompts`, padded to the tokenizer's 77 tokens as SD does."""
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]
