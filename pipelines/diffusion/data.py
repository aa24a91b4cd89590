"""DreamBooth data: instance and class images with their prompts, read robustly and augmented reproducibly.

Images are decoded the way a photo viewer shows them: EXIF orientation applied, palette and alpha
flattened on white, 16-bit scaled to 8-bit, grayscale expanded to RGB. Unreadable files are skipped with a
warning while others remain; images smaller than the training resolution are upscaled with a warning.
Augmentation (random crop, flip) is a pure function of (seed, epoch, index), so a resumed run sees exactly
the pixels an uninterrupted one would.
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
from eval.image_files import IMAGE_SUFFIXES  # one list for the trainer, the scorer and the app
from pipelines.trainer.order import stable_seed
from pipelines.trainer.text_files import read_text

log = logging.getLogger(__name__)

CAPTION_KEYS = ("text", "caption", "prompt")


def load_rgb(path: Path) -> Image.Image:
    """Decode `path` to an 8-bit RGB image as a viewer would show it. Raises on corrupt/truncated files."""
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not in the middle of training
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im.convert("RGBA"))
        return im.convert("RGB")


def list_images(folder: str | Path | None, flag: str) -> list[Path]:
    """Image files directly in `folder`, sorted; a clear error naming `flag` if there are none."""
    if not folder:
        raise DataError(f"{flag} is required")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{flag} {str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
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


def read_examples(folder: str | Path | None, flag: str, prompt: str, resolution: int, is_class: bool,
                  use_captions: bool = True) -> list[Example]:
    """Decode every image in `folder` once; skip unreadable ones with a warning; error if none remain."""
    files = list_images(folder, flag)
    captions = read_captions(Path(folder)) if use_captions else {}
    examples = []
    for path in files:
        try:
            image = load_rgb(path)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            log.warning("skipping unreadable image %s: %s", path, e)
            continue
        if min(image.size) < resolution:
            log.warning("%s is %dx%d, smaller than --resolution %d: upscaling it", path, *image.size, resolution)
        examples.append(Example(image, captions.get(path.name, prompt), is_class, path))
    if not examples:
        raise DataError(f"{flag} {str(folder)!r}: none of its {len(files)} image files could be read")
    return examples


@dataclass
class View:
    """One augmented training view: the pixels and what SDXL's micro-conditioning says about them."""

    pixels: torch.Tensor  # (3, resolution, resolution) in [-1, 1]
    flipped: bool
    original_size: tuple[int, int]  # (height, width) of the photo as decoded, before any resize
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized photo; mirrored when flipped


def crop_view(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool, rng: random.Random,
              flip: bool | None = None) -> View:
    """Resize the short side to `resolution`, crop a square, maybe flip (`flip` forces the decision: latent
    caching encodes both orientations). A flip mirrors the crop's left edge as kohya's sd-scripts do: it is
    measured in the mirrored photo, width - left - resolution (diffusers' SDXL example scripts write
    resolution - left, measured on the crop, which is not where the crop sits)."""
    original_size = (image.height, image.width)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    width = image.width
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip is None:
        flip = random_flip and rng.random() < 0.5
    if flip:
        image = ImageOps.mirror(image)
        left = width - left - resolution
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
    return View(pixels / 127.5 - 1.0, flip, original_size, (top, left))


def augment(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
            rng: random.Random, flip: bool | None = None) -> tuple[torch.Tensor, bool]:
    """`crop_view`'s CHW float pixels in [-1, 1] and whether it was flipped."""
    view = crop_view(image, resolution, center_crop, random_flip, rng, flip)
    return view.pixels, view.flipped


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
                 random_flip: bool, seed: int):
        self.instances, self.classes = instances, classes
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.epoch = 0

    def select_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def _view(self, examples: list[Example], index: int, stream: int) -> dict:
        rng = random.Random(stable_seed(self.seed, self.epoch, index, stream))
        example = examples[index % len(examples)]
        view = crop_view(example.image, self.resolution, self.center_crop, self.random_flip, rng)
        # SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w) of this very view
        time_ids = torch.tensor([*view.original_size, *view.crop_top_left, self.resolution, self.resolution],
                                dtype=torch.float32)  # (6,)
        return {"pixel_values": view.pixels, "prompt": example.prompt, "is_class": example.is_class,
                "key": (stream, index % len(examples), view.flipped), "row": (stream, index), "time_ids": time_ids}

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


def collate(items: list[dict]) -> dict:
    """Instance rows first, then class rows: {"pixel_values": (B, 3, H, W), "prompts", "is_class": (B,),
    "keys" (latent-cache keys), "rows" ((stream, dataset index): what seeds each row's noise), "time_ids": (B, 6)
    (SDXL's original size, crop top-left and target size of each row)}."""
    rows = [it["instance"] for it in items] + [it["class"] for it in items if "class" in it]
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "time_ids": torch.stack([r["time_ids"] for r in rows]),
            "prompts": [r["prompt"] for r in rows], "keys": [r["key"] for r in rows],
            "rows": [r["row"] for r in rows], "is_class": torch.tensor([r["is_class"] for r in rows])}
