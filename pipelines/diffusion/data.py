"""DreamBooth data: instance and class images with their prompts, read robustly and augmented reproducibly.

Images are decoded the way a photo viewer shows them: EXIF orientation applied, palette and alpha
flattened on white, 16-bit scaled to 8-bit, grayscale expanded to RGB. Unreadable files are skipped with a
warning while others remain; images smaller than the training resolution are upscaled with a warning.
Augmentation (random crop, flip) is a pure function of (seed, epoch, index), so a resumed run sees exactly
the pixels an uninterrupted one would.

Loss masks (`--masked_loss`): `<stem>-masklabel.png` beside a photo, as OneTrainer names it (white trains, black is
ignored, grey weighs in between; read as 8-bit luminance), or with `--alpha_mask` the photo's alpha channel, as
kohya's. A mask goes through the very crop and flip drawn for its photo. Mask files are never training photos.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dreamlora.errors import DataError
from eval.image_files import IMAGE_SUFFIXES, MASK_SUFFIX, is_mask_file  # one list for the trainer, scorer and app
from pipelines.diffusion.captions import CaptionAugment
from pipelines.trainer.order import stable_seed
from pipelines.trainer.text_files import read_text

log = logging.getLogger(__name__)

CAPTION_KEYS = ("text", "caption", "prompt")
MASK_SOURCES = {"masklabel": "--masked_loss", "alpha": "--alpha_mask"}  # where masks come from -> the flag


def _decode(path: Path) -> Image.Image:
    """Open and decode `path` now (a truncated file fails here, not in the middle of training), upright as its
    EXIF orientation says, 16-bit grey scaled to 8-bit."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return im


def load_photo(path: Path) -> tuple[Image.Image, Image.Image | None]:
    """`path` as 8-bit RGB as a viewer shows it (alpha flattened on white), and its alpha channel ("L") if it
    has one (a palette's transparent colour counts). Raises on corrupt/truncated files."""
    im = _decode(path)
    if im.mode == "P":  # only a palette with a transparent colour has an alpha channel
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    alpha = None
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        alpha = im.getchannel("A")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB"), alpha


def load_rgb(path: Path) -> Image.Image:
    """Decode `path` to an 8-bit RGB image as a viewer would show it. Raises on corrupt/truncated files."""
    return load_photo(path)[0]


def mask_file(photo: Path) -> Path:
    return photo.with_name(photo.stem + MASK_SUFFIX + ".png")


def load_mask(path: Path, photo: Path, photo_size: tuple[int, int]) -> Image.Image:
    """A mask file as 8-bit grey ("L": 255 trains fully, 0 not at all), upright as its EXIF says; one clear error
    naming both files if it cannot be read or its size is not its photo's."""
    try:
        mask = _decode(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"mask {path} (of {photo}) could not be read: {e}") from None
    if mask.size != photo_size:
        raise DataError(f"mask {path} is {mask.width}x{mask.height} but its photo {photo} is "
                        f"{photo_size[0]}x{photo_size[1]}: a mask must have its photo's size")
    return mask.convert("L")


def list_images(folder: str | Path | None, flag: str) -> list[Path]:
    """Image files directly in `folder`, sorted; a clear error naming `flag` if there are none."""
    if not folder:
        raise DataError(f"{flag} is required")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{flag} {str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_mask_file(p))
    if not files:
        raise DataError(f"{flag} {str(folder)!r} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_captions(folder: Path) -> dict[str, str]:
    """Per-image captions: `metadata.jsonl` rows ({"file_name", "text"|"caption"|"prompt"}) and `<image>.txt`
    files beside the images (a .txt wins over metadata.jsonl)."""
    captions: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(read_text(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = next(k for k in CAPTION_KEYS if k in row)
                captions[Path(row["file_name"]).name] = str(row[key])
            except (json.JSONDecodeError, KeyError, StopIteration):
                raise DataError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}}") from None
    for txt in folder.glob("*.txt"):
        for suffix in IMAGE_SUFFIXES:
            for name in (txt.stem + suffix, txt.stem + suffix.upper()):
                if (folder / name).is_file():
                    captions[name] = read_text(txt).strip()
    return captions


@dataclass
class Example:
    image: Image.Image
    prompt: str
    is_class: bool
    path: Path
    mask: Image.Image | None = None  # "L", the photo's size; None: the photo counts fully


def read_examples(folder: str | Path | None, flag: str, prompt: str, resolution: int, is_class: bool,
                  use_captions: bool = True, mask_source: str | None = None) -> list[Example]:
    """Decode every image in `folder` once; skip unreadable ones with a warning; error if none remain.

    `mask_source` ("masklabel" or "alpha", see `MASK_SOURCES`) also reads each photo's loss mask. A photo without
    one counts fully (with --alpha_mask, a warning names each photo that has no alpha channel); no mask at all
    in the folder is an error, since the flag would then change nothing."""
    files = list_images(folder, flag)
    captions = read_captions(Path(folder)) if use_captions else {}
    examples = []
    for path in files:
        try:
            image, alpha = load_photo(path)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            log.warning("skipping unreadable image %s: %s", path, e)
            continue
        if min(image.size) < resolution:
            log.warning("%s is %dx%d, smaller than --resolution %d: upscaling it", path, *image.size, resolution)
        examples.append(Example(image, captions.get(path.name, prompt), is_class, path,
                                photo_mask(path, image.size, alpha, mask_source)))
    if not examples:
        raise DataError(f"{flag} {str(folder)!r}: none of its {len(files)} image files could be read")
    if mask_source and all(e.mask is None for e in examples):
        what = "no photo has an alpha channel" if mask_source == "alpha" else \
            f"no photo has a <name>{MASK_SUFFIX}.png mask beside it"
        raise DataError(f"{MASK_SOURCES[mask_source]}: {flag} {str(folder)!r}: {what}")
    return examples


def photo_mask(path: Path, size: tuple[int, int], alpha: Image.Image | None, source: str | None) -> Image.Image | None:
    """The loss mask of the photo at `path` from `source` (None: masks are off, or this photo has none)."""
    if source == "alpha":
        if alpha is None:
            log.warning("%s has no alpha channel: it counts fully (--alpha_mask)", path)
        return alpha
    if source == "masklabel" and mask_file(path).is_file():
        return load_mask(mask_file(path), path, size)
    return None


@dataclass
class View:
    """One augmented training view: the pixels, its loss mask, and what SDXL's micro-conditioning says about it."""

    pixels: torch.Tensor  # (3, H, W) in [-1, 1]: (resolution, resolution), or an aspect-ratio bucket's (h, w)
    flipped: bool
    original_size: tuple[int, int]  # (height, width) of the photo as decoded, before any resize
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized photo; mirrored when flipped
    mask: torch.Tensor | None = None  # (1, H, W) in [0, 1], or None without a mask

    @property
    def target_size(self) -> tuple[int, int]:
        """(height, width) of the view: SDXL's target size."""
        return tuple(self.pixels.shape[-2:])


def crop_view(image: Image.Image, resolution: int | tuple[int, int], center_crop: bool, random_flip: bool,
              rng: random.Random, flip: bool | None = None, mask: Image.Image | None = None,
              resized: tuple[int, int] | None = None) -> View:
    """Resize the photo to cover `resolution` (a square side, or an aspect-ratio bucket's (height, width)), crop
    it to that size, maybe flip (`flip` forces the decision: latent caching encodes both orientations); `resized`
    (width, height) sets the resize instead (kohya's --bucket_no_upscale crops without enlarging). A flip mirrors
    the crop's left edge as kohya's sd-scripts do: it is measured in the mirrored photo, width - left - crop width
    (diffusers' SDXL example scripts write resolution - left, measured on the crop, which is not where the crop
    sits).

    `mask` (the photo's size) gets the same resize, crop and flip. The draws do not depend on the mask, so a photo
    gets the same view with or without one. The mask is resampled with a box filter (an area average) down and
    bilinear up: the photo's Lanczos/bicubic would ring past 0 and 1 at a mask's hard edges."""
    original_size = (image.height, image.width)
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if resized is None:  # the smallest scale that covers the target (for a square: the short side to it)
        scale = max(height / image.height, width / image.width)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    else:
        scale, size = resized[0] / image.width, resized
    image = image.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    if center_crop:
        left, top = (image.width - width) // 2, (image.height - height) // 2
    else:
        left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    if flip is None:
        flip = random_flip and rng.random() < 0.5
    box = (left, top, left + width, top + height)
    image = image.crop(box)
    if flip:
        image = ImageOps.mirror(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
    weights = None
    if mask is not None:
        mask = mask.resize(size, Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.BOX).crop(box)
        if flip:
            mask = ImageOps.mirror(mask)
        weights = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None] / 255.0  # (1, H, W)
    crop_left = size[0] - left - width if flip else left
    return View(pixels / 127.5 - 1.0, flip, original_size, (top, crop_left), weights)


def augment(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
            rng: random.Random, flip: bool | None = None) -> tuple[torch.Tensor, bool]:
    """`crop_view`'s CHW float pixels in [-1, 1] and whether it was flipped."""
    view = crop_view(image, resolution, center_crop, random_flip, rng, flip)
    return view.pixels, view.flipped


def augment_with_mask(image: Image.Image, mask: Image.Image | None, resolution: int, center_crop: bool,
                      random_flip: bool, rng: random.Random, flip: bool | None = None
                      ) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """`crop_view`'s pixels, flip and mask ((1, H, W) in [0, 1], or None without a mask)."""
    view = crop_view(image, resolution, center_crop, random_flip, rng, flip, mask)
    return view.pixels, view.flipped, view.mask


def center_crops(examples: list[Example], resolution: int) -> torch.Tensor:
    """(N, 3, resolution, resolution) pixels in [-1, 1]: each example resized and center-cropped, never flipped, the
    fixed view that measurements compare on (the composition's objective, the learning tests)."""
    return torch.stack([augment(e.image, resolution, True, False, random.Random(0))[0] for e in examples])


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance examples, each paired with a class example when prior preservation is on (as diffusers'
    script does: one batch holds both halves). Call `select_epoch` so augmentation varies per epoch. (Not
    named `set_epoch`: accelerate calls that with its own count of loader passes, which restarts at 0 after
    a resume and would replay epoch 0's order.)"""

    def __init__(self, instances: list[Example], classes: list[Example], resolution: int, center_crop: bool,
                 random_flip: bool, seed: int, captions: CaptionAugment | None = None):
        self.instances, self.classes = instances, classes
        self.captions = captions  # instance rows only: class rows keep the class prompt
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.epoch = 0
        # rows carry loss masks once any photo has one (class rows and photos without one: a mask of ones)
        self.masked = any(e.mask is not None for e in instances + classes)

    def select_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def _crop(self, example: Example, index: int, rng: random.Random) -> View:
        """The view of `example` for dataset row `index` (`buckets.BucketDataset` crops to the row's bucket)."""
        return crop_view(example.image, self.resolution, self.center_crop, self.random_flip, rng, mask=example.mask)

    def _view(self, examples: list[Example], index: int, stream: int) -> dict:
        rng = random.Random(stable_seed(self.seed, self.epoch, index, stream))
        example = examples[index % len(examples)]
        view = self._crop(example, index, rng)
        prompt = example.prompt
        if stream == 0 and self.captions is not None and self.captions.active:
            prompt = self.captions(prompt, self.epoch, stream, index)
        # SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w) of this very view
        time_ids = torch.tensor([*view.original_size, *view.crop_top_left, *view.target_size],
                                dtype=torch.float32)  # (6,)
        item = {"pixel_values": view.pixels, "prompt": prompt, "is_class": example.is_class,
                "key": (stream, index % len(examples), view.flipped), "row": (stream, index), "time_ids": time_ids}
        if self.masked:
            item["mask"] = torch.ones_like(view.pixels[:1]) if view.mask is None else view.mask
        return item

    def __getitem__(self, index: int) -> dict:
        item = {"instance": self._view(self.instances, index, 0)}
        if self.classes:
            item["class"] = self._view(self.classes, index, 1)
        return item

    def all_views(self):
        """(key, pixels) for every image and every orientation a batch can ask for (latent caching)."""
        for stream, examples in ((0, self.instances), (1, self.classes)):
            for i, example in enumerate(examples):
                for flip in (False, True) if self.random_flip else (False,):
                    pixels, _ = augment(example.image, self.resolution, True, False, random.Random(0), flip=flip)
                    yield (stream, i, flip), pixels

    def all_masks(self):
        """(key, mask (1, H, W)) for the same views as `all_views`, cut by the same call (latent caching keeps
        them beside the latents); a photo without a mask, and every class image, gets ones."""
        for stream, examples in ((0, self.instances), (1, self.classes)):
            for i, example in enumerate(examples):
                for flip in (False, True) if self.random_flip else (False,):
                    pixels, _, mask = augment_with_mask(example.image, example.mask, self.resolution, True, False,
                                                        random.Random(0), flip=flip)
                    yield (stream, i, flip), torch.ones_like(pixels[:1]) if mask is None else mask


def collate(items: list[dict]) -> dict:
    """Instance rows first, then class rows: {"pixel_values": (B, 3, H, W), "prompts", "is_class": (B,),
    "keys" (latent-cache keys), "rows" ((stream, dataset index): what seeds each row's noise), "time_ids": (B, 6)
    (SDXL's original size, crop top-left and target size of each row)}, and with loss masks "masks": (B, 1, H, W) in
    [0, 1]."""
    rows = [it["instance"] for it in items] + [it["class"] for it in items if "class" in it]
    batch = {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
             "time_ids": torch.stack([r["time_ids"] for r in rows]),
             "prompts": [r["prompt"] for r in rows], "keys": [r["key"] for r in rows],
             "rows": [r["row"] for r in rows], "is_class": torch.tensor([r["is_class"] for r in rows])}
    if "mask" in rows[0]:
        batch["masks"] = torch.stack([r["mask"] for r in rows])
    return batch
