"""A tiny Stable Diffusion 1.x pipeline, built offline and seeded (`python -m dreamlora.tiny OUT_DIR`).

The architecture is SD 1.x's (UNet2DConditionModel with cross-attention, AutoencoderKL with an 8× latent,
CLIP text encoder, the real CLIP BPE tokenizer, SD's noise schedule) at a size that trains on a laptop CPU.
Weights are random: it exercises every code path of training, sampling and loading, not image quality.
`StableDiffusionPipeline.from_pretrained(OUT_DIR)` loads it like any diffusers folder.

`--preset sdxl` builds a tiny SDXL pipeline the same way (`StableDiffusionXLPipeline.from_pretrained(OUT_DIR)`):
SDXL's UNet layout with text_time micro-conditioning, two CLIP text encoders (the second with a projection, whose
pooled output conditions the UNet), SDXL's two tokenizers, its VAE scale and its Euler scheduler.

`--preset sd2` builds a tiny SD 2.x pipeline (`StableDiffusionPipeline.from_pretrained(OUT_DIR)`), with SD 2.1's traits
as its diffusers folder ships them: a v-prediction DDIM scheduler, an OpenCLIP-style text encoder saved as a
`CLIPTextModel` (plain gelu, its token ids as SD 2.1's config.json gives them: the final layer already dropped in
the real one, whose last hidden state is OpenCLIP's penultimate), a tokenizer that pads with "!", and a UNet with
head counts per level, linear projections and upcast attention. `--prediction_type epsilon` makes it SD 2.x-base-like
(the 512 px base models predict noise).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pipelines.diffusion.sd_configs import (
    SD15_UNET_CONFIG,
    SD21_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    TINY_SD2_UNET_CONFIG,
    TINY_SDXL_UNET_CONFIG,
)

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# SD 1.x's scheduler config (stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json).
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
               "steps_offset": 1, "prediction_type": "epsilon"}
# SDXL's (stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json): the same betas, Euler sampling
SDXL_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "interpolation_type": "linear", "prediction_type": "epsilon",
                 "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": False}
# SD 2.1's (stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json): SD's betas, DDIM, v-prediction
SD2_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "v_prediction"}
SDXL_VAE = {"scaling_factor": 0.13025, "force_upcast": True}  # SDXL's VAE: its own scale; overflows in fp16
SDXL_PAD = "!"  # SDXL's second tokenizer (OpenCLIP's) pads with "!" (id 0), the first with <|endoftext|>


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (the alphabet the BPE merges are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def clip_bpe_files() -> tuple[dict[str, int], list[str]]:
    """vocab (token -> id) and merges in Hugging Face's CLIPTokenizer layout, from open_clip's BPE file.

    Same construction as CLIP's SimpleTokenizer: 256 byte tokens, the same with `</w>`, the first
    48,894 merges, then <|startoftext|> (49406) and <|endoftext|> (49407): 49,408 tokens."""
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(folder: Path, pad_token: str = EOT):
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_files()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                              bos_token=SOT, eos_token=EOT, unk_token=EOT, pad_token=pad_token)
    return tokenizer


TINY = (
    {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (32, 64),
     "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
     "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8},
    # four VAE blocks: the 8× latent of SD (64 px images -> 8×8 latents)
    {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 16, 32, 32),
     "layers_per_block": 1, "down_block_types": ("DownEncoderBlock2D",) * 4,
     "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 8, "sample_size": 64},
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
     "projection_dim": 32},
)
SD15 = (
    SD15_UNET_CONFIG,
    {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
     "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4,
     "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "sample_size": 512},
    {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
     "projection_dim": 768, "hidden_act": "quick_gelu"},
)
# SDXL: (UNet, VAE, text encoder (CLIP ViT-L's role), text encoder 2 with projection (OpenCLIP bigG's role)).
TINY_SDXL = (
    TINY_SDXL_UNET_CONFIG,
    {**TINY[1], **SDXL_VAE},
    TINY[2],
    # the same width as the first encoder (cross dim 64 = 32 + 32); bigG's plain gelu; the projection's 32 is the
    # pooled part of the UNet's added embedding (80 = 32 + 6 time ids × 8)
    {**TINY[2], "hidden_act": "gelu"},
)
SDXL_FULL = (
    SDXL_UNET_CONFIG,
    {**SD15[1], **SDXL_VAE, "sample_size": 1024},
    SD15[2],  # CLIP ViT-L/14
    {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
     "projection_dim": 1280, "hidden_act": "gelu"},  # OpenCLIP ViT-bigG/14
)
# SD 2.x: (UNet, VAE (SD's), text encoder). stabilityai/stable-diffusion-2-1 text_encoder/config.json is a
# CLIPTextModel of OpenCLIP ViT-H/14's text tower with its last layer dropped (23 of 24 layers: SD 2.x conditions on
# the penultimate layer), plain gelu, and token ids 0/2/1 for bos/eos/pad (not the tokenizer's 49406/49407/0: with
# eos_token_id 2 transformers pools at the highest token id, the legacy rule; SD 2.x never reads the pooled output).
SD2_TEXT = {"hidden_act": "gelu", "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
TINY_SD2 = (
    TINY_SD2_UNET_CONFIG,
    TINY[1],
    {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
     "projection_dim": 32, **SD2_TEXT},
)
SD2_FULL = (
    SD21_UNET_CONFIG,
    {**SD15[1], "sample_size": 768},
    {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
     "projection_dim": 512, **SD2_TEXT},
)
SD2_PAD = "!"  # SD 2.x's tokenizer (OpenCLIP's) pads with "!" (id 0), as SDXL's second
PRESETS = {"tiny": TINY, "sd15": SD15, "sdxl": TINY_SDXL, "sdxl_full": SDXL_FULL, "sd2": TINY_SD2,
           "sd2_full": SD2_FULL}
SDXL_PRESETS = ("sdxl", "sdxl_full")
SD2_PRESETS = ("sd2", "sd2_full")


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def default_prediction_type(preset: str) -> str:
    """The preset's own target: v_prediction for SD 2.x (SD 2.1's 768-v model), epsilon otherwise."""
    return "v_prediction" if preset in SD2_PRESETS else "epsilon"


def build_pipeline(seed: int = 0, preset: str = "tiny", prediction_type: str | None = None):
    """The pipeline in memory (random weights from `seed`): `tiny`, or `sd15` for the full SD 1.5
    architecture (860M-parameter UNet, SD VAE, CLIP ViT-L/14 text encoder) for benchmarks.
    `sd2` (tiny) and `sd2_full` (the SD 2.1 architecture, 866M-parameter UNet, OpenCLIP ViT-H text encoder) build
    SD 2.x pipelines; `sdxl` (tiny) and `sdxl_full` (the SDXL base architecture, 2.6B-parameter UNet) SDXL ones.
    `prediction_type` (default: the preset's, `default_prediction_type`) sets the scheduler's target: v_prediction
    on `tiny` gives an SD 1.x-sized v-prediction model (same weights, its scheduler)."""
    prediction_type = prediction_type or default_prediction_type(preset)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if preset in SDXL_PRESETS:
        return build_sdxl_pipeline(seed, preset, prediction_type)
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = PRESETS[preset]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(clip_text_config(text_cfg))
    sd2 = preset in SD2_PRESETS
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp), pad_token=SD2_PAD if sd2 else EOT)
    if sd2:
        scheduler = DDIMScheduler.from_config({**SD2_SCHEDULE, "prediction_type": prediction_type})
    else:
        scheduler = PNDMScheduler.from_config({**SD_SCHEDULE, "skip_prk_steps": True,  # ignores DDIM-only keys
                                               "prediction_type": prediction_type})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    assert DDPMScheduler.from_config(pipe.scheduler.config).config.beta_schedule == "scaled_linear"
    return pipe


def clip_text_config(text_cfg: dict, pad_token_id: int = 49407):
    """A CLIPTextConfig with CLIP's vocabulary and 77 positions; token ids in `text_cfg` (SD 2.x's) win."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
                             "eos_token_id": 49407, "pad_token_id": pad_token_id, **text_cfg})


def build_sdxl_pipeline(seed: int = 0, preset: str = "sdxl", prediction_type: str | None = "epsilon"):
    """An SDXL pipeline in memory, random weights from `seed` (see `build_pipeline`)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    prediction_type = prediction_type or "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    unet_cfg, vae_cfg, text_cfg, text2_cfg = PRESETS[preset]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(clip_text_config(text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(text2_cfg, pad_token_id=0))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp) / "1")
        tokenizer_2 = build_tokenizer(Path(tmp) / "2", pad_token=SDXL_PAD)
    scheduler = EulerDiscreteScheduler.from_config({**SDXL_SCHEDULE, "prediction_type": prediction_type})
    # add_watermarker=False: SDXL's invisible watermark is an optional package and would alter the pixels
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def write(out_dir: str | os.PathLike, seed: int = 0, preset: str = "tiny", prediction_type: str | None = None) -> Path:
    """Write the tiny pipeline to `out_dir` atomically (a sibling temp folder, then a rename)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"OUT_DIR {str(out)!r} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_pipeline(seed, preset, prediction_type).save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            out.rmdir()
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the model folder is an ordinary folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def keep_photo_signal(model_dir: str | os.PathLike, photo_dirs: list, resolution: int = 64) -> Path:
    """Make the VAE of the tiny pipeline at `model_dir` (in place) keep its photos' signal, as a trained VAE would.

    The embedded model's random VAE has a posterior std of about 1 against means of std 0.2, scaled by SD's 0.18215 to
    latents of std 0.04: every photo is noise to the UNet, so an adapter learns only generic denoising, the same for
    every subject. Here the posterior is made deterministic (log-variance -30) and the latents unit-variance
    (`scaling_factor` = 1/std of the latent means of the photos in `photo_dirs`, center-cropped at `resolution`).
    Tests and benches of what an adapter learned about one subject against another use it (the composition's)."""
    import torch
    from diffusers import AutoencoderKL

    from pipelines.diffusion.data import center_crops, read_examples

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -30.0
        photos = [e for folder in photo_dirs for e in read_examples(folder, "photos", "", resolution, False)]
        pixels = center_crops(photos, resolution)
        means = vae.encode(pixels).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    vae.save_pretrained(Path(model_dir) / "vae")
    return Path(model_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to create (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny (default: SD 1.x), sd2 (a tiny SD 2.x pipeline), sdxl (a tiny SDXL pipeline), "
                             "or the full architectures, random, for benchmarks: sd15 (SD 1.5), sd2_full (SD 2.1), "
                             "sdxl_full (SDXL base)")
    parser.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=None,
                        help="the scheduler's target; default: the preset's (v_prediction for sd2/sd2_full as SD 2.1 "
                             "768-v, epsilon otherwise); epsilon on sd2 is SD 2.x-base-like, v_prediction on tiny an "
                             "SD 1.x-sized v-prediction model")
    args = parser.parse_args(argv)
    try:
        path = write(args.out_dir, args.seed, args.preset, args.prediction_type)
    except FileExistsError as e:
        parser.exit(2, f"error: {e}\n")
    family = " XL" if args.preset in SDXL_PRESETS else " 2.x" if args.preset in SD2_PRESETS else ""
    print(f"{args.preset} Stable Diffusion{family} pipeline (random weights) written to {path}")


if __name__ == "__main__":
    main()
