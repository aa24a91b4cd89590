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


def search_history(objectives: list[float], sources: list[str], weights: dict[str, float], path: Path,
                   title: str) -> Path:
    """A composition search: the objective of each evaluation (seeded candidates apart) with the running best, and
    the weights it found per adapter."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    steps = range(1, len(objectives) + 1)
    seeded = [i for i, s in enumerate(sources) if s in ("base", "uniform", "restart") or s.startswith("single:")]
    finite = [v if math.isfinite(v) else float("nan") for v in objectives]
    left.plot(steps, finite, ".", color="#999999", label="evaluation")
    left.plot([i + 1 for i in seeded], [finite[i] for i in seeded], "o", mfc="none", color="#d62728",
              label="seeded (base, uniform, each adapter)")
    running, best = [], float("inf")
    for v in objectives:
        best = min(best, v)
        running.append(best)
    left.plot(steps, running, "-", color="#1f77b4", label="best so far")
    left.set_xlabel("evaluation")
    left.set_ylabel("objective (loss + L1)")
    left.set_title(title)
    left.legend(fontsize=8)
    names = [_short(n, 28) for n in weights]
    right.barh(names, list(weights.values()), color="#1f77b4")
    right.axvline(0, color="black", lw=0.8)
    right.set_xlabel("weight")
    right.set_title("weights found")
    fig.tight_layout()
    return save_figure(fig, path)
