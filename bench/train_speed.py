"""Steady-state training speed of `dreamlora/train.py` on the embedded tiny model, per method.

Settings of the issue's anchor (diffusers' train_dreambooth_lora.py at about 16 it/s on 2 CPU cores):
64 px, rank 4, batch 1, 60 steps, attention targets, frozen text encoder. it/s is measured from the
progress file between step 10 and the last step, so start-up (imports, model loading) is not counted.

    python bench/train_speed.py        # writes bench/results/train_speed.{json,md}
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
METHODS = ("lora", "loraplus", "dora", "singlora")


def steady_its(progress: Path, skip: int = 10) -> float:
    steps = [json.loads(line) for line in progress.read_text().splitlines()]
    steps = [s for s in steps if s.get("event") == "step" and s["step"] >= skip]
    return (steps[-1]["step"] - steps[0]["step"]) / (steps[-1]["time"] - steps[0]["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
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
            rows.append({"method": method, "it_per_s": steady_its(out / "progress.jsonl"),
                         "trainable_params": run["trainable_params"], "wall_time_s": run["wall_time_s"],
                         "peak_memory_mib": run["peak_memory_mib"]})
    table = ("| method | it/s (steady) | trainable params | wall incl. start-up (s) | peak RSS (MiB) |\n"
             "|---|---:|---:|---:|---:|\n" + "".join(
                 f"| {r['method']} | {r['it_per_s']:.1f} | {r['trainable_params']:,} | {r['wall_time_s']:.1f} | "
                 f"{r['peak_memory_mib']:.0f} |\n" for r in rows))
    write_report(args.output, {"args": vars(args), "rows": rows}, table)


if __name__ == "__main__":
    main()
