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
