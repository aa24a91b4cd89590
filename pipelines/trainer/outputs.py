"""What every trainer writes beside its adapter files, whatever the method: the plain-LoRA files' rank
(`--export_rank`) and its error, the method's own figures (`AdapterLayer.report`: ReLoRA's effective rank,
AdaLoRA's final ranks) with `ranks.png`, and with `--save_merged` the base model with the adapter folded in."""

from __future__ import annotations

import statistics
from pathlib import Path

import dreamlora
from dreamlora.methods import METHODS

RANKS_PLOT = "ranks.png"
MERGED_DIR = "merged"


def prepare_exports(args, models: dict) -> None:
    """Set the plain-LoRA files' rank of every trained component (before any file is written)."""
    for model in models.values():
        dreamlora.set_export_rank(model, args.export_rank)


def method_figures(args, output_dir: Path, models: dict) -> dict:
    """run.json's `method_report` (per component, when the method reports anything) and `export` (the files'
    rank rule, the rank the files hold per layer and their relative error ‖ΔW − ΔW_file‖/‖ΔW‖ per layer: mean
    and max); draws `ranks.png`."""
    method = METHODS[args.adapter]
    reports = {name: method.report(dreamlora.adapter_layers(model, "default")) for name, model in models.items()}
    exported = [layer.export_factors() for model in models.values()
                for layer in dreamlora.adapter_layers(model, "default").values()]
    errors = [error for _, error in exported]
    file_ranks = [factors["lora_A.weight"].shape[0] for factors, _ in exported if factors]
    out: dict = {"export": {"rank": args.export_rank or method.default_export_rank,
                            "file_rank_mean": statistics.fmean(file_ranks) if file_ranks else 0.0,
                            "file_rank_max": max(file_ranks, default=0),
                            "relative_error_max": max(errors, default=0.0),
                            "relative_error_mean": statistics.fmean(errors) if errors else 0.0}}
    if any(reports.values()):
        out["method_report"] = reports
    ranks = {f"{name}: {path}" if len(models) > 1 else path: rank for name, report in reports.items()
             for path, rank in report.get("rank_per_layer", {}).items()}
    if ranks:
        from eval.plots import rank_per_layer

        rank_per_layer(ranks, output_dir / RANKS_PLOT, f"{args.adapter}: rank per layer", reference=args.rank)
        out["ranks_plot"] = RANKS_PLOT
    return out


def save_merged(output_dir: Path, models: dict, write) -> Path:
    """Fold the adapters into their base weights (in place: call it last) and let `write(folder)` save the
    merged model(s) in their library's format under `merged/`, written under a temporary name and renamed."""
    import os
    import shutil

    for model in models.values():
        dreamlora.merge(model)
    final, tmp = output_dir / MERGED_DIR, output_dir / f".{MERGED_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
