"""Masked loss (`--masked_loss`, `--alpha_mask`): the mask weights the per-latent-pixel error (kohya's
normalisation), follows its photo's crop and flip pixel for pixel, is cached with the latents, and bad masks are
named. Unit checks on the loss and the data, plus short in-process runs on the tiny model."""

from __future__ import annotations

import json
import logging
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import INSTANCE_DIR, PROMPT, train_in_process

from dreamlora.errors import DataError
from pipelines.diffusion import data
from pipelines.diffusion.loss import denoising_loss


class FixedPrediction:
    """A "UNet" whose prediction is a leaf tensor, so ∂loss/∂prediction can be read off its .grad."""

    def __init__(self, pred: torch.Tensor):
        self.pred = pred

    def __call__(self, noisy, timesteps, states):
        return SimpleNamespace(sample=self.pred)


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)  # epsilon: the target is the noise


def masked_loss_and_grad(mask: torch.Tensor):
    torch.manual_seed(0)
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    pred = torch.randn(1, 4, 8, 8, requires_grad=True)
    loss = denoising_loss(FixedPrediction(pred), scheduler(), latents, torch.zeros(1, 5, 32),
                          torch.zeros(1, dtype=torch.bool), None, timesteps=torch.tensor([500]), noise=noise,
                          mask=mask)["loss"]
    loss.backward()
    return loss, pred, noise


def test_a_zero_mask_over_half_the_image_stops_the_gradient_there_and_the_loss_is_the_other_half_by_hand():
    mask = torch.ones(1, 1, 64, 64)
    mask[..., :32] = 0  # the left half of the pixels: latent columns 0-3 (the VAE's factor is 8)
    loss, pred, noise = masked_loss_and_grad(mask)
    assert torch.all(pred.grad[..., :4] == 0)
    assert torch.all(pred.grad[..., 4:] != 0)
    # kohya's normalisation: the weighted squared error averaged over every latent element, masked ones as zeros
    by_hand = ((pred.detach() - noise)[..., 4:] ** 2).sum() / pred.numel()
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=0)
    unmasked, _, _ = masked_loss_and_grad(None)
    assert loss < unmasked


def test_the_mask_is_area_averaged_to_latent_pixels():
    """Black over pixel columns 0-35: latent column 4 covers pixels 32-39, half black, so it weighs 0.5."""
    mask = torch.ones(1, 1, 64, 64)
    mask[..., :36] = 0
    loss, pred, noise = masked_loss_and_grad(mask)
    weight = torch.tensor([0, 0, 0, 0, 0.5, 1, 1, 1]).expand(1, 4, 8, 8)
    torch.testing.assert_close(pred.grad, 2 * (pred.detach() - noise) * weight / pred.numel())
    torch.testing.assert_close(loss, ((pred.detach() - noise) ** 2 * weight).mean())


def pattern_photo(width: int, height: int) -> tuple[Image.Image, Image.Image]:
    """A photo whose red channel is a different value in every column and row parity, and a mask equal to it."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    red = (2 * x + y % 2).astype(np.uint8)
    rng = np.random.default_rng(0)
    rgb = np.stack([red, rng.integers(0, 256, red.shape), rng.integers(0, 256, red.shape)], -1).astype(np.uint8)
    return Image.fromarray(rgb), Image.fromarray(red, mode="L")


def test_the_mask_follows_the_random_crop_and_flip_pixel_for_pixel():
    """At a scale of 1 the crop is the only resampling, so the mask must equal the photo's red channel exactly;
    several (epoch, index) draws must cover different crops and both flips, or the check proves little."""
    photo, mask = pattern_photo(96, 64)  # --resolution 64: a random horizontal offset in 0..32
    examples = [data.Example(photo, PROMPT, False, INSTANCE_DIR / "x.png", mask) for _ in range(4)]
    dataset = data.DreamBoothDataset(examples, [], 64, center_crop=False, random_flip=True, seed=3)
    plain = data.DreamBoothDataset([data.Example(photo, PROMPT, False, INSTANCE_DIR / "x.png")] * 4, [], 64,
                                   center_crop=False, random_flip=True, seed=3)
    seen = set()
    for epoch in range(3):
        dataset.select_epoch(epoch)
        plain.select_epoch(epoch)
        for index in range(4):
            view = dataset[index]["instance"]
            red = torch.round((view["pixel_values"][0] + 1) * 127.5)
            assert torch.equal(view["mask"][0] * 255, red)
            assert torch.equal(view["pixel_values"], plain[index]["instance"]["pixel_values"])  # same draws
            seen.add((int(red[0, 0]) // 2, view["key"][2]))  # (crop offset or its mirror, flipped)
    assert len({offset for offset, _ in seen}) > 3 and {flip for _, flip in seen} == {False, True}


def test_a_resized_mask_stays_a_weight_and_keeps_its_halves():
    photo = Image.new("RGB", (200, 100), "gray")
    mask = Image.fromarray(np.where(np.arange(200)[None, :].repeat(100, 0) < 100, 0, 255).astype(np.uint8), "L")
    for resolution in (64, 128):  # down (box) and up (bilinear)
        _, _, weights = data.augment_with_mask(photo, mask, resolution, True, False, random.Random(0))
        assert weights.shape == (1, resolution, resolution) and 0 <= weights.min() and weights.max() <= 1
        assert weights[..., : resolution // 2 - 1].max() == 0 and weights[..., resolution // 2 + 1:].min() == 1


def photo_folder(tmp_path, masks: dict) -> object:
    """The dog photos, with `masks` {stem: L array or Image} saved as <stem>-masklabel.png beside them."""
    folder = tmp_path / "photos"
    shutil.copytree(INSTANCE_DIR, folder)
    for stem, mask in masks.items():
        (mask if isinstance(mask, Image.Image) else Image.fromarray(mask, "L")).save(folder / f"{stem}-masklabel.png")
    return folder


def test_mask_files_are_not_photos_and_a_photo_without_one_counts_fully(tmp_path):
    half = np.zeros((160, 160), np.uint8)
    half[:, 80:] = 255
    folder = photo_folder(tmp_path, {"00": half})
    assert [p.name for p in data.list_images(folder, "--instance_data_dir")] == ["00.jpg", "01.jpg", "02.jpg",
                                                                                  "03.jpg"]
    plain = data.read_examples(folder, "--instance_data_dir", PROMPT, 64, is_class=False)
    assert len(plain) == 4 and all(e.mask is None for e in plain)
    masked = data.read_examples(folder, "--instance_data_dir", PROMPT, 64, is_class=False, mask_source="masklabel")
    assert np.array_equal(np.asarray(masked[0].mask), half) and all(e.mask is None for e in masked[1:])
    classes = data.read_examples(INSTANCE_DIR, "--class_data_dir", "a dog", 64, is_class=True)
    batch = data.collate([data.DreamBoothDataset(masked, classes, 64, True, False, 0)[i] for i in range(2)])
    # rows: instance 00 (masked), instance 01 (no mask: ones), then the two class rows (never masked: ones)
    assert batch["masks"].shape == (4, 1, 64, 64)
    assert batch["masks"][0, 0, :, :31].max() == 0 and batch["masks"][0, 0, :, 33:].min() == 1
    assert torch.all(batch["masks"][1:] == 1)


def test_the_scorer_does_not_take_a_mask_for_a_reference_photo(tmp_path):
    from eval.score import reference_paths

    photo_folder(tmp_path, {"00": np.zeros((160, 160), np.uint8)})
    assert [p.name for p in reference_paths(tmp_path, "photos")] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]


def test_a_mask_of_another_size_is_refused_naming_both_files(tmp_path, capsys):
    from test_train_bad_input import base_args

    from dreamlora.train import cli

    folder = photo_folder(tmp_path, {"02": np.zeros((100, 160), np.uint8)})
    assert cli(base_args(tmp_path, folder) + ["--masked_loss"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{folder / '02-masklabel.png'} is 160x100 but its photo {folder / '02.jpg'} is 160x160" in err
    assert "\n" not in err and not (tmp_path / "out").exists()


def test_masked_loss_without_any_mask_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"--masked_loss: --instance_data_dir '.*dog': no photo has a "
                                        r"<name>-masklabel.png mask"):
        data.read_examples(INSTANCE_DIR, "--instance_data_dir", PROMPT, 64, is_class=False, mask_source="masklabel")
    with pytest.raises(DataError, match=r"--alpha_mask: --instance_data_dir '.*dog': no photo has an alpha"):
        data.read_examples(INSTANCE_DIR, "--instance_data_dir", PROMPT, 64, is_class=False, mask_source="alpha")


def test_alpha_mask_reads_the_alpha_channel_and_a_photo_without_one_counts_fully_with_a_warning(tmp_path, caplog):
    folder = photo_folder(tmp_path, {})
    photo = Image.open(folder / "01.jpg").convert("RGBA")
    alpha = np.tile(np.arange(160, dtype=np.uint8), (160, 1))
    photo.putalpha(Image.fromarray(alpha, "L"))
    (folder / "01.jpg").unlink()
    photo.save(folder / "01.png")
    with caplog.at_level(logging.WARNING):
        examples = data.read_examples(folder, "--instance_data_dir", PROMPT, 64, is_class=False, mask_source="alpha")
    by_name = {e.path.name: e for e in examples}
    assert np.array_equal(np.asarray(by_name["01.png"].mask), alpha)
    assert all(by_name[n].mask is None for n in ("00.jpg", "02.jpg", "03.jpg"))
    warned = [r.getMessage() for r in caplog.records if "no alpha channel" in r.getMessage()]
    assert sorted(warned) == sorted(f"{folder / n} has no alpha channel: it counts fully (--alpha_mask)"
                                    for n in ("00.jpg", "02.jpg", "03.jpg"))


def test_cached_latents_cache_each_views_mask_at_latent_size(tiny_model_dir, tmp_path):
    from dreamlora import train
    from pipelines.diffusion.loss import latent_mask
    from pipelines.diffusion.models import load_components

    stripes = np.zeros((160, 160), np.uint8)
    stripes[:, 40:120] = 255
    folder = photo_folder(tmp_path, {"00": stripes, "03": 255 - stripes})
    examples = data.read_examples(folder, "--instance_data_dir", PROMPT, 64, is_class=False, mask_source="masklabel")
    dataset = data.DreamBoothDataset(examples, [], 64, True, True, seed=0)
    sd = load_components(str(tiny_model_dir))
    cached = train.LatentEncoder(sd.vae, torch.float32, cache=True)
    cached.fill_cache(dataset)
    assert len(cached.mask_cache) == 8  # 4 photos x 2 orientations
    for index in range(4):
        batch = data.collate([dataset[index]])
        fresh = latent_mask(batch["masks"], (8, 8))
        torch.testing.assert_close(cached.masks(batch), fresh)
    assert cached.masks(data.collate([dataset[0]])).mean() == pytest.approx(0.5)


@pytest.mark.parametrize("cache", [False, True])
def test_training_on_black_masks_has_zero_loss(tiny_model_dir, tmp_path, cache):
    """End to end through train.py: every photo masked out entirely leaves nothing to learn, so every logged loss
    is exactly 0 (a mask that did not reach the loss would leave the usual ~1)."""
    folder = photo_folder(tmp_path, {f"0{i}": np.zeros((160, 160), np.uint8) for i in range(4)})
    out = tmp_path / "out"
    assert train_in_process(tiny_model_dir, out, "--masked_loss", "--max_train_steps", 3, "--checkpointing_steps", 100,
                            *(["--cache_latents"] if cache else []), instance_dir=folder) == 0
    losses = [r["loss"] for r in map(json.loads, (out / "progress.jsonl").read_text().splitlines())
              if r.get("event") == "step"]
    assert losses == [0.0, 0.0, 0.0]
    assert json.loads((out / "run.json").read_text())["args"]["masked_loss"] is True
