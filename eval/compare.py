"""`python -m eval.compare RUN_DIRS...`: one table and one plot across methods, to pick one for a budget.

Each RUN_DIR is a scored generation folder (`scores.json` from `eval.score`, `run.json` from
`pipelines.diffusion.dreambench`); the training cost comes from the `run.json` of the adapter it generated with.
Columns: method, rank, trainable params, train time, peak memory, DINO, CLIP-I, CLIP-T (mean ± std).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class CompareError(ValueError):
    pass


def read_run(run_dir: Path) -> dict:
    scores_file = run_dir / "scores.json"
    if not scores_file.is_file():
        raise CompareError(f"{str(run_dir)!r} has no scores.json: run python -m eval.score on it first")
    scores = json.loads(scores_file.read_text())
    overall = [s for s in scores["summary"] if s["subject"] == "all"]
    if len(overall) != 1:
        raise CompareError(f"{str(run_dir)!r}: expected the scores of one method, found {len(overall)}")
    row = {"run": run_dir.name, **{k: overall[0].get(k) for k in ("method", "n", "dino", "dino_std", "clip_i",
                                                                    "clip_i_std", "clip_t", "clip_t_std", "extra",
                                                                    "extra_std")}}
    generation = run_dir / "run.json"
    adapters = json.loads(generation.read_text()).get("adapters", []) if generation.is_file() else []
    if isinstance(adapters, dict):  # several subjects, each with its own adapter: cost of the first
        adapters = next(iter(adapters.values()), [])
    training = Path(adapters[0]["path"]) / "run.json" if adapters else None
    if training is not None and training.is_file():
        t = json.loads(training.read_text())
        row.update(rank=t.get("adapter_config", {}).get("rank"), trainable_params=t.get("trainable_params"),
                   train_time_s=t.get("wall_time_s"), peak_memory_mib=t.get("peak_memory_mib"))
    return row


def table(rows: list[dict]) -> str:
    def cell(value, fmt=""):
        return "–" if value is None else format(value, fmt)

    lines = ["| run | method | rank | trainable params | train time (s) | peak memory (MiB) | n | DINO | CLIP-I | "
             "CLIP-T |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {cell(r.get('rank'))} | {cell(r.get('trainable_params'), ',')} "
                     f"| {cell(r.get('train_time_s'), '.0f')} | {cell(r.get('peak_memory_mib'), '.0f')} | {r['n']} | "
                     + " | ".join(f"{cell(r[m], '.3f')} ± {cell(r[m + '_std'], '.3f')}"
                                  for m in ("dino", "clip_i", "clip_t")) + " |")
    return "\n".join(lines) + "\n"


SUBJECT_METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("extra", "EfficientNet-Lite0"))


def plot(rows: list[dict], path: Path) -> Path:
    """Subject fidelity (DINO, else CLIP-I, else the extra backbone) against prompt fidelity (CLIP-T), one
    labelled point per run; without CLIP-T (CLIP off, or no prompts), a bar per run of the subject fidelity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, y_label = next(((m, label) for m, label in SUBJECT_METRICS if any(r.get(m) is not None for r in rows)),
                      ("dino", "DINO"))
    fig, ax = plt.subplots(figsize=(5.5, 4.2), constrained_layout=True)
    placed = [r for r in rows if r.get("clip_t") is not None and r.get(y) is not None]
    for r in placed:
        ax.errorbar(r["clip_t"], r[y], xerr=r["clip_t_std"], yerr=r[f"{y}_std"], fmt="o", capsize=3)
        label = r["method"] + (f" r{r['rank']}" if r.get("rank") else "")
        ax.annotate(label, (r["clip_t"], r[y]), textcoords="offset points", xytext=(5, 5))
    if placed:
        ax.set_xlabel("CLIP-T (prompt fidelity)")
    else:
        scored = [r for r in rows if r.get(y) is not None]
        ax.bar(range(len(scored)), [r[y] for r in scored], yerr=[r[f"{y}_std"] or 0 for r in scored], capsize=3,
               color="#8fb3d9", edgecolor="#2b5d8c")
        ax.set_xticks(range(len(scored)), [r["run"] for r in scored], rotation=20)
        ax.set_title("no CLIP-T (CLIP off, or no prompts)")
    ax.set_ylabel(f"{y_label} (subject fidelity)")
    ax.grid(alpha=0.3)
    from eval.plots import save_figure

    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--output", default="comparison", help="folder for comparison.{json,md,png}")
    args = p.parse_args(argv)
    try:
        rows = [read_run(Path(d)) for d in args.run_dirs]
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    (out / "comparison.md").write_text(text)
    plot(rows, out / "comparison.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
