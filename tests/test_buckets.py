"""Aspect-ratio buckets (kohya's --enable_bucket and diffusers' --use_aspect_ratio_buckets): the bucket lists, each
photo's bucket, batches of one shape covering every row once per epoch on every process count, the views (pixels,
masks, SDXL time ids) cut to the bucket, bad settings refused before a model loads, and training end to end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import INSTANCE_DIR, PROMPT, ROOT, kill_after_checkpoint, launch_two, train_cmd, train_in_process

from dreamlora.errors import ArgError
from dreamlora.train_args import parse_args
from pipelines.diffusion import buckets
from pipelines.diffusion import data as dbdata
from pipelines.trainer.bucket_batches import BucketBatchSampler

# the tiny model's buckets at --resolution 64: sides multiples of 16 (its VAE's 8 x its UNet's one down-sampling)
KOHYA_TINY = ("--enable_bucket", "--min_bucket_reso", 32, "--max_bucket_reso", 128, "--bucket_reso_steps", 16)


def photos(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """The test dog photos cut to `sizes` ((width, height), taken from the middle, resized if larger), as PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(INSTANCE_DIR.glob("*.jpg"))
    for i, (w, h) in enumerate(sizes):
        image = Image.open(sources[i % len(sources)]).convert("RGB")
        s = min(image.width / w, image.height / h)
        box = ((image.width - w * s) / 2, (image.height - h * s) / 2, (image.width + w * s) / 2,
               (image.height + h * s) / 2)
        image.resize((w, h), Image.Resampling.LANCZOS, box=box).save(folder / f"{i:02d}.png")
    return folder


# 3:2 and 2:3 (the dog photos cropped), and one square
MIXED = [(160, 107), (107, 160), (160, 107), (107, 160), (160, 160)]


# --- the bucket lists and each photo's bucket ----------------------------------------------------------------------
def test_kohya_buckets_at_512_are_kohyas_list():
    """kohya's defaults (256, 1024, 64) at 512: the buckets its sd-scripts log, (width, height), sides multiples of 64,
    area at most 512²."""
    found = {(w, h) for h, w in buckets.kohya_buckets(512, 256, 1024, 64)}
    half = {(256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704), (384, 640), (448, 576)}
    assert found == half | {(h, w) for w, h in half} | {(512, 512)}
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in found)


@pytest.mark.parametrize(("size", "bucket"), [
    ((107, 160), (48, 80)),  # (h, w): 3:2 -> 80 wide x 48 high (aspect 1.67, the nearest to 1.5)
    ((160, 107), (80, 48)),
    ((100, 100), (64, 64)),
    ((48, 80), (48, 80)),  # a listed size is its own bucket
    ((40, 400), (32, 128)),  # a panorama: the widest bucket
])
def test_kohya_assigns_the_nearest_aspect_ratio(size, bucket):
    settings = buckets.BucketSettings("kohya", 64, 16, 32, 128)
    assert buckets.place(settings, *size) == buckets.Placement(bucket)


def test_no_upscale_never_enlarges_and_shrinks_to_the_area():
    settings = buckets.BucketSettings("kohya", 64, 16, 32, 128, no_upscale=True)
    small = buckets.place(settings, 50, 70)  # smaller than 64² in area: kept at its size, cropped to multiples of 16
    assert small == buckets.Placement((48, 64), (70, 50))
    large = buckets.place(settings, 160, 240)  # shrunk to ~64² area, aspect kept
    (bh, bw), (rw, rh) = large.bucket, large.resized
    assert rw * rh <= 64 * 64 and abs(rw / rh - 1.5) < 0.05 and bh <= rh and bw <= rw and bh % 16 == bw % 16 == 0
    assert max(buckets.place(settings, 20, 600).resized) <= 128  # no side above --max_bucket_reso


def test_explicit_list_takes_diffusers_nearest_bucket():
    """diffusers' rule: least |h·w' - w·h'|, the last listed on a tie; --resolution plays no part."""
    listed = ((64, 96), (96, 64), (64, 64))
    settings = buckets.BucketSettings("list", 512, listed=listed)
    assert buckets.place(settings, 100, 151).bucket == (64, 96)
    assert buckets.place(settings, 151, 100).bucket == (96, 64)
    assert buckets.nearest_cross([(32, 32), (64, 64)], 10, 10) == (64, 64)  # a tie: the last
    assert buckets.parse_bucket_list(" 64,96 ; 96 ,64") == [(64, 96), (96, 64)]


def test_ladder_is_diffusers_aspect_ratios_capped_at_the_photos_own_size():
    ladder = buckets.diffusers_ladder(1024, 16)
    assert ladder[:3] == [(1024, 1024), (1152, 912), (912, 1152)]  # 1:1, 4:5, 5:4 at ~1024² pixels
    settings = buckets.BucketSettings("ladder", 1024, 64)
    assert buckets.place(settings, 1000, 1500).bucket == (832, 1280)  # 2:3 at 1000x1500's area, not upscaled past it
    assert buckets.place(settings, 3000, 4500).bucket == (832, 1280)  # capped at --resolution²: 1024² x 1.02
    assert buckets.place(settings, 200, 300).bucket == (192, 320)  # a small photo: a small bucket


# --- batches: one shape each, every row once per epoch, every process the same count ---------------------------------
@pytest.mark.parametrize("sizes", [[5, 2, 3], [1], [7], [1, 1, 1], [4, 4]])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("processes", [1, 2, 3])
def test_batches_are_one_bucket_and_processes_split_the_epoch_evenly(sizes, batch_size, processes):
    """Dealt by accelerate's own BatchSamplerShard (what `prepare` wraps a batch sampler in): every process gets the
    same number of batches, len(sampler) / P, each batch within one bucket, and together the processes see every
    row exactly once per epoch (repeats only when every batch is a single row, to fill the last round)."""
    from accelerate.data_loader import BatchSamplerShard

    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    sampler = BucketBatchSampler(groups, batch_size, processes, seed=7)
    assert len(sampler) % processes == 0
    for epoch in (0, 1, 5):
        sampler.select_epoch(epoch)
        shards = [list(BatchSamplerShard(sampler, processes, p)) for p in range(processes)]
        assert [len(s) for s in shards] == [sampler.batches_per_process()] * processes
        batches = [b for s in shards for b in s]
        assert all(len({groups[row] for row in b}) == 1 and 0 < len(b) <= batch_size for b in batches)
        rows = sorted(row for b in batches for row in b)
        if any(len(b) > 1 for b in batches):  # a batch could be split: nothing repeated
            assert rows == list(range(len(groups)))
        else:  # single rows only: the last round is filled with the epoch's first rows
            assert set(rows) == set(range(len(groups))) and len(rows) - len(groups) < processes


@pytest.mark.parametrize("settings", [
    buckets.BucketSettings("kohya", 64, 16, 32, 128),
    buckets.BucketSettings("kohya", 64, 16, 32, 128, no_upscale=True),
    buckets.BucketSettings("list", 64, listed=((48, 80), (80, 48), (64, 64))),
    buckets.BucketSettings("ladder", 64, 16),
], ids=["enable_bucket", "bucket_no_upscale", "aspect_ratio_buckets", "use_aspect_ratio_buckets"])
def test_each_flags_form_loads_every_photo_once_per_epoch_in_batches_of_one_shape(settings, tmp_path):
    """The real loader (dataset + batch sampler + collate) over photos of five shapes, batch 2, three epochs."""
    folder = photos(tmp_path / "p", [*MIXED, (200, 90), (90, 200)])
    examples = dbdata.read_examples(folder, "--instance_data_dir", PROMPT, 0, is_class=False)
    placements = [buckets.place(settings, e.image.height, e.image.width) for e in examples]
    assert len({p.bucket for p in placements}) >= 3
    dataset = buckets.BucketDataset(examples, [], placements, 64, center_crop=False, random_flip=True, seed=0)
    loader, sampler = buckets.bucketed_loader(dataset, 2, 1, seed=0)
    for epoch in range(3):
        dataset.select_epoch(epoch)
        sampler.select_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(sampler)
        rows = sorted(index for b in batches for _, index in b["rows"])
        assert rows == list(range(len(examples)))
        for b in batches:
            index = b["rows"][0][1]
            assert b["pixel_values"].shape[2:] == placements[index].bucket
            assert all(placements[i].bucket == placements[index].bucket for _, i in b["rows"])


def test_the_order_is_a_function_of_seed_and_epoch():
    groups = [0] * 6 + [1] * 5
    a, b = BucketBatchSampler(groups, 2, 1, 3), BucketBatchSampler(groups, 2, 1, 3)
    orders = []
    for epoch in (0, 1, 0):
        a.select_epoch(epoch)
        b.select_epoch(epoch)
        assert list(a) == list(b)
        orders.append(list(a))
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert [len(x) for x in orders[0]].count(1) == 1  # the 5-row bucket's last batch is kept, smaller


# --- views: cut to the bucket, masks and SDXL's time ids follow -----------------------------------------------------
def test_views_crop_to_the_bucket_and_time_ids_report_it(tmp_path):
    """A 160x80 photo in bucket 80 wide x 48 high: resized to cover it (96x48), random crops and flips; the SDXL time
    ids are (original h, w, the crop's top, its left in the resized photo, mirrored when flipped, the bucket's h, w),
    and a mask (white left half) takes the same resize, crop and flip."""
    folder = photos(tmp_path / "p", [(160, 80)])
    mask = np.zeros((80, 160), np.uint8)
    mask[:, :80] = 255
    Image.fromarray(mask).save(folder / "00-masklabel.png")
    examples = dbdata.read_examples(folder, "--instance_data_dir", PROMPT, 0, is_class=False, mask_source="masklabel")
    settings = buckets.BucketSettings("kohya", 64, 16, 32, 128)
    placement = buckets.place(settings, 80, 160)
    assert placement.bucket == (48, 80)
    dataset = buckets.BucketDataset(examples, [], [placement], 64, center_crop=False, random_flip=True, seed=1)
    resized = np.asarray(examples[0].image.resize((96, 48), Image.Resampling.LANCZOS)).astype(np.int16)
    seen = set()
    for epoch in range(16):
        dataset.select_epoch(epoch)
        item = dataset[0]["instance"]
        assert item["pixel_values"].shape == (3, 48, 80) and item["mask"].shape == (1, 48, 80)
        view = np.round((item["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int16)
        flipped = item["key"][2]
        if flipped:
            view = view[:, ::-1]
        left = next(x for x in range(17) if np.array_equal(resized[:, x:x + 80], view))
        reported = 96 - left - 80 if flipped else left
        assert item["time_ids"].tolist() == [80, 160, 0, reported, 48, 80]
        edge = 48 - left  # the mask's white half ends at x = 48 of the resized photo
        row = item["mask"][0, 24].numpy()
        row = row[::-1] if flipped else row
        assert row[edge - 2] > 0.9 and row[edge + 1] < 0.1
        assert item["key"][3:] == (48, 80)
        seen.add((flipped, left))
    assert len(seen) > 4 and {f for f, _ in seen} == {False, True}


def test_class_rows_take_their_instance_rows_bucket_and_the_cache_has_every_view(tmp_path):
    folder = photos(tmp_path / "p", [(160, 107), (107, 160)])
    instances = dbdata.read_examples(folder, "--instance_data_dir", PROMPT, 0, is_class=False)
    classes = dbdata.read_examples(photos(tmp_path / "c", [(64, 64)] * 3), "--class_data_dir", "a dog", 0,
                                   is_class=True)
    settings = buckets.BucketSettings("kohya", 64, 16, 32, 128)
    placements = [buckets.place(settings, e.image.height, e.image.width) for e in instances]
    dataset = buckets.BucketDataset(instances, classes, placements, 64, center_crop=True, random_flip=True, seed=0)
    assert len(dataset) == 3 and dataset.groups() == [(48, 80), (80, 48), (48, 80)]
    cached = dict(dataset.all_views())
    for epoch in range(4):
        dataset.select_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            bucket = dataset.groups()[i]
            for row in (item["instance"], item["class"]):
                assert row["pixel_values"].shape[1:] == bucket and row["time_ids"][4:].tolist() == list(bucket)
                assert torch.equal(cached[row["key"]], row["pixel_values"])  # the cache holds this very view
    batch = dbdata.collate([dataset[0], dataset[2]])
    assert batch["pixel_values"].shape == (4, 3, 48, 80) and batch["is_class"].tolist() == [False, False, True, True]


# --- bad input: one clear error, before any model loads -------------------------------------------------------------
def args_for(tmp_path, *extra):
    return ["--pretrained_model_name_or_path", "unused", "--instance_data_dir", str(INSTANCE_DIR), "--instance_prompt",
            PROMPT, "--output_dir", str(tmp_path / "out"), "--resolution", "64", *map(str, extra)]


@pytest.mark.parametrize(("extra", "message"), [
    ((*KOHYA_TINY[:1], "--min_bucket_reso", 128, "--max_bucket_reso", 64), "--min_bucket_reso 128 is above"),
    (("--min_bucket_reso", 32), "--min_bucket_reso given without --enable_bucket"),
    (("--bucket_no_upscale",), "--bucket_no_upscale given without --enable_bucket"),
    (("--aspect_ratio_buckets", "64,64"), "--aspect_ratio_buckets needs --use_aspect_ratio_buckets"),
    (("--use_aspect_ratio_buckets", "--aspect_ratio_buckets", "64x64"), "entry '64x64' is not 'height,width'"),
    (("--use_aspect_ratio_buckets", "--aspect_ratio_buckets", "64,64;0,64"), "entry '0,64'"),
    (("--enable_bucket", "--use_aspect_ratio_buckets"), "give one"),
    ((*KOHYA_TINY[:5], "--bucket_reso_steps", 12), "--bucket_reso_steps must be a multiple of 8"),
    (("--enable_bucket", "--min_bucket_reso", 40, "--max_bucket_reso", 128, "--bucket_reso_steps", 16),
     "--min_bucket_reso 40 must be a multiple of --bucket_reso_steps 16"),
    (KOHYA_TINY[:1], "--resolution 64 must lie between --min_bucket_reso 256 and --max_bucket_reso 1024"),
    (("--bucket_reso_steps", 16), "--bucket_reso_steps given without"),
])
def test_bad_bucket_flags(tmp_path, extra, message):
    with pytest.raises(ArgError) as e:
        parse_args(args_for(tmp_path, *extra))
    assert message in str(e.value)


@pytest.mark.parametrize(("extra", "sizes", "message"), [
    ((*KOHYA_TINY[:5], "--bucket_reso_steps", 8), MIXED,
     "--bucket_reso_steps 8: bucket sides must be multiples of 16 for this model"),
    (("--use_aspect_ratio_buckets", "--aspect_ratio_buckets", "64,64;40,64;48,72"), MIXED,
     "--aspect_ratio_buckets: 40,64; 48,72: bucket sides must be multiples of 16"),
(("--enable_bucket", "--min_bucket_reso", 48, "--max_bucket_reso", 128, "--bucket_reso_steps", 16,
      "--bucket_no_upscale"), [(40, 40), (47, 90)],
     "--bucket_no_upscale: every photo in --instance_data_dir"),
])
def test_settings_that_fit_no_photo_or_not_the_model_fail_before_it_loads(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                         extra, sizes, message):
    from dreamlora import train

    def never(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train, "load_frozen_models", never)
    folder = photos(tmp_path / "photos", sizes)
    assert train_in_process(tiny_model_dir, tmp_path / "out", *extra, instance_dir=folder) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error: ")
    assert not (tmp_path / "out" / "run.json").exists()


# --- end to end on the tiny model -----------------------------------------------------------------------------------
def test_bucketed_training_with_class_images_loads_in_diffusers(tiny_model_dir, tmp_path, monkeypatch):
    """kohya's buckets, batch 2, prior preservation, cached latents and random flips: every UNet forward is one
    shape, both non-square buckets train (latents 6x10 and 10x6), and unmodified diffusers gives the image
    pipelines.sample gives."""
    from diffusers import UNet2DConditionModel

    from pipelines.diffusion.sample import AdapterSpec, apply_adapters, generate, load_pipeline

    shapes = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, *args, **kw):
        if self.training:
            shapes.append(tuple(sample.shape))
        return forward(self, sample, *args, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    folder = photos(tmp_path / "photos", MIXED)
    out = tmp_path / "run"
    assert train_in_process(tiny_model_dir, out, *KOHYA_TINY, "--train_batch_size", 2, "--max_train_steps", 6,
                            "--learning_rate", 5e-3, "--cache_latents", "--random_flip", "--with_prior_preservation",
                            "--class_data_dir", tmp_path / "class", "--class_prompt", "a photo of dog",
                            "--num_class_images", 2, "--checkpointing_steps", 100, instance_dir=folder) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["buckets"] == {"48x80": 2, "64x64": 1, "80x48": 2} and run["steps"] == 6
    assert len(shapes) == 6 and {s[2:] for s in shapes} == {(6, 10), (10, 6), (8, 8)}
    assert all(s[0] in (2, 4) for s in shapes)  # instance rows + their class rows, one bucket per batch

    monkeypatch.undo()
    pipe = load_pipeline(str(tiny_model_dir), "cpu")
    pipe.set_progress_bar_config(disable=True)
    apply_adapters(pipe, [AdapterSpec(out)])
    generate(pipe, [PROMPT], tmp_path / "ours", num_inference_steps=4, height=48, width=80)
    ours = np.asarray(Image.open(tmp_path / "ours" / "0000_0.png")).astype(np.int16)
    reference = load_pipeline(str(tiny_model_dir), "cpu")
    reference.set_progress_bar_config(disable=True)
    base = reference(PROMPT, num_inference_steps=4, height=48, width=80, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    reference.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    theirs = reference(PROMPT, num_inference_steps=4, height=48, width=80, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(ours - np.round(base * 255)).max() > 10  # the adapter changes the image
    assert np.abs(ours - np.round(theirs * 255)).max() <= 2


def test_sdxl_time_ids_follow_the_bucket_and_the_crop(tiny_sdxl_dir, tmp_path, monkeypatch):
    """diffusers' explicit list on the tiny SDXL model (sides multiples of 32): a 201x90 photo takes 64x96 (h x w),
    resized to 143x64 and center-cropped at left 23 (24 measured in the mirrored photo); a 90x201 one the transpose."""
    from diffusers import UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kw):
        if self.training:
            seen.extend((tuple(sample.shape[2:]), tuple(row)) for row in added_cond_kwargs["time_ids"].tolist())
        return forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    folder = photos(tmp_path / "photos", [(201, 90), (90, 201)])
    assert train_in_process(tiny_sdxl_dir, tmp_path / "out", "--use_aspect_ratio_buckets", "--aspect_ratio_buckets",
                            "64,96;96,64;64,64", "--max_train_steps", 8, "--random_flip", "--checkpointing_steps", 100,
                            "--no_kohya_format", instance_dir=folder) == 0
    assert set(seen) == {((8, 12), (90, 201, 0, 23, 64, 96)), ((8, 12), (90, 201, 0, 24, 64, 96)),
                         ((12, 8), (201, 90, 23, 0, 96, 64))}


@pytest.mark.slow  # a repeat of the core's check for this feature: `pytest -m slow`
def test_sigkill_then_resume_with_buckets_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Random crops and flips, batch 2 over buckets of 2, 1 and 2 photos (3 batches an epoch), a checkpoint
    mid-epoch: the resumed run's adapter equals the uninterrupted one's."""
    folder = photos(tmp_path / "photos", MIXED)
    common = [*KOHYA_TINY, "--train_batch_size", 2, "--random_flip", "--max_train_steps", 8,
              "--checkpointing_steps", 4, "--learning_rate", 1e-3, "--train_text_encoder"]

    def cmd(out, *extra):
        return [a for a in train_cmd(tiny_model_dir, out, *common, *extra, instance_dir=folder) if a != "--center_crop"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(cmd(reference), env=env, check=True, capture_output=True, timeout=600)
    kill_after_checkpoint(cmd(killed), killed, 4, env)
    assert (killed / "checkpoint-4").is_dir() and not (killed / "unet_adapter.safetensors").exists()
    assert json.loads((killed / "checkpoint-4" / "progress.json").read_text())["batch_in_epoch"] == 1  # mid-epoch
    subprocess.run(cmd(killed, "--resume_from_checkpoint", "latest"), env=env, check=True, capture_output=True,
                   timeout=600)
    for component in ("unet", "text_encoder"):
        a = load_file(reference / f"{component}_adapter.safetensors")
        b = load_file(killed / f"{component}_adapter.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert json.loads((killed / "run.json").read_text())["resumed_from"]


SPY = """
import atexit, json, os, sys
sys.path.insert(0, {root!r})
from pipelines.diffusion import buckets
seen, collate = [], buckets.collate
def spy(items):
    batch = collate(items)
    seen.append({{"rows": batch["rows"], "shape": list(batch["pixel_values"].shape)}})
    return batch
buckets.collate = spy
def record():
    with open(os.path.join({out!r}, "seen-" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump(seen, f)
atexit.register(record)
from dreamlora import train
sys.exit(train.cli())
"""


@pytest.mark.slow  # a repeat of the core's check for this feature: `pytest -m slow`
def test_two_processes_see_as_many_batches_and_together_cover_each_epoch(tiny_model_dir, tmp_path):
    """Two gloo processes, 5 photos in buckets of 2, 1 and 2 at batch 2: 3 batches split to 4, 2 per process per
    epoch. Recorded inside each process: the same number of batches, each one shape, and per epoch the two together
    see every photo exactly once."""
    folder = photos(tmp_path / "photos", MIXED)
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "spy_train.py"
    script.write_text(SPY.format(root=str(ROOT), out=str(out)))
    cmd = [*launch_two(), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           *train_cmd(tiny_model_dir, out, *KOHYA_TINY, "--train_batch_size", 2, "--num_train_epochs", 3,
                      instance_dir=folder)[2:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["steps"] == 6  # 3 epochs of 2 batches per process
    seen = [json.loads((out / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6
    for epoch in range(3):
        batches = [b for s in seen for b in s[2 * epoch: 2 * epoch + 2]]
        assert sorted(index for b in batches for _, index in b["rows"]) == list(range(5))
        assert all(b["shape"][0] == len(b["rows"]) for b in batches)
    assert {tuple(b["shape"][2:]) for s in seen for b in s} == {(48, 80), (80, 48), (64, 64)}

