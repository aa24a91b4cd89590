"""Loading Stable Diffusion components (SD 1.x/2.x and SDXL) from a local diffusers folder or a hub id."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class SDComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    # SDXL's second tokenizer and text encoder (CLIPTextModelWithProjection); None for SD 1.x/2.x
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    model_index: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by component name: `text_encoder` (and SDXL's `text_encoder_2`)."""
        return {"text_encoder": self.text_encoder, **({"text_encoder_2": self.text_encoder_2} if self.is_sdxl else {})}


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


def read_model_index(path: str, revision: str | None = None) -> dict:
    """The folder's (or hub repository's) model_index.json: which pipeline and components it holds."""
    local = Path(path) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(path, revision=revision))


def is_sdxl_index(index: dict) -> bool:
    """An SDXL pipeline: model_index.json names StableDiffusionXL…Pipeline, or it holds a `text_encoder_2`."""
    return str(index.get("_class_name", "")).startswith("StableDiffusionXL") or bool(
        (index.get("text_encoder_2") or [None])[0])


def check_vae_path(path: str, flag: str = "--pretrained_vae_model_name_or_path") -> None:
    """A local VAE folder must be a diffusers AutoencoderKL folder (config.json beside the weights)."""
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not (p / "config.json").is_file():
        raise ValueError(f"{flag} {path!r} is not a diffusers VAE folder (no config.json)")


def load_components(path: str, revision: str | None = None, variant: str | None = None,
                    vae_path: str | None = None) -> SDComponents:
    """The components of an SD 1.x/2.x or SDXL folder (SDXL adds `tokenizer_2` and `text_encoder_2`);
    `vae_path` replaces the model's VAE by another (a diffusers AutoencoderKL folder or hub id)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_path(path)
    index = read_model_index(path, revision)
    sdxl = is_sdxl_index(index)
    if sdxl and not (index.get("text_encoder") or [None])[0]:
        raise ValueError(f"--pretrained_model_name_or_path {path!r} has no text_encoder (an SDXL refiner?): "
                         "training needs both of SDXL base's text encoders")
    kw = {"revision": revision}
    vae = (AutoencoderKL.from_pretrained(vae_path) if vae_path else
           AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw))
    second = {}
    if sdxl:
        from transformers import CLIPTextModelWithProjection

        second = {"tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw),
                  "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                                variant=variant, **kw)}
    return SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw),
        vae=vae,
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw),
        # the training schedule: SDXL's Euler sampler shares SD's DDPM betas (diffusers' SDXL scripts do the same)
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        model_index=index, **second,
    )


def assemble_pipeline(sd: SDComponents, scheduler, models: dict | None = None):
    """A sampling pipeline of the kind the folder holds around the components already loaded (no second copy of
    the weights), `models` replacing components by name (the trained UNet and text encoders)."""
    import diffusers

    parts = {"vae": sd.vae, "unet": sd.unet, "tokenizer": sd.tokenizer, "scheduler": scheduler,
             **sd.text_encoders, **(models or {})}
    if sd.is_sdxl:
        return diffusers.StableDiffusionXLPipeline(
            **parts, tokenizer_2=sd.tokenizer_2,
            force_zeros_for_empty_prompt=sd.model_index.get("force_zeros_for_empty_prompt", True))
    return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)


def save_pipeline_fp32(pipe, folder) -> None:
    """`pipe.save_pretrained(folder)` with every model in fp32, moved to the CPU first (no GPU memory is added; the
    models are not used after). A folder of mixed dtypes does not load with a plain `from_pretrained`: diffusers
    loads the UNet in fp32 while transformers 5 keeps the encoders' saved bf16/fp16, and the first cross-attention
    fails on the dtype. diffusers' own full fine-tuning scripts save fp32 pipelines too; upcasting loses nothing."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.to("cpu", torch.float32)
    pipe.save_pretrained(folder)


def pipeline_class(path: str):
    """The diffusers pipeline class a folder's model_index.json names: SDXL's or Stable Diffusion's."""
    import diffusers

    if is_sdxl_index(read_model_index(path)):
        return diffusers.StableDiffusionXLPipeline
    return diffusers.StableDiffusionPipeline


def base_prediction_type(path: str, revision: str | None = None) -> str | None:
    """The prediction type of a model folder's (or hub id's) scheduler, None when it cannot be read."""
    from diffusers import DDPMScheduler

    try:
        return DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision).get("prediction_type")
    except (OSError, ValueError):
        return None


def encoder_device(model: torch.nn.Module) -> torch.device:
    """Where a text encoder's weights are: a DDP-wrapped encoder (several processes) has no `.device`."""
    return next(model.parameters()).device


def encode_prompts(tokenizer, text_encoder: torch.nn.Module, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden states for `prompts`, padded to the tokenizer's 77 tokens as SD does (with the tokenizer's
    own pad token: SD 2.x's pads with "!")."""
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(encoder_device(text_encoder)))[0]
