"""The kohya/LyCORIS and ComfyUI files: names that do not depend on the installed transformers, and DoRA
magnitudes each tool merges into the weight dreamlora computes.

Each tool's DoRA merge rule is re-implemented here from its documented behaviour (shared INTEROP notes:
"DoRA in A1111 and ComfyUI"); no tool code is copied. LyCORIS's own loader is run as well; ComfyUI's real
loader runs in tests/test_comfyui.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import OneLayer, options_for, randomize_adapters, tiny_unet
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach
from pipelines.diffusion import export

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPTextModel(config).eval()


class Transformers4Layout(nn.Module):
    """CLIPTextModel as transformers 4 lays it out: everything under a `text_model.` level."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.text_model = getattr(clip, "text_model", clip)


def adapted(model: nn.Module, method: str, targets: list[str], std: float = 0.1) -> nn.Module:
    model = attach(model, AdapterConfig(method=method, rank=4, alpha=6.0, target_modules=targets,
                                        options=options_for(method, singlora_ramp_steps=10)))
    randomize_adapters(model, std=std)
    for layer in dreamlora.adapter_layers(model, "default").values():
        layer.step = 4  # mid-ramp for SingLoRA: the files must carry u(t)
    return model


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


# --- transformers 4 and 5 name the CLIP text encoder's modules differently ------------------------------------

def test_text_encoder_keys_are_the_same_for_transformers_4_and_5_layouts():
    clip = tiny_clip()
    flat = adapted(clip, "lora", TE_TARGETS)  # the layout of whatever transformers is installed
    nested = Transformers4Layout(copy.deepcopy(flat))  # transformers 4's layout of the same weights
    k_flat = export.kohya_state_dict(flat, "text_encoder")
    k_nested = export.kohya_state_dict(nested, "text_encoder")
    assert sorted(k_flat) == sorted(k_nested)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in k_flat
    assert not any("text_model_text_model" in k for k in k_flat)


def test_diffusers_file_text_encoder_keys_are_the_same_for_both_layouts(tmp_path):
    from safetensors import safe_open

    unet = adapted(tiny_unet(), "lora", ["to_q"])
    flat = adapted(tiny_clip(), "lora", TE_TARGETS)
    nested = Transformers4Layout(copy.deepcopy(flat))
    files = {}
    for label, te in (("flat", flat), ("nested", nested)):
        path = export.write_diffusers_lora(tmp_path / label, unet, te)
        with safe_open(str(path), framework="pt") as f:
            files[label] = (sorted(f.keys()), f.metadata())
    assert files["flat"] == files["nested"]
    keys, _ = files["flat"]
    # the transformers 4 form, read by every diffusers release; diffusers strips `text_model.` on transformers 5
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_diffusers_loads_the_text_encoder_adapter_of_the_installed_transformers(method, tiny_model_dir, tmp_path):
    from pipelines.diffusion.sample import load_pipeline

    pipe = load_pipeline(str(tiny_model_dir), "cpu")
    unet = adapted(copy.deepcopy(pipe.unet), method, ["to_q"])
    te = adapted(copy.deepcopy(pipe.text_encoder), method, TE_TARGETS, std=0.3)
    export.write_diffusers_lora(tmp_path, unet, te)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=16, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        base = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(tmp_path, weight_name=export.DIFFUSERS_WEIGHT_NAME)
        theirs, ours = pipe.text_encoder(ids)[0], te(ids)[0]
    assert (ours - base).abs().max() > 1e-2  # the adapter does something visible
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


# --- DoRA: each tool's documented merge rule --------------------------------------------------------------------

def lora_delta(w0: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """kohya LoRA: ΔW = (alpha / r)·up·down, in the base weight's layout."""
    rank = down.shape[0]
    return ((up.flatten(1) @ down.flatten(1)) * (alpha / rank)).reshape(w0.shape)


def row_norm(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))


def column_norm(w: torch.Tensor) -> torch.Tensor:
    """‖·‖ per input column (channel for Conv2d), shaped to broadcast over w."""
    t = w.transpose(0, 1)
    return t.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1)).transpose(0, 1)


def lycoris_merge(w0, t) -> torch.Tensor:
    """LyCORIS ≥ 2024-12 (wd_on_output): dora_scale ⊙ (W0+ΔW) / ‖W0+ΔW‖ per output row."""
    w = w0 + lora_delta(w0, t["up"], t["down"], t["alpha"])
    return t["dora_scale"] * w / row_norm(w)


def comfyui_merge(w0, t, strength: float = 1.0) -> torch.Tensor:
    """ComfyUI 0.3.x: a dora_scale with d_out rows divides by ‖W0‖ per row (the *original* weight); any other
    shape by ‖W0+ΔW‖ per input column. Strength s interpolates: W0 + s·(W − W0)."""
    w = w0 + lora_delta(w0, t["up"], t["down"], t["alpha"])
    scale = t["dora_scale"]
    norm = row_norm(w0) if scale.shape[0] == w0.shape[0] else column_norm(w)
    return w0 + strength * (w * scale / norm - w0)


def a1111_merge(w0, t) -> torch.Tensor:
    """A1111 `apply_weight_decompose`: always ‖W0+ΔW‖ per input column."""
    w = w0 + lora_delta(w0, t["up"], t["down"], t["alpha"])
    return w * t["dora_scale"] / column_norm(w)


def layer_tensors(state: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {"up": state[f"{key}.lora_up.weight"], "down": state[f"{key}.lora_down.weight"],
            "alpha": state[f"{key}.alpha"], "dora_scale": state[f"{key}.dora_scale"]}


DORA_LAYERS = {"linear_wide": lambda: nn.Linear(12, 20), "linear_narrow": lambda: nn.Linear(20, 6),
               "conv2d": lambda: nn.Conv2d(4, 6, 3, padding=1)}


@pytest.mark.parametrize("kind", sorted(DORA_LAYERS))
def test_dora_files_merge_right_under_each_tools_rule(kind):
    model = adapted(OneLayer(DORA_LAYERS[kind]()), "dora", ["proj"], std=0.5)  # a strongly perturbed layer
    layer = dreamlora.adapter_layers(model, "default")["proj"]
    w0 = layer.kind.base.weight.detach().float().clone()
    ours = layer.merged_weight().detach()
    kohya = layer_tensors(export.kohya_state_dict(model, "unet"), "lora_unet_proj")
    comfy = layer_tensors(export.comfyui_state_dict(model, "unet"), "lora_unet_proj")
    assert kohya["dora_scale"].shape == (w0.shape[0],) + (1,) * (w0.dim() - 1)
    assert comfy["dora_scale"].shape == kohya["dora_scale"].shape  # 2-D: a 1-D scale broadcasts N×N in ComfyUI

    assert rel_err(lycoris_merge(w0, kohya), ours) <= 1e-5
    assert rel_err(comfyui_merge(w0, comfy), ours) <= 1e-5
    # ComfyUI's strength interpolates the merged weights
    assert rel_err(comfyui_merge(w0, comfy, 0.5), w0 + 0.5 * (ours - w0)) <= 1e-5
    # why ComfyUI gets a file of its own, and why A1111 cannot be served: both rules miss by far on this layer
    assert rel_err(comfyui_merge(w0, kohya), ours) > 0.05
    assert rel_err(a1111_merge(w0, kohya), ours) > 0.05


@pytest.mark.parametrize("method", sorted(set(dreamlora.METHODS) - {"dora"}))
def test_non_dora_comfyui_file_is_the_kohya_file(method):
    model = adapted(OneLayer(nn.Linear(12, 20)), method, ["proj"])
    kohya, comfy = export.kohya_state_dict(model, "unet"), export.comfyui_state_dict(model, "unet")
    assert kohya.keys() == comfy.keys() and all(torch.equal(kohya[k], comfy[k]) for k in kohya)


# --- LyCORIS's own loader ---------------------------------------------------------------------------------------

def merged_by_lycoris(unet: nn.Module, text_encoder: nn.Module, tensors: dict, monkeypatch) -> int:
    """Merge the kohya tensors into the models with LyCORIS's kohya loader; returns how many modules it built."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # The loader first builds (then discards) a default network over the whole UNet; on a diffusers UNet that
    # names `time_embedding.linear_1` twice (by module class and by name) and stops with "duplicated lora
    # name". Dropping the by-name entries affects only that discarded network, not which of our keys load.
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", ["conv_in", "conv_out"])
    network, weights = create_network_from_weights(1.0, None, None, text_encoder, unet, weights_sd=tensors,
                                                   for_inference=True)
    network.merge_to(text_encoder, unet, weights, torch.float32, "cpu")
    return len(network.unet_loras) + len(network.text_encoder_loras)


@pytest.mark.parametrize("method", sorted(dreamlora.METHODS))
def test_lycoris_loader_merges_the_kohya_file_to_our_weights(method, monkeypatch):
    pytest.importorskip("lycoris", reason="lycoris-lora is a test dependency (pyproject's test extra)")
    base_unet, base_te = tiny_unet().eval(), Transformers4Layout(tiny_clip())  # kohya names follow transformers 4
    unet = adapted(copy.deepcopy(base_unet), method, UNET_TARGETS, std=0.3)
    te = adapted(copy.deepcopy(base_te), method, TE_TARGETS, std=0.3)
    tensors = {**export.kohya_state_dict(unet, "unet"), **export.kohya_state_dict(te, "text_encoder")}
    layers = {("unet", p): l for p, l in dreamlora.adapter_layers(unet, "default").items()}
    layers |= {("te", p): l for p, l in dreamlora.adapter_layers(te, "default").items()}

    built = merged_by_lycoris(base_unet, base_te, tensors, monkeypatch)
    assert built == len(layers)  # every layer of ours became a LyCORIS module: no key was skipped
    worst = 0.0
    for (component, path), layer in layers.items():
        merged = (base_unet if component == "unet" else base_te).get_submodule(path).weight.detach()
        worst = max(worst, rel_err(merged, layer.merged_weight().detach()))
    assert worst <= 1e-5, f"{method}: worst relative weight error {worst:.2e}"
