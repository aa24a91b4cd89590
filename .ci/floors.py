"""Print pip constraints that hold the declared floors: each package in FLOORED within the release series of
its `>=` floor in pyproject.toml (`diffusers>=0.34` -> `diffusers~=0.34.0`, i.e. >=0.34.0,<0.35), and torch /
torchvision at exactly the pins given on the command line, so the resolver never pulls another torch.

    python .ci/floors.py torch==2.14.1 torchvision==0.29.1 > constraints.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

FLOORED = ("diffusers", "transformers", "accelerate", "safetensors", "open_clip_torch", "nevergrad", "prodigyopt")


def floors(pyproject: Path) -> dict[str, str]:
    """The quoted `"name>=version"` requirements of FLOORED (read as text: tomllib needs Python 3.11)."""
    found = {}
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)"', pyproject.read_text()):
        if name in FLOORED:
            found[name] = version
    missing = sorted(set(FLOORED) - set(found))
    if missing:
        sys.exit(f"pyproject.toml: no plain '>=' floor for {missing}")
    return found


def series(version: str) -> str:
    """`0.34` -> `0.34.0`: `~=` on three parts keeps the major.minor series."""
    parts = version.split(".")
    return ".".join(parts + ["0"] * (3 - len(parts)))


def main(pins: list[str]) -> None:
    if not pins or not all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.+]+", p) for p in pins):
        sys.exit("usage: floors.py torch==X torchvision==Y")
    for name, version in floors(Path(__file__).resolve().parent.parent / "pyproject.toml").items():
        print(f"{name}~={series(version)}")
    print("\n".join(pins))


if __name__ == "__main__":
    main(sys.argv[1:])
