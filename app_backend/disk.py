"""Disk limits of the app: each run's folder and the whole runs folder are capped, and the disk must keep some
space free. Work that would write past a limit is refused with a message naming the flag that sets it; a
training run that grows past its cap is stopped (with a checkpoint, as Stop does) by `JobManager`'s watcher.

A shared app takes uploads, checkpoints, class images and generated images from anyone with the link: without
limits one visitor can fill the server's disk. Sizes are apparent file sizes; hard links are counted once.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from app_backend.safety import AppInputError

GB = 10**9
MIN_FREE_BYTES = 2 * GB  # below this much free space the app writes nothing new


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (each inode once: the served copies are hard links)."""
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # written or removed while we walk
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def gigabytes(n: float) -> str:
    return f"{n / GB:.2f} GB"


@dataclass
class DiskQuota:
    """`run_bytes` per run folder, `total_bytes` for the runs folder; None: no limit (the plain-Python API)."""

    runs_dir: Path
    run_bytes: int | None = None
    total_bytes: int | None = None
    min_free_bytes: int = 0

    def total_problem(self, adding: int = 0) -> str | None:
        if self.min_free_bytes:
            free = shutil.disk_usage(self.runs_dir).free
            if free - adding < self.min_free_bytes:
                return (f"the disk holding {self.runs_dir} has {gigabytes(free)} free, under the "
                        f"{gigabytes(self.min_free_bytes)} the app keeps free")
        if self.total_bytes is not None:
            used = folder_bytes(self.runs_dir)
            if used + adding > self.total_bytes:
                return (f"the runs folder holds {gigabytes(used)}{f' (+{gigabytes(adding)} to add)' if adding else ''}"
                        f" of its {gigabytes(self.total_bytes)} limit (--max_total_gb)")
        return None

    def run_problem(self, run_dir: Path, adding: int = 0) -> str | None:
        if self.run_bytes is None:
            return None
        used = folder_bytes(run_dir) if run_dir.exists() else 0
        if used + adding > self.run_bytes:
            return (f"run {run_dir.name!r} holds {gigabytes(used)}{f' (+{gigabytes(adding)} to add)' if adding else ''}"
                    f" of its {gigabytes(self.run_bytes)} limit (--max_run_gb)")
        return None

    def check(self, run_dir: Path | None = None, adding: int = 0) -> None:
        """Refuse (AppInputError) when writing `adding` more bytes (into `run_dir`) would pass a limit."""
        problem = (self.run_problem(run_dir, adding) if run_dir is not None else None) or self.total_problem(adding)
        if problem:
            raise AppInputError(f"Disk full: {problem}. Delete runs or samples you no longer need from "
                                f"{self.runs_dir}, or restart the app with a larger limit.")

    def over(self, run_dir: Path) -> str | None:
        """Why a running training must stop now, or None."""
        return self.run_problem(run_dir) or self.total_problem()
