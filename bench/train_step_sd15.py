"""`dreamlora/train.py` itself on the SD 1.5 architecture (random weights), per method, against a floor of the same run.

Builds `python -m dreamlora.tiny --preset sd15` once (cached under bench/results/.cache), then trains each method
for a few steps on the four test photos with --cache_latents (the VAE encodes each image once). The floor is
train.py too, in the same loop: a rank-1 LoRA on `conv_in` alone, so the backward pass runs through every layer of
the frozen UNet (as a gradient to the input would) while the adapter itself costs nothing. Every row is a fresh
process under `bench/step_clock.py` (same clock at each step-bar update, same memory measures), rounds
interleaved, fastest round kept; every ratio is between rows of this one run.

    python bench/train_step_sd15.py [--resolution 256 --steps 8 --rounds 2]   # bench/results/train_step_sd15.*
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from report import write_report  # bench/report.py (scripts run from bench/)
from step_clock import run_checked, step_stats

from dreamlora.methods import METHODS as REGISTRY

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
FLOOR = "floor"
METHODS = tuple(REGISTRY)


def command(run: str, model: Path, out: Path, args) -> list[str]:
    adapter = (["--adapter", "lora", "--rank", "1", "--target_modules", "conv_in"] if run == FLOOR
               else ["--adapter", run, "--rank", str(args.rank)])
    return [str(ROOT / "dreamlora" / "train.py"), "--pretrained_model_name_or_path", str(model),
            "--instance_data_dir", str(ROOT / "tests" / "assets" / "dog"), "--instance_prompt", "a photo of sks dog",
            "--output_dir", str(out), "--resolution", str(args.resolution), "--center_crop", "--cache_latents",
            *adapter, "--max_train_steps", str(args.steps), "--checkpointing_steps", "100000", "--report_to", "none"]


def clocked(run: str, model: Path, tmp: Path, args, round_: int) -> dict:
    out, report = tmp / f"{run}-{round_}", tmp / f"{run}-{round_}.clock.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    run_checked([sys.executable, str(Path(__file__).parent / "step_clock.py"), "--steps", str(args.steps),
                 str(report), *command(run, model, out, args)], env)
    clock = json.loads(report.read_text())
    trainable = json.loads((out / "run.json").read_text())["trainable_params"]
    return {"run": run, **step_stats(clock, args.steps, args.skip), "trainable_params": trainable,
            "peak_rss_mib": clock["peak_rss_mib"], "loop_peak_mib": clock["loop_peak_mib"],
            "loop_heap_peak_mib": clock["loop_heap_peak_mib"]}


def summarise(results: list[dict], runs: list[str]) -> list[dict]:
    """Per row its fastest round (median and fastest step) and its largest memory; ratios to the floor row."""
    rows = []
    for run in runs:
        mine = [r for r in results if r["run"] == run]
        rows.append({"run": run, "cpu_s_median": min(r["cpu_s_median"] for r in mine),
                     "step_s_median": min(r["step_s_median"] for r in mine),
                     "step_s_min": min(r["step_s_min"] for r in mine), "trainable_params": mine[0]["trainable_params"],
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
                     "loop_peak_mib": max(r["loop_peak_mib"] for r in mine),
                     "loop_heap_peak_mib": max(r["loop_heap_peak_mib"] for r in mine)})
    floor = rows[0]
    for row in rows:
        row["x_floor_cpu"] = row["cpu_s_median"] / floor["cpu_s_median"]
        row["x_floor_median"] = row["step_s_median"] / floor["step_s_median"]
        row["x_floor_min"] = row["step_s_min"] / floor["step_s_min"]
        row["loop_heap_over_floor_mib"] = row["loop_heap_peak_mib"] - floor["loop_heap_peak_mib"]
    return rows


def markdown(rows: list[dict], args) -> str:
    return (f"train.py, SD 1.5 architecture (random), {args.resolution} px, batch 1, rank {args.rank}, attention "
            f"targets, --cache_latents, CPU fp32, {args.threads} thread(s). Floor: the same train.py loop with a "
            f"rank-1 LoRA on conv_in only (backward through the whole frozen UNet). Median step after {args.skip} "
            f"warm-up steps of {args.steps} in process CPU time (steady on a shared machine) and wall time, fastest "
            f"of {args.rounds} interleaved rounds, each row a fresh process; loop heap = largest heap in use above the "
            "heap in use when the step bar was created (live allocations, glibc mallinfo2); loop RSS = the same "
            "for the resident set, file-mapped pages left out (moves by tens of MiB with the allocator's layout)\n\n"
            "| run | CPU s/step | × floor | wall s/step | × floor | trainable params | loop heap (MiB) "
            "| − floor (MiB) | loop RSS (MiB) | peak RSS (MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
            + "".join(
                f"| {r['run']} | {r['cpu_s_median']:.3f} | {r['x_floor_cpu']:.3f} | {r['step_s_median']:.3f} | "
                f"{r['x_floor_median']:.3f} | {r['trainable_params']:,} | {r['loop_heap_peak_mib']:.0f} | "
                f"{r['loop_heap_over_floor_mib']:+.0f} | {r['loop_peak_mib']:.0f} | {r['peak_rss_mib']:.0f} |\n"
                for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--output", default=str(RESULTS / "train_step_sd15"))
    args = parser.parse_args()
    model = RESULTS / ".cache" / "sd15-random"
    if not (model / "model_index.json").is_file():
        run_checked([sys.executable, "-m", "dreamlora.tiny", str(model), "--preset", "sd15"],
                    {**os.environ, "HF_HUB_OFFLINE": "1"})
    runs = [FLOOR, *args.methods.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        results = [clocked(run, model, Path(tmp), args, i) for i in range(args.rounds) for run in runs]
    rows = summarise(results, runs)
    write_report(args.output, {"args": vars(args), "rows": rows, "results": results}, markdown(rows, args))


if __name__ == "__main__":
    main()
