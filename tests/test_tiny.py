"""The embedded tiny SD pipeline: offline, deterministic, loadable by diffusers, with SD's real tokenizer."""

from __future__ import annotations

import hashlib

import pytest

from pipelines.diffusion import tiny_model as tiny


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def test_loads_in_diffusers_and_generates(tiny_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_tokenizer_ids_are_sd_clip_ids(tiny_dir):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert (len(tok), tok.model_max_length, tok.bos_token_id, tok.eos_token_id) == (49408, 77, 49406, 49407)
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    reference = SimpleTokenizer()
    for prompt in ["A DSLR photo of a red backpack, on the beach!", "naïve café 🐶 (8k) UHD"]:
        assert tok(prompt).input_ids == [49406, *reference.encode(prompt), 49407]


def test_same_seed_same_weights_and_refuses_to_overwrite(tiny_dir, tmp_path):
    again = tiny.write(tmp_path / "again")

    def digest(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*.safetensors"))}

    assert digest(again) == digest(tiny_dir) and len(digest(again)) == 3
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        tiny.write(again)


@pytest.mark.parametrize("preset", tiny.SDXL_PRESETS)
def test_sdxl_presets_fit_together(preset):
    """The UNet's context is both encoders' states side by side, its added embedding the second encoder's
    projection plus six time ids: what StableDiffusionXLPipeline checks at every call."""
    unet, vae, text, text_2 = tiny.PRESETS[preset]
    assert unet["cross_attention_dim"] == text["hidden_size"] + text_2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == text_2["projection_dim"] + 6 * unet[
        "addition_time_embed_dim"]
    assert unet["addition_embed_type"] == "text_time" and vae["scaling_factor"] == 0.13025 and vae["force_upcast"]


def test_sdxl_preset_loads_in_diffusers_and_generates(tiny_sdxl_dir, tmp_path):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    schedule = pipe.scheduler.config
    assert (schedule.beta_schedule, schedule.beta_start, schedule.beta_end, schedule.timestep_spacing,
            schedule.steps_offset) == ("scaled_linear", 0.00085, 0.012, "leading", 1)
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    # both tokenizers are CLIP's BPE; SDXL's second pads with "!" (id 0), the first with <|endoftext|>
    ids = [tok("a photo of sks dog", padding="max_length", max_length=9).input_ids
           for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    assert ids == [[49406, 320, 1125, 539, 48136, 1929, 49407, 49407, 49407],
                   [49406, 320, 1125, 539, 48136, 1929, 49407, 0, 0]]
    image = pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and image.std() > 0.01
    again = tiny.write(tmp_path / "again", preset="sdxl")  # seeded: the same weights

    def digest(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*.safetensors"))}

    assert digest(again) == digest(tiny_sdxl_dir) and len(digest(again)) == 4
