"""Atomic file writes shared by every package: a reader (or a resumed run) never sees half a file.

Each writer puts the content under a temporary name in the target folder, then renames it over the target
(`os.replace` is atomic on one file system). Standard library only: images are written through their own
`save` method, so this module needs no imaging library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text under a temporary name, then renamed."""
    path = Path(path)
    tmp = _temporary(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    """Indented JSON; values JSON cannot hold (paths, dtypes) are written as their str()."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str))


def save_png_atomic(image, path: str | os.PathLike) -> Path:
    """A PIL image as PNG under a temporary name, then renamed: an interrupted run leaves no broken image."""
    path = Path(path)
    tmp = _temporary(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
