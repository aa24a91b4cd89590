"""The text-classification comparison: `python -m eval.text_report SWEEP_DIR`.

Reads every run folder a sweep wrote (run.json + eval.jsonl) and writes report.json, report.md and two
plots. Per method, at its best learning rate: dev accuracy mean ± std over seeds, macro-F1, MCC,
trainable parameters, training time, and the steps it needs to reach LoRA's final accuracy; across
learning rates: the spread (best minus worst seed-mean accuracy), the quantity SingLoRA's claim is about.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from dreamlora.atomic import atomic_write_text


def read_runs(sweep_dir: Path) -> list[dict]:
    runs = []
    for summary in sorted(Path(sweep_dir).glob("*/run.json")):
        run = json.loads(summary.read_text(encoding="utf-8"))
        if run.get("task") != "text-classification" or not run.get("finished"):
            continue
        history = summary.parent / "eval.jsonl"
        curve = [json.loads(line) for line in history.read_text(encoding="utf-8").splitlines()] \
            if history.is_file() else []
        runs.append({"name": summary.parent.name, "method": run["method"], "lr": run["args"]["learning_rate"],
                     "seed": run["args"]["seed"], "accuracy": run.get("eval_accuracy"),
                     "macro_f1": run.get("eval_macro_f1"), "mcc": run.get("eval_mcc"),
                     "adapter_params": run.get("adapter_params"), "head_params": run.get("head_params"),
                     "train_time_s": run.get("train_time_s"), "steps": run.get("steps"), **_ranks(run),
                     "curve": [(r["step"], r["accuracy"]) for r in curve if r.get("event") == "eval"]})
    return runs


def _ranks(run: dict) -> dict:
    """The rank per adapted layer, mean over layers: the method's own (`method_report`'s rank_per_layer: ReLoRA's
    effective rank, AdaLoRA's final rank) or --rank; and the adapter's final parameters (AdaLoRA's kept triplets)."""
    report = (run.get("method_report") or {}).get("model", {})
    ranks = list((report.get("rank_per_layer") or {}).values())
    return {"rank": float(np.mean(ranks)) if ranks else float(run["args"].get("rank") or 0),
            "final_params": report.get("final_params", run.get("adapter_params"))}


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    """Accuracy per step averaged over seeds, on the steps every seed evaluated."""
    common = set.intersection(*(set(s for s, _ in r["curve"]) for r in runs)) if runs else set()
    return [(step, float(np.mean([dict(r["curve"])[step] for r in runs]))) for step in sorted(common)]


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target - 1e-12), None)


def summarise(runs: list[dict]) -> dict:
    cells = defaultdict(list)  # (method, lr) -> runs over seeds
    for r in runs:
        cells[(r["method"], r["lr"])].append(r)
    per_lr = defaultdict(dict)  # method -> lr -> stats
    for (method, lr), group in cells.items():
        acc = [r["accuracy"] for r in group]
        per_lr[method][lr] = {"accuracy_mean": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
                              "seeds": len(group), "runs": group}
    best = {m: max(lrs, key=lambda lr: lrs[lr]["accuracy_mean"]) for m, lrs in per_lr.items()}
    reference = per_lr["lora"][best["lora"]]["accuracy_mean"] if "lora" in per_lr else None
    rows = []
    for method, lrs in per_lr.items():
        cell = lrs[best[method]]
        group = cell["runs"]
        curve = mean_curve(group)
        means = [s["accuracy_mean"] for s in lrs.values()]
        rows.append({
            "method": method, "best_lr": best[method], "seeds": cell["seeds"],
            "accuracy_mean": cell["accuracy_mean"], "accuracy_std": cell["accuracy_std"],
            "macro_f1_mean": float(np.mean([r["macro_f1"] for r in group])),
            "mcc_mean": float(np.mean([r["mcc"] for r in group])),
            "adapter_params": group[0]["adapter_params"], "head_params": group[0]["head_params"],
            "final_params_mean": float(np.mean([r["final_params"] for r in group])),
            "rank_mean": float(np.mean([r["rank"] for r in group])),
            "train_time_s_mean": float(np.mean([r["train_time_s"] for r in group])),
            "steps": group[0]["steps"],
            "steps_to_lora_final": None if reference is None else first_step_reaching(curve, reference),
            "lr_spread_points": 100 * (max(means) - min(means)), "lr_std_points": 100 * float(np.std(means)),
            "learning_rates": sorted(lrs), "curve": curve,
            "per_lr": {lr: {k: v for k, v in s.items() if k != "runs"} for lr, s in sorted(lrs.items())},
        })
    order = ["lora", "loraplus", "dora", "singlora", "loha", "lokr", "relora", "adalora"]
    rows.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    return {"lora_final_accuracy": reference, "methods": rows}


def _params(row: dict) -> str:
    """Trained parameters, and the final ones where pruning left fewer (AdaLoRA)."""
    trained, final = row["adapter_params"], round(row["final_params_mean"])
    return f"{trained:,}" if final == trained else f"{trained:,} ({final:,})"


def table(summary: dict) -> str:
    def pts(value):
        return "–" if value is None else f"{100 * value:.2f}"

    lines = ["| method | best lr | dev accuracy (%) | macro-F1 | MCC | adapter params (final) | rank per layer "
             "| head params | train time (s) | steps to LoRA's final acc. | acc. spread over lrs (pts) "
             "| accuracy per lr (%) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in summary["methods"]:
        reach = "not reached" if r["steps_to_lora_final"] is None else f"{r['steps_to_lora_final']} / {r['steps']}"
        per_lr = ", ".join(f"{lr:g}: {100 * s['accuracy_mean']:.1f}±{100 * s['accuracy_std']:.1f}"
                           for lr, s in r["per_lr"].items())
        lines.append(f"| {r['method']} | {r['best_lr']:g} | {pts(r['accuracy_mean'])} ± {pts(r['accuracy_std'])} "
                     f"| {r['macro_f1_mean']:.4f} | {r['mcc_mean']:.4f} | {_params(r)} | {r['rank_mean']:.1f} "
                     f"| {r['head_params']:,} | {r['train_time_s_mean']:.0f} | {reach} "
                     f"| {r['lr_spread_points']:.2f} | {per_lr} |")
    seeds = max((r["seeds"] for r in summary["methods"]), default=0)
    return "\n".join(lines) + f"\n\nMean ± std over {seeds} seeds at each method's best learning rate; " \
        f"LoRA's final accuracy (the target) = {pts(summary['lora_final_accuracy'])} %.\n"


def plot(summary: dict, sweep_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.plots import save_figure

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for r in summary["methods"]:
        steps, acc = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        ax.plot(steps, [100 * a for a in acc], marker="o", ms=3, label=f"{r['method']} (lr {r['best_lr']:g})")
    if summary["lora_final_accuracy"] is not None:
        ax.axhline(100 * summary["lora_final_accuracy"], color="gray", ls="--", lw=1, label="LoRA final")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("dev accuracy (%), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    by_step = save_figure(fig, Path(sweep_dir) / "accuracy_vs_step.png")

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for r in summary["methods"]:
        lrs = list(r["per_lr"])
        ax.errorbar(lrs, [100 * r["per_lr"][lr]["accuracy_mean"] for lr in lrs],
                    yerr=[100 * r["per_lr"][lr]["accuracy_std"] for lr in lrs], marker="o", capsize=3,
                    label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final dev accuracy (%), mean ± std")
    ax.grid(alpha=0.3)
    ax.legend()
    return [by_step, save_figure(fig, Path(sweep_dir) / "accuracy_vs_lr.png")]


def write_report(sweep_dir: str | Path) -> str:
    sweep_dir = Path(sweep_dir)
    runs = read_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"{sweep_dir}: no finished text-classification runs (run.json) found")
    summary = summarise(runs)
    text = table(summary)
    atomic_write_text(sweep_dir / "report.md", text)
    atomic_write_text(sweep_dir / "report.json", json.dumps(summary, indent=2))
    plot(summary, sweep_dir)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.text_report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir")
    args = p.parse_args(argv)
    try:
        print(write_report(args.sweep_dir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
