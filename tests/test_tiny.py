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
