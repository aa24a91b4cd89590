"""The image files dreamlora reads: one list for the trainer (`pipelines.diffusion.data`), the scorer (`eval.score`) and
the app (`app_backend.safety`, `app_backend.jobs`), so a photo that trains is also scored and accepted.

It lives in `eval/` as a module without imports: the trainer already imports `eval` (the text trainer's
metrics), while `eval` must not import the trainers' heavy modules, and the adapter core (`dreamlora/`) is
about adapters, not files. PIL format names map to the suffix a copied upload is saved under.
"""

from __future__ import annotations

# PIL's format name -> the suffix an accepted upload is saved under. MPO: what many phones call a JPEG.
FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
IMAGE_FORMATS = frozenset(FORMAT_SUFFIX)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
MASK_SUFFIX = "-masklabel"  # a photo's loss mask, <stem>-masklabel.png (OneTrainer's name): never a photo itself


def is_mask_file(path) -> bool:
    """`<stem>-masklabel.<any suffix>`, any case."""
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0].lower().endswith(MASK_SUFFIX)


def is_image_file(path) -> bool:
    """Judged by the suffix, any case (`.JPG` too); the content is checked where the file is opened."""
    return str(path).lower().endswith(tuple(IMAGE_SUFFIXES))
