"""Steady-state training speed of `dreamlora/train.py` on the embedded tiny model, per method, beside diffusers.

Settings of the issue's anchor (diffusers' train_dreambooth_lora.py on 2 CPU cores): 64 px, rank 4, batch 1,
attention targets, frozen text encoder, `--steps` optimizer steps, `--threads` CPU threads (1 by default: on a
shared machine, more threads make every step wait for the slowest core). Every run, ours and diffusers' alike,
goes through `bench/step_clock.py`: the same perf_counter clock at each update of the script's step bar (one per
optimizer step), the same statistic (median step after `--skip` warm-up steps), the same memory measures, each
run a fresh process. Rounds interleave the runs; each row keeps its fastest round (interference from other work
only adds time).
`--diffusers_script PATH` adds diffusers' script (shipped in no diffusers package: pass your copy of
examples/dreambooth/train_dreambooth_lora.py) on the same model and photos; ratios are to its rate.

    python bench/train_speed.py [--diffusers_script train_dreambooth_lora.py] [--steps 40 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from report import write_report  # bench/report.py (scripts run from bench/)
from step_clock import run_checked, step_stats

from dreamlora.methods import METHODS as REGISTRY

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
METHODS = tuple(REGISTRY)
DIFFUSERS = "diffusers"
PHOTOS = ROOT / "tests" / "assets" / "dog"


def command(run: str, model: Path, out: Path, steps: int, diffusers_script: str | None) -> list[str]:
    """The training command of one run: the same model, photos, size, rank, batch and step count for all."""
    common = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(PHOTOS),
              "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "64",
              "--center_crop", "--rank", "4", "--train_batch_size", "1", "--max_train_steps", str(steps),
              "--checkpointing_steps", "100000", "--lr_warmup_steps", "0", "--seed", "0"]
    if run == DIFFUSERS:
        return [diffusers_script, *common, "--report_to", "tensorboard"]
    return [str(ROOT / "dreamlora" / "train.py"), *common, "--adapter", run, "--report_to", "none"]


def clocked(run: str, model: Path, tmp: Path, args, round_: int) -> dict:
    """One fresh process of one run under the step clock: its steady rate and memory."""
    out, report = tmp / f"{run}-{round_}", tmp / f"{run}-{round_}.clock.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    run_checked([sys.executable, str(Path(__file__).parent / "step_clock.py"), "--steps", str(args.steps),
                 str(report), *command(run, model, out, args.steps, args.diffusers_script)], env)
    clock = json.loads(report.read_text())
    return {"run": run, **step_stats(clock, args.steps, args.skip),
            "peak_rss_mib": clock["peak_rss_mib"], "loop_peak_mib": clock["loop_peak_mib"],
            "loop_heap_peak_mib": clock["loop_heap_peak_mib"]}


def summarise(results: list[dict], runs: list[str]) -> list[dict]:
    """Fastest round per run; memory as the largest over rounds; ratios to diffusers' rate if it ran."""
    rows = []
    for run in runs:
        mine = [r for r in results if r["run"] == run]
        rows.append({"run": run, "it_per_s": 1 / min(r["step_s_median"] for r in mine),
                     "cpu_it_per_s": 1 / min(r["cpu_s_median"] for r in mine),
                     "fastest_step_s": min(r["step_s_min"] for r in mine),
                     "rounds_step_s_median": [r["step_s_median"] for r in mine],
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
                     "loop_peak_mib": max(r["loop_peak_mib"] for r in mine),
                     "loop_heap_peak_mib": max(r["loop_heap_peak_mib"] for r in mine)})
    ref = next((r for r in rows if r["run"] == DIFFUSERS), None)
    lora = next(r for r in rows if r["run"] == "lora")
    for row in rows:
        row["x_lora_speed"] = row["it_per_s"] / lora["it_per_s"]
        row["x_lora_cpu_speed"] = row["cpu_it_per_s"] / lora["cpu_it_per_s"]
        if ref is not None:
            row["x_diffusers_speed"] = row["it_per_s"] / ref["it_per_s"]
            row["x_diffusers_cpu_speed"] = row["cpu_it_per_s"] / ref["cpu_it_per_s"]
            row["x_diffusers_loop_heap"] = row["loop_heap_peak_mib"] / ref["loop_heap_peak_mib"]
    return rows


def markdown(rows: list[dict], args) -> str:
    def cell(row, key):
        return "–" if key not in row else f"{row[key]:.2f}"

    names = {DIFFUSERS: "diffusers train_dreambooth_lora.py (PEFT LoRA)"}
    return (f"Tiny SD model, 64 px, rank 4, batch 1, CPU fp32, {args.threads} thread(s); each run a fresh process "
            f"under bench/step_clock.py; it/s = 1 / median step after {args.skip} warm-up steps of {args.steps}, in "
            f"wall time and in process CPU time (steadier on a shared machine), fastest of {args.rounds} interleaved "
            "rounds; loop heap = largest heap in use (glibc mallinfo2) above the heap in use at the step bar's "
            "creation; loop RSS = the same for the resident set, file-mapped pages left out\n\n"
            "| run | it/s (wall) | × our lora | × diffusers | it/s (CPU time) | × our lora | × diffusers | "
            "loop heap (MiB) | × diffusers | loop RSS (MiB) | peak RSS (MiB) |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "".join(
                f"| {names.get(r['run'], 'dreamlora ' + r['run'])} | {r['it_per_s']:.1f} | {r['x_lora_speed']:.2f} | "
                f"{cell(r, 'x_diffusers_speed')} | {r['cpu_it_per_s']:.1f} | {r['x_lora_cpu_speed']:.2f} | "
                f"{cell(r, 'x_diffusers_cpu_speed')} | {r['loop_heap_peak_mib']:.0f} | "
                f"{cell(r, 'x_diffusers_loop_heap')} | {r['loop_peak_mib']:.0f} | {r['peak_rss_mib']:.0f} |\n"
                for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the rate")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--diffusers_script", default=None, help="path to diffusers' train_dreambooth_lora.py")
    parser.add_argument("--output", default=str(RESULTS / "train_speed"))
    args = parser.parse_args()
    if args.diffusers_script and not Path(args.diffusers_script).is_file():
        sys.exit(f"--diffusers_script: no such file {args.diffusers_script}")
    runs = args.methods.split(",") + ([DIFFUSERS] if args.diffusers_script else [])
    if "lora" not in runs:
        sys.exit("--methods must include lora (the ratios are to it)")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        subprocess.run([sys.executable, "-m", "dreamlora.tiny", str(model)], check=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
        results = [clocked(run, model, Path(tmp), args, i) for i in range(args.rounds) for run in runs]
    rows = summarise(results, runs)
    write_report(args.output, {"args": vars(args), "rows": rows}, markdown(rows, args))


if __name__ == "__main__":
    main()
