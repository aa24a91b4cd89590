"""kohya sd-scripts' SDXL names in the kohya file (`pipelines/diffusion/kohya_names.py`): the UNet under its original
LDM paths (`lora_unet_input_blocks_4_1_…`, `…middle_block_1_…`, `…output_blocks_2_2_conv`), the two text encoders as
`lora_te1_…`/`lora_te2_…`, checked against the names kohya writes for the real SDXL architecture, read back by
diffusers' own kohya converter (`StableDiffusionXLPipeline.load_lora_weights`) into the modules they came from,
with the same outputs, and loaded by ComfyUI's real loader onto its own SDXL model (tests/comfyui_loader.py) with
our weights. SD 1.x files keep diffusers' names, as kohya writes them for SD 1.x.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import OneLayer, options_for, randomize_adapters, tiny_unet
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_comfyui import STRENGTHS, assert_same_weights, our_weights, require_comfyui, run_comfyui, write_base
from test_comfyui import adapted as comfy_adapted
from torch import nn
from train_helpers import PROMPT, STRONG_LR, image_of, train_in_process

import dreamlora
from dreamlora import AdapterConfig, attach
from pipelines.diffusion import export
from pipelines.diffusion.kohya_names import NoKohyaName, ldm_unet_path
from pipelines.diffusion.sample import main as sample_main
from pipelines.diffusion.sd_configs import TINY_SDXL_UNET_CONFIG, build_sdxl_unet

# kohya's default LoRA targets: the Linear layers of every Transformer2DModel (and CLIPAttention/CLIPMLP)
KOHYA_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# every Linear and Conv2d of an SDXL UNet: LoCon's ResNet and sampler convs, conv_in/out, the time and added embeddings
ALL_UNET_TARGETS = KOHYA_UNET_TARGETS + ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
                                         "upsamplers.0.conv", "conv_in", "conv_out", "linear_1", "linear_2"]
KOHYA_METHODS = sorted(m for m, cls in dreamlora.METHODS.items() if cls.unsupported_reason("kohya") is None)

# SDXL base's attention blocks, in kohya's names, and their transformer depth (2 at the 64² level, 10 below)
SDXL_TRANSFORMERS = {"input_blocks_4_1": 2, "input_blocks_5_1": 2, "input_blocks_7_1": 10, "input_blocks_8_1": 10,
                     "middle_block_1": 10, "output_blocks_0_1": 10, "output_blocks_1_1": 10, "output_blocks_2_1": 10,
                     "output_blocks_3_1": 2, "output_blocks_4_1": 2, "output_blocks_5_1": 2}
# Modules of SDXL base's convolutions and embeddings as its original checkpoint names them (`model.diffusion_model.…`)
SDXL_LDM_NAMES = {
    "conv_in": "input_blocks_0_0", "time_embedding.linear_1": "time_embed_0", "time_embedding.linear_2": "time_embed_2",
    "add_embedding.linear_1": "label_emb_0_0", "add_embedding.linear_2": "label_emb_0_2", "conv_out": "out_2",
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "down_blocks.0.resnets.1.time_emb_proj": "input_blocks_2_0_emb_layers_1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
    "down_blocks.1.downsamplers.0.conv": "input_blocks_6_0_op",
    "down_blocks.2.resnets.1.conv2": "input_blocks_8_0_out_layers_3",
    "mid_block.resnets.0.conv1": "middle_block_0_in_layers_2",
    "mid_block.resnets.1.conv2": "middle_block_2_out_layers_3",
    "up_blocks.0.resnets.0.conv_shortcut": "output_blocks_0_0_skip_connection",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
    "up_blocks.1.resnets.2.time_emb_proj": "output_blocks_5_0_emb_layers_1",
    "up_blocks.2.resnets.2.conv2": "output_blocks_8_0_out_layers_3",
}


def kohya_sdxl_default_names() -> set[str]:
    """The module names kohya's sdxl_train_network writes for its default LoRA on SDXL base: 722 (its log line
    "create LoRA for U-Net: 722 modules")."""
    names = set()
    for block, depth in SDXL_TRANSFORMERS.items():
        names |= {f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"}
        for t in range(depth):
            layer = f"lora_unet_{block}_transformer_blocks_{t}"
            names |= {f"{layer}_{attn}_{p}" for attn in ("attn1", "attn2")
                      for p in ("to_q", "to_k", "to_v", "to_out_0")}
            names |= {f"{layer}_ff_net_0_proj", f"{layer}_ff_net_2"}
    return names


def kohya_te_names(prefix: str, layers: int) -> set[str]:
    parts = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    return {f"{prefix}_text_model_encoder_layers_{i}_{p}" for i in range(layers) for p in parts}


def modules_of(tensors: dict) -> set[str]:
    return {k.split(".", 1)[0] for k in tensors}


def adapted(model: nn.Module, method: str, targets: list[str], randomize: bool = True) -> nn.Module:
    model = attach(copy.deepcopy(model), AdapterConfig(method=method, rank=4, alpha=6.0, target_modules=targets,
                                                       options=options_for(method, singlora_ramp_steps=10)))
    dreamlora.set_export_rank(model, "exact")  # ReLoRA's default truncates: the files must hold our exact update
    if randomize:
        randomize_adapters(model, std=0.1)
        for layer in dreamlora.adapter_layers(model, "default").values():
            layer.step = 4  # mid-ramp for SingLoRA: the file must carry u(t)
    return model


def clip_encoders(device: str = "cpu", full_size: bool = False):
    """SDXL's two text encoders: CLIP ViT-L (`CLIPTextModel`) and OpenCLIP bigG in transformers' form
    (`CLIPTextModelWithProjection`); at full size (names only, on the meta device) or tiny."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = {"vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    if full_size:
        l_cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        g_cfg = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               projection_dim=1280, hidden_act="gelu")
    else:
        l_cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **ids)
        g_cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               projection_dim=32, **ids)
    with torch.device(device):
        return CLIPTextModel(l_cfg).eval(), CLIPTextModelWithProjection(g_cfg).eval()


def kohya_keys_of_one_layer(method: str) -> set[str]:
    model = adapted(OneLayer(nn.Linear(12, 20)), method, ["proj"])  # off init: AdaLoRA writes nothing at E = 0
    return {k.split(".", 1)[1] for k in export.kohya_state_dict(model, "unet")}


# diffusers' kohya converter reads lora_down/lora_up/alpha; it drops DoRA's dora_scale and refuses LyCORIS's own keys
DIFFUSERS_READABLE = [m for m in KOHYA_METHODS
                      if kohya_keys_of_one_layer(m) == {"lora_down.weight", "lora_up.weight", "alpha"}]


# --- the names ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_meta():
    """The SDXL base UNet and its two full-size text encoders, on the meta device (names and shapes only)."""
    return build_sdxl_unet("meta"), *clip_encoders("meta", full_size=True)


# AdaLoRA's exported rank depends on its learnt values, which meta tensors do not hold: its names are checked on the
# tiny SDXL model (the diffusers test below)
@pytest.mark.parametrize("method", sorted(set(KOHYA_METHODS) - {"adalora"}))
def test_full_sdxl_kohya_file_has_kohyas_names(method, sdxl_meta):
    unet, te1, te2 = sdxl_meta
    # sdxl=True: the writers name the first encoder for the UNet's family (the file tests below go through them)
    names = {component: modules_of(export.kohya_state_dict(adapted(model, method, targets, False), component,
                                                           sdxl=True))
             for component, model, targets in (("unet", unet, KOHYA_UNET_TARGETS), ("text_encoder", te1, TE_TARGETS),
                                               ("text_encoder_2", te2, TE_TARGETS))}
    assert names["unet"] == kohya_sdxl_default_names() and len(names["unet"]) == 722
    # kohya: "create LoRA for Text Encoder 1: 72 modules", "… 2: 192 modules"
    assert names["text_encoder"] == kohya_te_names("lora_te1", 12) and len(names["text_encoder"]) == 72
    assert names["text_encoder_2"] == kohya_te_names("lora_te2", 32) and len(names["text_encoder_2"]) == 192


def test_full_sdxl_convolutions_and_embeddings_have_the_checkpoints_names(sdxl_meta):
    unet = adapted(sdxl_meta[0], "lora", ALL_UNET_TARGETS, False)
    names = modules_of(export.kohya_state_dict(unet, "unet"))
    assert {f"lora_unet_{ldm}" for ldm in SDXL_LDM_NAMES.values()} <= names
    assert len(names) == len(dreamlora.adapter_layers(unet, "default"))  # one name per layer, none shared
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_unet_time_embed_", "lora_unet_label_emb_", "lora_unet_out_")) for n in names)
    for path, ldm in SDXL_LDM_NAMES.items():
        assert ldm_unet_path(path, unet.config).replace(".", "_") == ldm


def test_sd_layout_with_an_upsampler_after_a_level_without_attention():
    """The formula on another layout (SD 1.x's four levels, as the original SD 1.5 checkpoint names them): 12
    input blocks, the upsampler of the attention-free bottom level right after its resnet (`output_blocks.2.1.conv`)."""
    config = {**TINY_SDXL_UNET_CONFIG, "layers_per_block": 2,
              "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    expected = {"down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
                "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
                "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
                "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
                "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
                "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k":
                    "output_blocks.11.1.transformer_blocks.0.attn2.to_k",
                "mid_block.attentions.0.proj_out": "middle_block.1.proj_out"}
    assert {path: ldm_unet_path(path, config) for path in expected} == expected
    per_level = {**config, "layers_per_block": [1, 2, 1, 3]}  # diffusers allows a count per level
    assert ldm_unet_path("down_blocks.1.downsamplers.0.conv", per_level) == "input_blocks.5.0.op"  # 1 + 2 + 2
    assert ldm_unet_path("up_blocks.1.resnets.0.conv1", per_level) == "output_blocks.4.0.in_layers.2"  # 4 + 0


@pytest.mark.parametrize("path", ["down_blocks.0.resnets.0.nonlinearity", "encoder_hid_proj", "mid_block.norm"])
def test_a_module_without_an_ldm_name_is_refused_by_name(path):
    with pytest.raises(NoKohyaName, match=path.replace(".", r"\.")):
        ldm_unet_path(path, TINY_SDXL_UNET_CONFIG)


def test_an_unknown_block_type_skips_only_the_kohya_file(tmp_path):
    """A block kohya's SDXL UNet has no counterpart for: the kohya file is skipped with the reason, the others kept."""
    config = {**TINY_SDXL_UNET_CONFIG, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]}
    with pytest.raises(NoKohyaName, match="AttnDownBlock2D"):
        ldm_unet_path("down_blocks.1.resnets.0.conv1", config)
    unet = adapted(sdxl_tiny_unet(), "lora", ["conv1"])
    unet.register_to_config(down_block_types=config["down_block_types"])  # as a UNet of such a layout would say
    with pytest.warns(UserWarning, match="AttnDownBlock2D"):
        files = export.write_tool_files(tmp_path, unet)
    assert files["kohya"] is None and "kohya_lora" in files["not_written"]
    assert (tmp_path / export.DIFFUSERS_WEIGHT_NAME).is_file() and not (tmp_path / export.KOHYA_WEIGHT_NAME).exists()


def test_sd1_files_keep_diffusers_names_and_refuse_a_second_encoder(tmp_path):
    unet = adapted(tiny_unet(), "lora", ["to_q", "conv1"])
    names = modules_of(export.kohya_state_dict(unet, "unet"))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert all(n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")) for n in names)
    te1, te2 = (adapted(te, "lora", TE_TARGETS) for te in clip_encoders())
    with pytest.raises(ValueError, match="second text encoder.*SDXL"):
        export.write_kohya_lora(tmp_path, unet, te1, text_encoder_2=te2)
    path = export.write_kohya_lora(tmp_path, unet, te1)
    with safe_open(str(path), framework="pt") as f:
        assert "ss_base_model_version" not in f.metadata()  # A1111 reads a kohya header without it as SD 1.x
        assert any(k.startswith("lora_te_text_model_") for k in f.keys())


# --- diffusers' kohya converter reads the SDXL file back --------------------------------------------------------

def sdxl_tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG).eval()


@pytest.fixture(scope="module")
def tiny_sdxl():
    return sdxl_tiny_unet(), *clip_encoders()


def peft_modules(model: nn.Module) -> list[str]:
    """The modules diffusers/PEFT put a LoRA on."""
    return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


@torch.no_grad()
def outputs(unet, te1, te2) -> dict[str, torch.Tensor]:
    """Both encoders' penultimate hidden states and pooled projection, and the UNet's prediction on their
    concatenation with SDXL's micro-conditioning, as StableDiffusionXLPipeline feeds them."""
    torch.manual_seed(1)
    ids = torch.tensor([[0, 5, 17, 42, 2]])
    l_out, g_out = te1(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
    context = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], dim=-1)
    cond = {"text_embeds": g_out.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    sample = unet(torch.randn(1, 4, 16, 16), 10, context, added_cond_kwargs=cond).sample
    return {"te1": l_out.hidden_states[-2], "te2": g_out.hidden_states[-2], "pooled": g_out.text_embeds, "unet": sample}


@pytest.mark.parametrize("method", DIFFUSERS_READABLE)
def test_diffusers_reads_the_sdxl_kohya_file_into_the_same_modules_and_outputs(method, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet, te1, te2 = tiny_sdxl
    ours = adapted(unet, method, ALL_UNET_TARGETS), adapted(te1, method, TE_TARGETS), adapted(te2, method, TE_TARGETS)
    path = export.write_kohya_lora(tmp_path, ours[0], ours[1], text_encoder_2=ours[2])
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv.") for k in keys)  # the tiny UNet's first upsampler
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}

    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=copy.deepcopy(te1), text_encoder_2=copy.deepcopy(te2),
                                     tokenizer=None, tokenizer_2=None, unet=copy.deepcopy(unet), scheduler=None,
                                     add_watermarker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name=export.KOHYA_WEIGHT_NAME)  # diffusers' kohya converter
    for theirs, mine in zip((pipe.unet, pipe.text_encoder, pipe.text_encoder_2), ours, strict=True):
        assert peft_modules(theirs) == sorted(dreamlora.adapter_layers(mine, "default"))  # every key, its module
    base, want = outputs(unet, te1, te2), outputs(*ours)
    got = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    for name in want:
        assert (want[name] - base[name]).abs().max() > 1e-3, f"{name}: the adapter changes nothing visible"
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# --- ComfyUI's real loader: every method, LyCORIS keys and DoRA included ------------------------------------------

# The tiny SDXL layout at widths ComfyUI's SDXL model builds: 64-channel heads and its 32-group norms
COMFYUI_SDXL_UNET = {**TINY_SDXL_UNET_CONFIG, "block_out_channels": [64, 128, 192], "attention_head_dim": [1, 2, 3],
                     "norm_num_groups": 32}


@pytest.fixture(scope="module")
def comfyui_sdxl(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    require_comfyui()
    folder = tmp_path_factory.mktemp("comfyui-sdxl")
    torch.manual_seed(0)
    base = UNet2DConditionModel(**COMFYUI_SDXL_UNET).eval()
    models, files = {}, {}
    for i, method in enumerate(KOHYA_METHODS):
        models[method] = model = comfy_adapted(base, method, ALL_UNET_TARGETS, seed=i)
        dreamlora.set_export_rank(model, "exact")
        writer = export.write_comfyui_lora if method == "dora" else export.write_kohya_lora  # README: DoRA's file
        files[method] = writer(folder / method, model)
    patched, report = run_comfyui(folder, COMFYUI_SDXL_UNET, write_base(folder, "unet", base), files)
    return models, files, patched, report


@pytest.mark.parametrize("method", KOHYA_METHODS)
def test_comfyui_loads_every_sdxl_key_and_patches_our_weights(method, comfyui_sdxl):
    """ComfyUI's SDXL model is built in the LDM layout: its loader finds each name on its own modules (it would
    also take diffusers-path names, so the names are checked to be kohya's first)."""
    models, files, patched, report = comfyui_sdxl
    with safe_open(str(files[method]), framework="pt") as f:
        names = modules_of(dict.fromkeys(f.keys()))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names and "lora_unet_out_2" in names
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
    assert report[method]["not_loaded"] == []
    assert report[method]["patched"] == len(dreamlora.adapter_layers(models[method], "default"))
    for strength in STRENGTHS:
        assert_same_weights(patched[method][strength], our_weights(models[method], "unet", strength),
                            f"{method}@{strength}")


# --- end to end: the trainer's kohya file in unmodified diffusers -------------------------------------------------

# kohya's LoRA and LoCon layers: attention, projections, feed-forward, ResNet convs and time projections, samplers
TRAIN_TARGETS = ",".join(KOHYA_UNET_TARGETS[:-2] + ["ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                                                    "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"])


@pytest.mark.parametrize(("method", "text_encoders"),  # lora by default, the others with -m slow (conftest)
                         [(m, True) if m == "lora" else pytest.param(m, True, marks=pytest.mark.slow)
                          for m in DIFFUSERS_READABLE] + [("lora", False)])
def test_trained_sdxl_kohya_file_in_diffusers_gives_the_image_of_pipelines_sample(method, text_encoders,
                                                                                  tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run = tmp_path / "run"
    lr = STRONG_LR.get(method, 5e-3)
    assert train_in_process(tiny_sdxl_dir, run, "--adapter", method, "--rank", 4, "--max_train_steps", 6,
                            "--learning_rate", lr, "--text_encoder_lr", lr, "--singlora_ramp_steps", 2,
                            "--relora_steps", 3, "--export_rank", "exact", "--target_modules", TRAIN_TARGETS,
                            "--text_encoder_target_modules", ",".join(TE_TARGETS), "--checkpointing_steps", 100,
                            *(["--train_text_encoder"] if text_encoders else [])) == 0
    prefixes = {k.split("_")[1] for k in load_file(run / export.KOHYA_WEIGHT_NAME)}
    assert prefixes == ({"unet", "te1", "te2"} if text_encoders else {"unet"})
    assert sample_main(["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--adapter", str(run), "--prompt",
                        PROMPT, "--num_inference_steps", "4", "--height", "64", "--width", "64", "--device", "cpu",
                        "--output_dir", str(tmp_path / "images")]) == 0
    ours = np.asarray(Image.open(tmp_path / "images" / "0000_0.png")).astype(np.int16)

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base = image_of(reference)
    reference.load_lora_weights(run, weight_name=export.KOHYA_WEIGHT_NAME)  # diffusers' kohya converter
    theirs = image_of(reference)
    assert np.abs(ours - base).max() > 10  # the adapter visibly changes the image
    assert np.abs(ours - theirs).max() <= 2
    if text_encoders:
        for name in ("text_encoder", "text_encoder_2"):
            assert getattr(reference, name).peft_config, f"diffusers did not load the {name} adapter"
