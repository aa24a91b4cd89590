"""Writing trained adapters for other tools: diffusers' pipeline LoRA file, the kohya file (kohya, LyCORIS,
A1111/Forge, ComfyUI) and, for DoRA, a ComfyUI file of its own.

Each writer asks the method (`AdapterLayer.lora_factors`, `kohya_tensors`, `unsupported_formats`) and assumes
no shape of its own: rank and alpha are each layer's. So SingLoRA goes out as plain LoRA, DoRA keeps its
magnitudes, and a method that cannot be written in a format gets that file skipped with its reason. Files are
written under a temporary name and renamed.

Which tool reads which file (also recorded in run.json by `write_tool_files`):
- diffusers `pipe.load_lora_weights(run_dir)`: `pytorch_lora_weights.safetensors` (PEFT keys + LoraConfig metadata);
- kohya sd-scripts, LyCORIS, A1111/Forge and ComfyUI: `kohya_lora.safetensors` (`lora_unet_…`/`lora_te_…` keys;
  for SDXL kohya's own names: the UNet's original LDM paths and `lora_te1_…`/`lora_te2_…`, see `kohya_names`);
- ComfyUI with DoRA: `comfyui_lora.safetensors`, the kohya file with `dora_scale` compensated for ComfyUI's rule.
  ComfyUI does not read PEFT-keyed attention weights (`…attn1.to_q.lora_A.weight`): it drops them with
  "lora key not loaded", so the diffusers file is never the one to give it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import dreamlora
from dreamlora.io import atomic_save_file
from dreamlora.methods.base import ExportUnsupported, per_row
from pipelines.diffusion.kohya_names import (
    SDXL_BASE_MODEL_VERSION,
    SDXL_PREFIXES,
    is_sd2_layout,
    is_sdxl_layout,
    kohya_sdxl_unet_key,
    sd2_header,
)

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
    if path.split(".")[0] == "text_projection":  # CLIPTextModelWithProjection's, beside `text_model`, not in it
        return path
    return CLIP_TEXT_LEVEL + path.removeprefix(CLIP_TEXT_LEVEL)


def has_adapter(model: nn.Module | None, name: str) -> bool:
    return model is not None and name in dreamlora.adapter_names(model)


def write_diffusers_lora(output_dir: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None,
                         name: str = "default", text_encoder_2: nn.Module | None = None) -> Path:
    """`pytorch_lora_weights.safetensors` as diffusers' own `save_lora_weights` writes it (PEFT keys under
    `unet.` / `text_encoder.` / SDXL's `text_encoder_2.`, LoraConfig metadata with each layer's rank), so
    `pipe.load_lora_weights(output_dir)` reads it. Raises `ExportUnsupported` for a method that cannot be written
    as plain LoRA."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet_layers, unet_meta = dreamlora.peft_lora_state_dict(unet, name)
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    kwargs = {}
    for component, model in encoders.items():
        if has_adapter(model, name):
            layers, meta = _text_encoder_peft(model, name)
            kwargs.update({f"{component}_lora_layers": {k: v.contiguous() for k, v in layers.items()},
                           f"{component}_lora_adapter_metadata": meta})
    # SDXL's saver for a second encoder (the same file layout otherwise). `rank_pattern`/`alpha_pattern` are always
    # present, if empty: diffusers 0.34-0.3x index these LoraConfig fields unconditionally (KeyError without them)
    saver = StableDiffusionXLPipeline if "text_encoder_2_lora_layers" in kwargs else StableDiffusionPipeline
    with tempfile.TemporaryDirectory(dir=out, prefix=".export.") as tmp:
        saver.save_lora_weights(tmp, unet_lora_layers={k: v.contiguous() for k, v in unet_layers.items()},
                                unet_lora_adapter_metadata=unet_meta, **kwargs)
        os.replace(Path(tmp) / DIFFUSERS_WEIGHT_NAME, out / DIFFUSERS_WEIGHT_NAME)
    return out / DIFFUSERS_WEIGHT_NAME


def _text_encoder_peft(text_encoder: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The text encoder's PEFT tensors and LoraConfig, the same whichever transformers built the model."""
    layers, meta = dreamlora.peft_lora_state_dict(text_encoder, name)
    # Keys in transformers 4's form (diffusers strips `text_model.` itself on transformers 5); target modules
    # without it, which PEFT matches as a suffix of the module names of both layouts.
    layers = {text_encoder_path(k): v for k, v in layers.items()}
    # rank/alpha patterns the same way: PEFT matches their keys as suffixes too.
    meta = {**meta, "target_modules": sorted(p.removeprefix(CLIP_TEXT_LEVEL) for p in meta["target_modules"]),
            **{k: {p.removeprefix(CLIP_TEXT_LEVEL): v for p, v in meta[k].items()}
               for k in ("rank_pattern", "alpha_pattern")}}
    # transformers' PEFT loader wants PEFT's own saved name for DoRA magnitudes (`lora_magnitude_vector.weight`);
    # without `.weight` it silently drops them. diffusers' UNet loader takes the bare name. Both checked by
    # loading back (tests/test_train.py).
    layers = {(k + ".weight" if k.endswith(".lora_magnitude_vector") else k): v for k, v in layers.items()}
    return layers, meta


def kohya_state_dict(model: nn.Module, component: str, name: str = "default",
                     sdxl: bool | None = None) -> dict[str, torch.Tensor]:
    """`lora_unet_<path>.<suffix>` for each layer, the suffixes and tensors being the method's own
    (`AdapterLayer.kohya_tensors`), each with its own `.alpha`: for LoRA-shaped methods `lora_down`/`lora_up`
    at the layer's own rank and `alpha` (= the `rank` option, `lora_up` rescaled to match); DoRA adds
    `.dora_scale`, the per-output-row magnitude shaped (d_out, 1[, 1, 1]): LyCORIS's `wd_on_output` form (its
    default since 4.x), which LyCORIS and kohya merge exactly as PEFT does. ComfyUI reads it differently
    (`comfyui_state_dict`); A1111 normalises per input column and cannot express it (README). Raises
    `ExportUnsupported` for a method that has no kohya form.

    `component`: "unet", "text_encoder" or (SDXL) "text_encoder_2". `sdxl`: name the layers as kohya does for SDXL
    (`kohya_names`: LDM paths for the UNet, `lora_te1_`/`lora_te2_`); None decides from the model: a UNet by its
    config (`addition_embed_type="text_time"`), the second text encoder always, the first never (the writers pass
    the UNet's answer for both encoders)."""
    sdxl = _sdxl_names(model, component) if sdxl is None else sdxl
    out = {}
    for path, layer in dreamlora.adapter_layers(model, name).items():
        type(layer).check_format("kohya")
        if layer.kind.is_embedding:
            raise ValueError(f"{path}: embedding adapters have no kohya LoRA form")
        key = _kohya_key(component, path, sdxl, model)
        out.update({f"{key}.{suffix}": t for suffix, t in layer.kohya_tensors().items()})
    return out


def _sdxl_names(model: nn.Module, component: str) -> bool:
    return component == "text_encoder_2" or (component == "unet" and is_sdxl_layout(getattr(model, "config", None)))


def _kohya_key(component: str, path: str, sdxl: bool, model: nn.Module) -> str:
    if component == "unet" and sdxl:
        return kohya_sdxl_unet_key(path, model.config)
    if component != "unet":
        path = text_encoder_path(path)
    prefixes = SDXL_PREFIXES if sdxl else KOHYA_PREFIXES
    if component not in prefixes:
        raise ValueError(f"{component}: only SDXL has a second text encoder (lora_te2_)")
    return f"{prefixes[component]}_{path.replace('.', '_')}"


@torch.no_grad()
def comfyui_state_dict(model: nn.Module, component: str, name: str = "default",
                       sdxl: bool | None = None) -> dict[str, torch.Tensor]:
    """The kohya tensors, with each DoRA `dora_scale` rewritten for ComfyUI (0.3.x).

    ComfyUI merges a per-row `dora_scale` as dora_scale·(W0+ΔW)/‖W0‖ — the norm of the *original* weight —
    where DoRA (PEFT, LyCORIS, dreamlora) divides by ‖W0+ΔW‖. Writing m·‖W0‖/‖W0+ΔW‖ per row makes ComfyUI's
    rule give DoRA's weight exactly. (Valid while ComfyUI keeps that rule; its open PR #15458 would change it.)
    Other methods have no `dora_scale`: the result equals `kohya_state_dict`."""
    sdxl = _sdxl_names(model, component) if sdxl is None else sdxl
    out = kohya_state_dict(model, component, name, sdxl)
    for path, layer in dreamlora.adapter_layers(model, name).items():
        key = f"{_kohya_key(component, path, sdxl, model)}.dora_scale"
        if key not in out:
            continue
        w0 = layer.kind.weight_matrix().float()  # (d_out, d_in)
        factors = layer.lora_factors()
        delta = layer.kind.up_matrix(factors["lora_B.weight"]) @ layer.kind.down_matrix(factors["lora_A.weight"])
        magnitude = factors["lora_magnitude_vector"].reshape(-1).float()
        out[key] = per_row(magnitude * w0.norm(dim=1) / (w0 + delta).norm(dim=1), layer.kind)
    return out


def _tool_tensors(unet: nn.Module, text_encoder: nn.Module | None, name: str, builder,
                  text_encoder_2: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Every component's tensors, named for the UNet's family: SDXL (kohya's LDM names, `lora_te1_`/`lora_te2_`)
    or SD 1.x (diffusers paths, `lora_te_`)."""
    sdxl = is_sdxl_layout(getattr(unet, "config", None))
    if has_adapter(text_encoder_2, name) and not sdxl:
        raise ValueError("a second text encoder's adapter needs an SDXL UNet (addition_embed_type='text_time')")
    tensors = builder(unet, "unet", name, sdxl)
    for component, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if has_adapter(model, name):
            tensors.update(builder(model, component, name, sdxl))
    return tensors


def _kohya_metadata(unet: nn.Module, name: str, tensors: dict[str, torch.Tensor], prediction_type: str | None = None,
                    **extra: str) -> dict[str, str]:
    """kohya's header: the layers' dim/alpha when they all agree, "Dynamic" when they differ (as kohya's
    resize_lora writes), the `rank` option for keys without a `lora_down` (a method's native LyCORIS keys); the base's
    family for SDXL and SD 2.x (`prediction_type`: the base's scheduler's, which kohya's SD 2.x version string
    records)."""
    config = dreamlora.adapter_config(unet, name)
    if is_sdxl_layout(getattr(unet, "config", None)):
        extra = {"ss_base_model_version": SDXL_BASE_MODEL_VERSION, **extra}  # A1111 lists it for SDXL models
    elif is_sd2_layout(getattr(unet, "config", None)):
        extra = {**sd2_header(prediction_type), **extra}
    dims = {str(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")} or {str(config.rank)}
    alphas = {f"{t.item():g}" for k, t in tensors.items() if k.endswith(".alpha")} or {f"{config.alpha:g}"}
    return {"ss_network_module": dreamlora.METHODS[config.method].kohya_network_module,
            "ss_network_dim": dims.pop() if len(dims) == 1 else "Dynamic",
            "ss_network_alpha": alphas.pop() if len(alphas) == 1 else "Dynamic",
            "dreamlora_method": config.method, **extra}


def write_kohya_lora(output_dir: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None,
                     name: str = "default", text_encoder_2: nn.Module | None = None,
                     prediction_type: str | None = None) -> Path:
    """`kohya_lora.safetensors`: `kohya_state_dict` of each adapted component (SDXL: `text_encoder_2` too)."""
    path = Path(output_dir) / KOHYA_WEIGHT_NAME
    tensors = _tool_tensors(unet, text_encoder, name, kohya_state_dict, text_encoder_2)
    atomic_save_file(tensors, path, _kohya_metadata(unet, name, tensors, prediction_type))
    return path


def write_comfyui_lora(output_dir: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None,
                       name: str = "default", text_encoder_2: nn.Module | None = None,
                       prediction_type: str | None = None) -> Path:
    """`comfyui_lora.safetensors`: the kohya file with ComfyUI's DoRA compensation (`comfyui_state_dict`)."""
    path = Path(output_dir) / COMFYUI_WEIGHT_NAME
    tensors = _tool_tensors(unet, text_encoder, name, comfyui_state_dict, text_encoder_2)
    meta = _kohya_metadata(unet, name, tensors, prediction_type,
                           dreamlora_target="ComfyUI 0.3.x (dora_scale compensated for its DoRA rule)")
    atomic_save_file(tensors, path, meta)
    return path


def write_tool_files(output_dir: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None,
                     name: str = "default", kohya: bool = True, text_encoder_2: nn.Module | None = None,
                     prediction_type: str | None = None) -> dict:
    """Write the diffusers file and (unless `kohya` is False) the kohya file, plus the ComfyUI file for DoRA.
    Returns which file each tool reads (file names in `output_dir`; None: no file that tool reads right). A file
    in a format the method cannot be written in is skipped with a warning naming the format and the reason
    (also returned under `not_written`); the other files are still written. `text_encoder_2` (SDXL's second
    encoder) goes into every file (`text_encoder_2.…` in the diffusers file, `lora_te2_…` in the kohya files).
    `prediction_type`: the base's (its scheduler's), for the kohya header of an SD 2.x base (`sd_v2_v`)."""
    files: dict = dict.fromkeys(("diffusers", "kohya", "lycoris", "comfyui", "a1111"))
    skipped: dict[str, str] = {}
    if _try_write(skipped, write_diffusers_lora, output_dir, unet, text_encoder, name, text_encoder_2):
        files["diffusers"] = DIFFUSERS_WEIGHT_NAME
    if kohya and (path := _try_write(skipped, write_kohya_lora, output_dir, unet, text_encoder, name,
                                     text_encoder_2, prediction_type)):
        with safe_open(str(path), framework="pt") as f:
            is_dora = any(k.endswith(".dora_scale") for k in f.keys())
        comfy = (write_comfyui_lora(output_dir, unet, text_encoder, name, text_encoder_2, prediction_type).name
                 if is_dora else KOHYA_WEIGHT_NAME)
        files.update(kohya=KOHYA_WEIGHT_NAME, lycoris=KOHYA_WEIGHT_NAME, comfyui=comfy,
                     a1111=None if is_dora else KOHYA_WEIGHT_NAME)  # A1111 cannot express per-row DoRA (README)
    return {**files, "not_written": skipped} if skipped else files


def _try_write(skipped: dict[str, str], writer, output_dir, *args) -> Path | None:
    """`writer(output_dir, *args)`, or None with a warning when the method cannot be written in its format."""
    try:
        return writer(output_dir, *args)
    except ExportUnsupported as e:
        skipped[writer.__name__.removeprefix("write_")] = str(e)
        warnings.warn(f"{e}. Not written: {writer.__name__.removeprefix('write_')}; the other files are.",
                      stacklevel=3)
        return None
