"""`dreamlora/train.py` itself on the SD 1.5 architecture (random weights) at 256 px, per method.

Builds `python -m dreamlora.tiny --preset sd15` once (cached under bench/results/.cache), then trains each
method for a few steps on the four test photos with --cache_latents (the VAE encodes each image once) and
reports the steady step time from the progress file and the peak RSS from run.json. The frozen-base floor
for the same UNet step comes from adapter_step.py's last run (bench/results/adapter_step.json).

    python bench/train_step_sd15.py     # writes bench/results/train_step_sd15.{json,md}
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


def step_times(progress: Path, skip: int) -> list[float]:
    steps = [json.loads(line) for line in progress.read_text().splitlines()]
    times = [s["time"] for s in steps if s.get("event") == "step"]
    return [b - a for a, b in zip(times[skip:], times[skip + 1:], strict=False)]


def floor_step_s(rank: int) -> float | None:
    path = RESULTS / "adapter_step.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["rows"]
    return next((r["step_s"] for r in rows if r["config"] == "floor" and r["rank"] == rank), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--output", default=str(RESULTS / "train_step_sd15"))
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    model = RESULTS / ".cache" / "sd15-random"
    if not (model / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "dreamlora.tiny", str(model), "--preset", "sd15"], check=True,
                       env=env, cwd=ROOT)
    rows = []
    for method in METHODS:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, str(ROOT / "dreamlora" / "train.py"), "--pretrained_model_name_or_path",
                            str(model), "--instance_data_dir", str(ROOT / "tests" / "assets" / "dog"),
                            "--instance_prompt", "a photo of sks dog", "--output_dir", tmp, "--resolution", "256",
                            "--center_crop", "--cache_latents", "--adapter", method, "--rank", str(args.rank),
                            "--max_train_steps", str(args.steps), "--checkpointing_steps", "100000",
                            "--report_to", "none"], check=True, env=env, cwd=ROOT, capture_output=True)
            run = json.loads((Path(tmp) / "run.json").read_text())
            times = step_times(Path(tmp) / "progress.jsonl", skip=2)
        rows.append({"method": method, "step_s_min": min(times), "step_s_median": sorted(times)[len(times) // 2],
                     "trainable_params": run["trainable_params"], "peak_rss_mib": run["peak_memory_mib"]})
    floor = floor_step_s(args.rank)
    table = (f"train.py, SD 1.5 architecture (random), 256 px, batch 1, rank {args.rank}, attention targets, "
             f"--cache_latents, CPU fp32; frozen-base UNet floor {floor if floor is None else round(floor, 3)} s "
             "(adapter_step.py)\n\n| method | step (s, min) | step (s, median) | × floor | trainable params | "
             "peak RSS (MiB) |\n|---|---:|---:|---:|---:|---:|\n" + "".join(
                 f"| {r['method']} | {r['step_s_min']:.3f} | {r['step_s_median']:.3f} | "
                 f"{(r['step_s_min'] / floor) if floor else float('nan'):.3f} | {r['trainable_params']:,} | "
                 f"{r['peak_rss_mib']:.0f} |\n" for r in rows))
    write_report(args.output, {"args": vars(args), "floor_step_s": floor, "rows": rows}, table)


if __name__ == "__main__":
    main()
