"""Aspect-ratio buckets: each photo trains at a (height, width) close to its own shape instead of a square crop.

Three ways to get the buckets (the flags are kohya's sd-scripts' and diffusers' DreamBooth scripts' names):

- kohya (`--enable_bucket --min_bucket_reso --max_bucket_reso --bucket_reso_steps`, defaults 256, 1024, 64): the
  square of side ⌊R/s⌋·s (R = --resolution, s = the step) and, for every width w from the min to the max in steps of
  s, the height min(max, ⌊R²/w/s⌋·s) if it is at least the min, with its transpose: sides multiples of s, area at
  most R². At 512 (w x h): 256x832 to 256x1024, 320x704, 320x768, 384x640, 448x576, 512x512 and their transposes.
  A photo takes its exact size
  if that is a bucket, else the bucket of the nearest aspect ratio |w/h − w'/h'| (the first in kohya's (w, h)
  order on a tie), and is resized to cover it (enlarged where smaller) and cropped.
- kohya with `--bucket_no_upscale`: no fixed list. A photo larger than R² in area (or with a side over the max) is
  shrunk, aspect kept, to fit; its bucket is its size rounded down to multiples of s, cropped out without a further
  resize, so a photo is never enlarged. A photo whose bucket would have a side under --min_bucket_reso is left out
  with a warning (kohya would train it at that tiny size); if that leaves no photo, the run is refused.
- diffusers (`--use_aspect_ratio_buckets --aspect_ratio_buckets 'h,w;h,w'`): the listed (height, width) pairs; a
  photo takes the one minimising |h·w' − w·h'| (the last listed on a tie, as diffusers' `find_nearest_bucket`),
  resized to cover it (enlarged where smaller) and cropped. --resolution then only sets the preview images, the
  class images generated, and the validation loss's square crops.
- diffusers (`--use_aspect_ratio_buckets` alone): per photo, the ladder of diffusers' eleven aspect ratios (1:1,
  4:5, 5:4, 2:3, 3:2, 3:4, 4:3, 9:16, 16:9, 1:2, 2:1) at an area of min(R, √(h·w))², sides rounded to the nearest
  multiple of --bucket_reso_steps (diffusers uses 16, Flux's factor; here 64 by default, SD's), nearest by the same
  rule: a photo smaller than R² gets a smaller bucket rather than an enlargement.

Every side must be a multiple of the model's size factor, the VAE's (8) times the UNet's down-samplings: 64 for SD
1.x/2.x, 32 for SDXL, 16 for the tiny test model; it is read from the model's configs and checked before loading.

Batches: every batch holds rows of one bucket (`pipelines.trainer.bucket_batches`: the shuffle, the last partial
batch kept smaller, the split that gives every process the same number of batches). Prior preservation: a class
image is paired with the instance row of its dataset index, as without buckets, and cropped to that row's bucket
(diffusers' rule in its bucketed scripts): one batch, one shape. Class images are resized to cover their bucket
even with --bucket_no_upscale, which concerns the photos. SDXL's time ids follow the view: original size, the
crop's top-left in the resized photo (mirrored when flipped), target size = the bucket; masks take the same resize
and crop. With --cache_latents, a latent is cached per (image, bucket, flip).
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter
from dataclasses import dataclass

import torch

from dreamlora.errors import ArgError, DataError
from pipelines.diffusion.data import DreamBoothDataset, Example, View, collate, crop_view
from pipelines.trainer.bucket_batches import BucketBatchSampler

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (height, width)
KOHYA_DEFAULTS = {"min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64}
# diffusers' training_utils._DEFAULT_BUCKET_ASPECT_RATIOS, as (width, height)
DIFFUSERS_ASPECTS = ((1, 1), (4, 5), (5, 4), (2, 3), (3, 2), (3, 4), (4, 3), (9, 16), (16, 9), (1, 2), (2, 1))


@dataclass(frozen=True)
class BucketSettings:
    """What the flags ask for: `kind` is "kohya", "list" (an explicit --aspect_ratio_buckets) or "ladder"."""

    kind: str
    resolution: int
    steps: int = 64
    min_reso: int = 256
    max_reso: int = 1024
    no_upscale: bool = False
    listed: tuple[Size, ...] = ()

    @property
    def flag(self) -> str:
        names = {"kohya": "--enable_bucket", "list": "--aspect_ratio_buckets"}
        return names.get(self.kind, "--use_aspect_ratio_buckets")


@dataclass(frozen=True)
class Placement:
    """Where a photo trains: its bucket, and the size it is resized to before the crop (None: just covering it)."""

    bucket: Size
    resized: tuple[int, int] | None = None  # (width, height), PIL's order


def parse_bucket_list(text: str) -> list[Size]:
    """'h,w;h,w' -> [(h, w), ...]; a ValueError naming the entry that is not two positive integers."""
    out = []
    for entry in text.strip().split(";"):
        match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", entry)
        if not match or 0 in (int(match[1]), int(match[2])):
            raise ValueError(f"--aspect_ratio_buckets entry {entry.strip()!r} is not 'height,width' (two positive "
                             f"integers), in {text!r}")
        out.append((int(match[1]), int(match[2])))
    return out


def settings_from(args) -> BucketSettings | None:
    """The run's bucket settings from its flags (train_args checked them), or None without bucketing."""
    if args.enable_bucket:
        return BucketSettings("kohya", args.resolution, args.bucket_reso_steps, args.min_bucket_reso,
                              args.max_bucket_reso, args.bucket_no_upscale)
    if args.aspect_ratio_buckets:
        return BucketSettings("list", args.resolution, listed=tuple(parse_bucket_list(args.aspect_ratio_buckets)))
    if args.use_aspect_ratio_buckets:
        return BucketSettings("ladder", args.resolution, args.bucket_reso_steps)
    return None


def kohya_buckets(resolution: int, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """kohya's bucket list (see the module's note), as (height, width), in kohya's (width, height) order."""
    area = resolution * resolution
    square = resolution // steps * steps
    found = {(square, square)}
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, area // width // steps * steps)
        if height >= min_reso:
            found |= {(height, width), (width, height)}
    return sorted(found, key=lambda hw: (hw[1], hw[0]))


def diffusers_ladder(resolution: int, steps: int) -> list[Size]:
    """diffusers' `generate_aspect_ratio_buckets`: its aspect ratios at about `resolution`² pixels, each side rounded
    to the nearest multiple of `steps` (at least `steps`), first occurrences kept."""
    out: list[Size] = []
    for rw, rh in DIFFUSERS_ASPECTS:
        height = math.sqrt(resolution * resolution * rh / rw)
        size = tuple(max(steps, round(side / steps) * steps) for side in (height, height * rw / rh))
        if size not in out:
            out.append(size)
    return out


def nearest_aspect(buckets: list[Size], height: int, width: int) -> Size:
    """kohya's choice: the photo's own size if listed, else the least |w/h − w'/h'|, the first on a tie."""
    if (height, width) in buckets:
        return height, width
    return min(buckets, key=lambda hw: abs(hw[1] / hw[0] - width / height))


def nearest_cross(buckets: list[Size], height: int, width: int) -> Size:
    """diffusers' `find_nearest_bucket`: the least |h·w' − w·h'|, the last on a tie."""
    best = min(abs(height * w - width * h) for h, w in buckets)
    return [hw for hw in buckets if abs(height * hw[1] - width * hw[0]) == best][-1]


def no_upscale_placement(settings: BucketSettings, height: int, width: int) -> Placement:
    """--bucket_no_upscale: shrink to fit R² and the max side if needed, never enlarge; the bucket is the
    resized size rounded down to steps (floors: rounding up could enlarge past the area)."""
    scale = min(1.0, settings.resolution / math.sqrt(height * width), settings.max_reso / max(height, width))
    resized = (math.floor(width * scale + 1e-6), math.floor(height * scale + 1e-6))
    step = settings.steps
    return Placement((resized[1] // step * step, resized[0] // step * step), resized)


def place(settings: BucketSettings, height: int, width: int) -> Placement:
    """The bucket of a photo of `height` x `width` (see the module's note)."""
    if settings.kind == "kohya" and settings.no_upscale:
        return no_upscale_placement(settings, height, width)
    if settings.kind == "kohya":
        buckets = kohya_buckets(settings.resolution, settings.min_reso, settings.max_reso, settings.steps)
        return Placement(nearest_aspect(buckets, height, width))
    if settings.kind == "list":
        return Placement(nearest_cross(list(settings.listed), height, width))
    capped = min(settings.resolution, round(math.sqrt(height * width)))
    return Placement(nearest_cross(diffusers_ladder(capped, settings.steps), height, width))


def size_multiple(model_path: str, revision: str | None = None, vae_path: str | None = None) -> int | None:
    """What every image side must be a multiple of for this model: 2^(VAE blocks - 1) · 2^(UNet down blocks - 1),
    read from the configs without loading weights (None if they cannot be read: loading the model reports that)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(model_path, subfolder="unet", revision=revision)
        vae = (AutoencoderKL.load_config(vae_path) if vae_path else
               AutoencoderKL.load_config(model_path, subfolder="vae", revision=revision))
    except (OSError, ValueError):
        return None
    return 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["down_block_types"]) - 1)


def check_model_multiple(settings: BucketSettings, multiple: int | None) -> None:
    """Every bucket side a multiple of the model's factor, or one error naming the flag."""
    if multiple is None:
        return
    why = (f"bucket sides must be multiples of {multiple} for this model (its VAE's factor times its UNet's "
           f"down-samplings; SD 1.x/2.x: 64, SDXL: 32)")
    if settings.kind == "list":
        bad = [f"{h},{w}" for h, w in settings.listed if h % multiple or w % multiple]
        if bad:
            raise ArgError(f"--aspect_ratio_buckets: {'; '.join(bad)}: {why}")
    elif settings.steps % multiple:
        raise ArgError(f"--bucket_reso_steps {settings.steps}: {why}")


def place_instances(settings: BucketSettings, examples: list[Example], folder) -> tuple[list[Example], list[Placement]]:
    """Each photo's placement; photos --bucket_no_upscale leaves out are dropped with a warning, and none left is
    bad input."""
    kept, placements = [], []
    for example in examples:
        placement = place(settings, example.image.height, example.image.width)
        if min(placement.bucket) < (settings.min_reso if settings.kind == "kohya" else 1):
            log.warning("%s is %dx%d: with --bucket_no_upscale its bucket %dx%d (w x h) is under --min_bucket_reso "
                        "%d, so it is left out", example.path, example.image.width, example.image.height,
                        placement.bucket[1], placement.bucket[0], settings.min_reso)
            continue
        if placement.resized is None and (example.image.height < placement.bucket[0]
                                          or example.image.width < placement.bucket[1]):
            log.warning("%s is %dx%d, smaller than its bucket %dx%d (w x h): upscaling it", example.path,
                        example.image.width, example.image.height, placement.bucket[1], placement.bucket[0])
        kept.append(example)
        placements.append(placement)
    if not kept:
        raise DataError(f"--bucket_no_upscale: every photo in --instance_data_dir {str(folder)!r} is smaller than "
                        f"--min_bucket_reso {settings.min_reso} on a side once rounded down to --bucket_reso_steps "
                        f"{settings.steps}: lower --min_bucket_reso or drop --bucket_no_upscale")
    return kept, placements


def plan(args, examples: list[Example]) -> tuple[list[Example], list[Placement] | None]:
    """main()'s hook, before any model loads: (the photos that train, their placements), or (examples, None)
    without bucketing. Bad settings for this model or these photos fail here, with one error."""
    settings = settings_from(args)
    if settings is None:
        return examples, None
    check_model_multiple(settings, size_multiple(args.pretrained_model_name_or_path, args.revision,
                                                 args.pretrained_vae_model_name_or_path))
    kept, placements = place_instances(settings, examples, args.instance_data_dir)
    counts = Counter(p.bucket for p in placements)
    log.info("aspect-ratio buckets (%s), photos per bucket (h x w): %s", settings.flag,
             ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(counts.items())))
    return kept, placements


class BucketDataset(DreamBoothDataset):
    """`DreamBoothDataset` whose rows crop to their bucket: row i is instance photo i mod N at its placement, and
    with prior preservation class image i mod M, cropped to the same bucket. Cache keys gain the bucket."""

    def __init__(self, instances: list[Example], classes: list[Example], placements: list[Placement],
                 resolution: int, center_crop: bool, random_flip: bool, seed: int, captions=None):
        super().__init__(instances, classes, resolution, center_crop, random_flip, seed, captions)
        self.placements = placements

    def bucket(self, index: int) -> Size:
        return self.placements[index % len(self.instances)].bucket

    def groups(self) -> list[Size]:
        """The bucket of every row (what the batch sampler groups by)."""
        return [self.bucket(i) for i in range(len(self))]

    def summary(self) -> dict[str, int]:
        """run.json's `buckets`: instance photos per bucket, "HxW"."""
        counts = Counter(p.bucket for p in self.placements)
        return {f"{h}x{w}": n for (h, w), n in sorted(counts.items())}

    def _crop(self, example: Example, index: int, rng: random.Random, flip: bool | None = None) -> View:
        placement = self.placements[index % len(self.instances)]
        center, random_flip = (True, False) if flip is not None else (self.center_crop, self.random_flip)
        return crop_view(example.image, placement.bucket, center, random_flip, rng, flip=flip, mask=example.mask,
                         resized=None if example.is_class else placement.resized)

    def _view(self, examples: list[Example], index: int, stream: int) -> dict:
        item = super()._view(examples, index, stream)
        item["key"] = (*item["key"], *self.bucket(index))
        return item

    def _cache_views(self):
        """(key, view) of every (stream, image, flip, bucket) a batch can ask for, center-cropped (latent caching)."""
        seen = set()
        for index in range(len(self)):
            for stream, examples in ((0, self.instances), (1, self.classes)):
                for flip in ((False, True) if self.random_flip else (False,)) if examples else ():
                    key = (stream, index % len(examples), flip, *self.bucket(index))
                    if key not in seen:
                        seen.add(key)
                        yield key, self._crop(examples[index % len(examples)], index, random.Random(0), flip)

    def all_views(self):
        for key, view in self._cache_views():
            yield key, view.pixels

    def all_masks(self):
        for key, view in self._cache_views():
            yield key, torch.ones_like(view.pixels[:1]) if view.mask is None else view.mask


def bucketed_loader(dataset: BucketDataset, batch_size: int, num_processes: int,
                    seed: int) -> tuple[torch.utils.data.DataLoader, BucketBatchSampler]:
    """A loader whose every batch is one bucket; the sampler's `select_epoch` sets the order."""
    sampler = BucketBatchSampler(dataset.groups(), batch_size, num_processes, seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate), sampler
