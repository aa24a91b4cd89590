"""`python -m pipelines.compose` on SDXL: a library of tiny-SDXL adapters (UNet and both text encoders) composes into
an output folder with all three components, whose objective conditions the UNet as SDXL training does (the pooled
embedding and each photo's time ids), and which unmodified diffusers loads to pipelines.sample's image."""

from __future__ import annotations

import json
import random
from importlib.metadata import version

import numpy as np
import pytest
import torch
from packaging.version import Version
from PIL import Image
from safetensors.torch import load_file
from train_helpers import INSTANCE_DIR, reset_accelerate, train_in_process

import dreamlora
from pipelines.compose.cli import cli
from pipelines.diffusion.sample import main as sample_main

ASSETS = INSTANCE_DIR.parent
PROMPT = "a photo of sks thing"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
pytestmark = pytest.mark.filterwarnings("ignore:.*RHOEND.*:UserWarning")


@pytest.fixture(scope="module")
def sdxl_library(tiny_sdxl_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-library")
    for subject in ("dog", "backpack"):
        assert train_in_process(tiny_sdxl_dir, root / subject, "--rank", 4, "--max_train_steps", 6,
                                "--learning_rate", 5e-3, "--text_encoder_lr", 5e-3, "--train_text_encoder",
                                "--instance_prompt", PROMPT, "--checkpointing_steps", 100, "--no_kohya_format",
                                instance_dir=ASSETS / subject) == 0
    return [root / "dog", root / "backpack"]


def compose(model_dir, out, adapters, *extra) -> int:
    argv = ["--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(ASSETS / "dog"),
            "--instance_prompt", PROMPT, "--resolution", "64", "--output_dir", str(out), "--report_to", "none",
            *[x for a in adapters for x in ("--adapter", str(a))], *map(str, extra)]
    reset_accelerate()
    try:
        return cli(argv)
    finally:
        reset_accelerate()


def sdxl_loss_by_hand(model_dir, run_dir, pairs: int = 8, seed: int = 0) -> float:
    """The composition's objective recomputed outside it: the written adapters on a fresh SDXL model, the photos'
    center crops with their time ids (original height and width, crop top and left, 64, 64), both encoders'
    states and the pooled embedding, over the fixed (timestep, noise) pairs."""
    from pipelines.diffusion.data import crop_view, read_examples
    from pipelines.diffusion.loss import fixed_pairs_loss
    from pipelines.diffusion.models import load_components
    from pipelines.diffusion.sdxl import encode_prompts_xl

    sd = load_components(str(model_dir))
    for component in COMPONENTS:
        dreamlora.load(getattr(sd, component), run_dir / f"{component}_adapter.safetensors")
    examples = read_examples(ASSETS / "dog", "photos", PROMPT, 64, is_class=False, use_captions=False)
    views = [crop_view(e.image, 64, True, False, random.Random(0)) for e in examples]
    time_ids = torch.tensor([[e.image.height, e.image.width, *v.crop_top_left, 64, 64] for e, v in
                             zip(examples, views, strict=True)], dtype=torch.float32)
    with torch.no_grad():
        latents = sd.vae.encode(torch.stack([v.pixels for v in views])).latent_dist.mean
        states, pooled = encode_prompts_xl([sd.tokenizer, sd.tokenizer_2], [sd.text_encoder, sd.text_encoder_2],
                                           [PROMPT] * len(examples))
    latents = latents * sd.vae.config.scaling_factor
    return fixed_pairs_loss(sd.unet, sd.noise_scheduler, latents, states, pairs=pairs, seed=seed,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})


def test_an_sdxl_composition_writes_every_encoder_and_scores_as_sdxl_trains(sdxl_library, tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "mix"
    assert compose(tiny_sdxl_dir, out, sdxl_library, "--weights", "0.7,0.4") == 0
    run = json.loads((out / "run.json").read_text())
    assert all((out / f"{c}_adapter.safetensors").is_file() for c in COMPONENTS)
    assert {k.split(".")[0] for k in load_file(out / "pytorch_lora_weights.safetensors")} == set(COMPONENTS)
    kohya = load_file(out / "kohya_lora.safetensors")
    assert any(k.startswith("lora_te2_") for k in kohya) and any(k.startswith("lora_te1_") for k in kohya)
    # the objective is SDXL's: recomputed by hand with the pooled embedding and the time ids
    by_hand = sdxl_loss_by_hand(tiny_sdxl_dir, out)
    print(f"composed loss {run['composed_loss']:.6f}, by hand {by_hand:.6f}")
    assert abs(by_hand - run["composed_loss"]) <= 1e-5

    # unmodified diffusers reads the composed folder to pipelines.sample's image
    assert sample_main(["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--adapter", str(out), "--prompt",
                        PROMPT, "--num_inference_steps", "4", "--height", "64", "--width", "64", "--device", "cpu",
                        "--output_dir", str(tmp_path / "ours")]) == 0
    ours = np.asarray(Image.open(tmp_path / "ours" / "0000_0.png")).astype(np.int16)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    old = Version(version("diffusers")) < Version("0.40")
    pipe.load_lora_weights(out, **({"weight_name": "pytorch_lora_weights.safetensors"} if old else {}))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, num_inference_steps=4, height=64, width=64, output_type="np", guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(ours - np.round(theirs * 255).astype(np.int16)).max() <= 2


def test_an_sdxl_adapter_on_an_sd_base_is_refused_with_nothing_written(sdxl_library, tiny_model_dir, tmp_path,
                                                                         capsys):
    out = tmp_path / "mix"
    assert compose(tiny_model_dir, out, sdxl_library[:1], "--weights", "1") == 2
    err = capsys.readouterr().err
    assert "text_encoder_2" in err and "SDXL" in err, err
    assert not out.exists()
