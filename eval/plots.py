"""Plots people would rather look at than read: per-method bars with the per-subject spread."""

from __future__ import annotations

import os
from pathlib import Path

METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))


def method_bars(summary: list[dict], path: Path) -> Path:
    """One panel per metric: a bar per method (mean over all its images) and a dot per subject mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({s["method"] for s in summary})
    # a backbone that was off has no panel; the extra backbone has one when it scored
    shown = [(m, label) for m, label in (*METRICS, ("extra", "EfficientNet-Lite0"))
             if any(s.get(m) is not None for s in summary)] or list(METRICS)
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6), constrained_layout=True, squeeze=False)
    for ax, (metric, label) in zip(axes[0], shown, strict=True):
        overall = [next(s.get(metric) for s in summary if s["method"] == m and s["subject"] == "all") for m in methods]
        overall = [float("nan") if v is None else v for v in overall]  # e.g. CLIP-T without prompts
        ax.bar(range(len(methods)), overall, color="#8fb3d9", edgecolor="#2b5d8c")
        for i, m in enumerate(methods):
            subjects = [s.get(metric) for s in summary if s["method"] == m and s["subject"] != "all"
                        and s.get(metric) is not None]
            ax.scatter([i] * len(subjects), subjects, color="#1f3b57", s=12, zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write under a temporary name, then rename: a reader never sees half a PNG. Closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def rank_per_layer(ranks: dict[str, int], path: Path, title: str, reference: int | None = None) -> Path:
    """A horizontal bar per adapted layer (its rank: AdaLoRA's final rank, ReLoRA's effective rank), with the
    configured rank as a dashed line, so a user sees where the rank went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ranks)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.18 * len(names) + 1)), constrained_layout=True)
    ax.barh(range(len(names)), [ranks[n] for n in names], color="#8fb3d9", edgecolor="#2b5d8c")
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=6 if len(names) > 24 else 8)
    ax.invert_yaxis()
    if reference is not None:
        ax.axvline(reference, color="#c0392b", linestyle="--", label=f"--rank {reference}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("rank")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def _short(path: str, keep: int = 48) -> str:
    return path if len(path) <= keep else "…" + path[-keep + 1:]
