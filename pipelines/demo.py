"""`make demo`: the whole job on the embedded tiny model, offline, in a few minutes on a laptop CPU.

1. builds the tiny SD pipeline (`python -m dreamlora.tiny`; `--preset sd2` or `--preset sdxl` runs the whole demo on
   the tiny SD 2.x or SDXL pipeline instead, into runs/demo-sd2 or runs/demo-sdxl),
2. trains each registered method (lora, loraplus, dora, singlora, ...) briefly on four real photos of a dog
   (tests/assets/dog, CC BY 4.0, see tests/assets/LICENSE.md) with `dreamlora/train.py`,
3. samples every adapter with the same prompts and seeds (`pipelines.diffusion.sample`),
4. writes a comparison grid and prints where everything is.

The tiny model has random weights, so the images show that every stage runs, not what a real SD model
would draw; the README has the GPU recipe for that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "assets" / "dog"
PROMPTS = ("a photo of sks dog", "a photo of sks dog on the beach")
PRESETS = {"tiny": "tiny-sd", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}  # demo preset -> the model's folder name


def run(cmd: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"demo: step failed ({proc.returncode}): {' '.join(cmd)}")


def grid(rows: dict[str, list[Path]], out: Path) -> Path:
    """One row per method, one column per prompt, labelled."""
    from PIL import Image, ImageDraw

    cell, label = 128, 90
    cols = max(len(v) for v in rows.values())
    canvas = Image.new("RGB", (label + cols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, files) in enumerate(rows.items()):
        draw.text((6, r * cell + cell // 2 - 6), name, fill="black")
        for c, file in enumerate(files):
            with Image.open(file) as im:
                canvas.paste(im.convert("RGB").resize((cell, cell)), (label + c * cell, r * cell))
    from dreamlora.atomic import save_png_atomic

    return save_png_atomic(canvas, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny",
                        help="the embedded tiny model to run on: tiny (SD 1.x, default), sd2 (SD 2.x: v-prediction, "
                             "an OpenCLIP-style text encoder) or sdxl (two text encoders, micro-conditioning)")
    parser.add_argument("--output_dir", default=None, help="default: runs/demo (runs/demo-sd2, runs/demo-sdxl)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per method")
    args = parser.parse_args(argv)
    out = Path(args.output_dir or ROOT / "runs" / ("demo" if args.preset == "tiny" else f"demo-{args.preset}"))
    model = out / PRESETS[args.preset]
    if not (model / "model_index.json").is_file():
        run([sys.executable, "-m", "dreamlora.tiny", str(model), "--preset", args.preset])

    summary, samples = [], {}
    from dreamlora.methods import METHODS

    for method in METHODS:
        run_dir = out / method
        started = time.time()
        run([sys.executable, str(ROOT / "dreamlora" / "train.py"), "--pretrained_model_name_or_path", str(model),
             "--instance_data_dir", str(PHOTOS), "--instance_prompt", PROMPTS[0], "--output_dir", str(run_dir),
             "--adapter", method, "--rank", "8", "--resolution", "64", "--center_crop", "--random_flip",
             "--target_modules", "to_q,to_k,to_v,to_out.0,conv1,conv2,ff.net.0.proj,ff.net.2",
             "--learning_rate", "1e-3", "--max_train_steps", str(args.steps),
             "--checkpointing_steps", str(args.steps), "--validation_prompt", PROMPTS[1],
             "--validation_steps", str(args.steps), "--validation_inference_steps", "10"])
        sample_dir = run_dir / "samples"
        run([sys.executable, "-m", "pipelines.sample", "--pretrained_model_name_or_path", str(model),
             "--adapter", str(run_dir), *[a for p in PROMPTS for a in ("--prompt", p)], "--seed", "0",
             "--num_inference_steps", "20", "--height", "64", "--width", "64", "--output_dir", str(sample_dir)])
        record = json.loads((run_dir / "run.json").read_text())
        summary.append((method, record["trainable_params"], record["steps"], time.time() - started,
                        record["final_loss"], run_dir))
        samples[method] = sorted(sample_dir.glob("*.png"))

    picture = grid(samples, out / "comparison.png")
    print("\n| method | trainable params | steps | wall (s) | final loss | output |\n|---|---:|---:|---:|---:|---|")
    for method, params, steps, wall, loss, run_dir in summary:
        print(f"| {method} | {params:,} | {steps} | {wall:.0f} | {loss:.4f} | {run_dir} |")
    print(f"\ntiny model:        {model}")
    print("each run folder:   pytorch_lora_weights.safetensors (diffusers), unet_adapter.safetensors (dreamlora),")
    print("                   kohya_lora.safetensors (kohya/LyCORIS/A1111/ComfyUI; DoRA: comfyui_lora.safetensors),")
    print("                   run.json (files_for_tools: which file each tool reads), logs/ (tensorboard), samples/")
    print(f"comparison grid:   {picture}")
    print(f"tensorboard:       tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
