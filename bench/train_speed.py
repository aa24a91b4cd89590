"""Steady-state training speed of `dreamlora/train.py` on the embedded tiny model, per method.

Settings of the issue's anchor (diffusers' train_dreambooth_lora.py at about 16 it/s on 2 CPU cores):
64 px, rank 4, batch 1, 60 steps, attention targets, frozen text encoder. Two rates per run: "steady"
(progress file, step 10 to the end) and "whole bar" (all steps over the time since the loop started, which is
what tqdm prints). `--diffusers_script PATH` also runs diffusers' script (not shipped in any diffusers
package, so the user supplies it) on the same model and photos, and reads the rate its tqdm bar printed.

    python bench/train_speed.py [--diffusers_script train_dreambooth_lora.py]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from report import write_report  # bench/report.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
METHODS = ("lora", "loraplus", "dora", "singlora")


def rates(progress: Path, skip: int = 10) -> tuple[float, float]:
    """(steady it/s from step `skip`, whole-bar it/s from the loop's start)."""
    records = [json.loads(line) for line in progress.read_text().splitlines()]
    started = next(r["time"] for r in records if r.get("event") == "started")
    steps = [r for r in records if r.get("event") == "step"]
    steady = [r for r in steps if r["step"] >= skip]
    return ((steady[-1]["step"] - steady[0]["step"]) / (steady[-1]["time"] - steady[0]["time"]),
            steps[-1]["step"] / (steps[-1]["time"] - started))


def diffusers_rate(script: Path, model: Path, photos: Path, out: Path, steps: int, env: dict) -> float:
    proc = subprocess.run([sys.executable, str(script), "--pretrained_model_name_or_path", str(model),
                           "--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks dog",
                           "--output_dir", str(out), "--resolution", "64", "--center_crop", "--train_batch_size", "1",
                           "--rank", "4", "--max_train_steps", str(steps), "--lr_warmup_steps", "0", "--seed", "0"],
                          check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    final = [line for line in proc.stderr.replace("\r", "\n").splitlines() if f"{steps}/{steps}" in line]
    return float(re.search(r"([0-9.]+)it/s", final[-1]).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--diffusers_script", default=None, help="path to diffusers' train_dreambooth_lora.py")
    parser.add_argument("--output", default=str(RESULTS / "train_speed"))
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        subprocess.run([sys.executable, "-m", "dreamlora.tiny", str(model)], check=True, env=env, cwd=ROOT,
                       capture_output=True)
        for method in METHODS:
            out = Path(tmp) / method
            subprocess.run([sys.executable, str(ROOT / "dreamlora" / "train.py"), "--pretrained_model_name_or_path",
                            str(model), "--instance_data_dir", str(ROOT / "tests" / "assets" / "dog"),
                            "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "64",
                            "--center_crop", "--adapter", method, "--rank", "4", "--train_batch_size", "1",
                            "--max_train_steps", str(args.steps), "--checkpointing_steps", "100000",
                            "--report_to", "none"], check=True, env=env, cwd=ROOT, capture_output=True)
            run = json.loads((out / "run.json").read_text())
            steady, whole = rates(out / "progress.jsonl")
            rows.append({"method": f"dreamlora {method}", "it_per_s": steady, "whole_bar_it_per_s": whole,
                         "trainable_params": run["trainable_params"], "peak_memory_mib": run["peak_memory_mib"]})
        if args.diffusers_script:
            rate = diffusers_rate(Path(args.diffusers_script), model, ROOT / "tests" / "assets" / "dog",
                                  Path(tmp) / "diffusers", args.steps, env)
            rows.append({"method": "diffusers train_dreambooth_lora.py (PEFT LoRA)", "it_per_s": None,
                         "whole_bar_it_per_s": rate, "trainable_params": None, "peak_memory_mib": None})

    def cell(value, fmt):
        return "–" if value is None else format(value, fmt)

    table = ("| run | it/s steady | it/s whole bar | trainable params | peak RSS (MiB) |\n"
             "|---|---:|---:|---:|---:|\n" + "".join(
                 f"| {r['method']} | {cell(r['it_per_s'], '.1f')} | {r['whole_bar_it_per_s']:.1f} | "
                 f"{cell(r['trainable_params'], ',')} | {cell(r['peak_memory_mib'], '.0f')} |\n" for r in rows))
    write_report(args.output, {"args": vars(args), "rows": rows}, table)


if __name__ == "__main__":
    main()
