"""What the app accepts from a browser: run names, uploaded photos, and paths inside its runs folder; and
what it gives back: only the files the page shows, published into RUNS/_served/ (`publish`), the one folder
the server lets a browser fetch by path. Photos, logs, checkpoints and job files are never in it.

Everything here refuses with an `AppInputError` whose message is shown to the user as is; nothing is
silently "fixed", so a name or file the user did not mean never reaches the disk.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from eval.image_files import IMAGE_FORMATS

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_IMAGES = 50
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 50_000_000  # a 7000×7000 photo; more is a decompression bomb, not a camera
MIN_IMAGE_SIDE = 32


class AppInputError(ValueError):
    """Input the app refuses; the message says why and is shown in the page."""


def check_run_name(name: str | None) -> str:
    """A run name becomes a folder under the runs folder: letters, digits, `.`, `_`, `-`, at most 64, starting
    with a letter or digit, and never `..`. Names starting with `_` are the app's own folders."""
    name = (name or "").strip()
    if not name:
        raise AppInputError("Give the run a name (letters, digits, '.', '_' or '-').")
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise AppInputError(f"Run name {name!r} refused: use 1-64 letters, digits, '.', '_' or '-', starting with "
                            "a letter or digit (no slashes, no '..').")
    return name


def number(value, label: str, low: float, high: float, kind: type = int) -> int | float:
    """A form field as a number in [low, high]; an empty, non-numeric or out-of-range value is refused."""
    try:
        converted = kind(value)
        if kind is int and float(value) != converted:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise AppInputError(f"{label} must be {'a whole number' if kind is int else 'a number'}, got {value!r}.") \
            from None
    if not (math.isfinite(converted) and low <= converted <= high):
        raise AppInputError(f"{label} must be between {low} and {high}, got {value!r}.")
    return converted


def inside(root: Path, path: str | Path) -> Path:
    """`path` resolved (symlinks too), refused unless it lies inside `root`."""
    root = Path(root).resolve()
    resolved = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    if resolved != root and root not in resolved.parents:
        raise AppInputError(f"{str(path)!r} is outside the app's runs folder and is not served.")
    return resolved


def check_image(path: Path, label: str | None = None) -> tuple[int, int]:
    """A real, decodable photo of a sane size: (width, height). The extension is not trusted."""
    label = label or Path(path).name
    size = Path(path).stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise AppInputError(f"{label}: {size / 2**20:.1f} MB is over the {MAX_IMAGE_BYTES // 2**20} MB limit.")
    try:
        with Image.open(path) as im:
            if im.format not in IMAGE_FORMATS:
                raise AppInputError(f"{label}: {im.format} images are not accepted "
                                    f"({', '.join(sorted(IMAGE_FORMATS - {'MPO'}))} are).")
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise AppInputError(f"{label}: {width}×{height} pixels is too large.")
            im.load()  # a full decode: truncated or fake files fail here
    except AppInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise AppInputError(f"{label} is not a readable image ({type(e).__name__}).") from None
    if min(width, height) < MIN_IMAGE_SIDE:
        raise AppInputError(f"{label}: {width}×{height} is too small (at least {MIN_IMAGE_SIDE} px a side).")
    return width, height


def check_images(paths: list[Path], labels: list[str] | None = None) -> list[Path]:
    """Every file a real image, between 1 and MAX_IMAGES of them; refused as a whole on the first bad one."""
    if not paths:
        raise AppInputError("Add at least one photo of your subject (upload, or pick a folder).")
    if len(paths) > MAX_IMAGES:
        raise AppInputError(f"{len(paths)} photos is over the limit of {MAX_IMAGES}; 3-20 is typical.")
    labels = labels or [Path(p).name for p in paths]
    for path, label in zip(paths, labels, strict=True):
        check_image(Path(path), label)
    return [Path(p) for p in paths]


SERVED = "_served"
# what the page shows, relative to the runs folder: previews, samples, evaluation plots and grids, and a run's
# finished adapter files (its top level; checkpoints are in checkpoint-*/ folders)
SERVABLE = [re.compile(r"[A-Za-z0-9][^/]*/validation/step-[^/]+\.png"),
            re.compile(r"_samples/[^/]+/[^/]+\.png"), re.compile(r"_eval/[^/]+/[^/]+\.png"),
            re.compile(r"[A-Za-z0-9][^/]*/[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors"),
            re.compile(r"[A-Za-z0-9][^/]*/ranks\.png")]


def publish(runs_dir: Path, path: Path) -> Path:
    """The servable copy of `path`: RUNS/_served/<the same relative path>, a hard link (no extra disk; a copy
    where links fail), refreshed when the original was replaced. Anything not in SERVABLE is refused, so a
    photo, a log or a checkpoint can never be published by mistake."""
    runs_dir, path = Path(runs_dir).resolve(), Path(path).resolve()
    relative = path.relative_to(runs_dir).as_posix()  # ValueError when outside
    if not any(pattern.fullmatch(relative) for pattern in SERVABLE):
        raise ValueError(f"{relative!r} is not something the page shows; it is not served")
    served = runs_dir / SERVED / relative
    if served.is_file() and same_file(served, path):
        return served
    served.parent.mkdir(parents=True, exist_ok=True)
    tmp = served.with_name(f".{served.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.link(path, tmp)
    except OSError:  # another file system, or links not supported
        shutil.copy2(path, tmp)
    os.replace(tmp, served)
    return served


def same_file(a: Path, b: Path) -> bool:
    """One inode, or a copy of the same size and modification time (copy2 keeps it)."""
    sa, sb = a.stat(), b.stat()
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) or (sa.st_size, sa.st_mtime_ns) == (sb.st_size,
                                                                                                  sb.st_mtime_ns)
