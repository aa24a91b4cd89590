"""Composition on images, on the tiny model (offline): a library of three subject adapters (dog, backpack, clock from
tests/assets), composed for each of them and for a subject in none (duck_toy: two photos searched, one held out).

    python bench/compose_images.py          # writes bench/results/compose_images/{results.json,report.md}

Two bases: the embedded tiny model as it is, and the same model with a VAE that keeps its photos' signal
(`pipelines.diffusion.tiny_model.keep_photo_signal`), which the tests use. The first shows why the second exists:
with the random VAE every photo is noise to the UNet, each subject's adapter learns generic denoising, and the
own adapter is not even the best one on its own photos. Losses are the composition's objective (the fixed-pair
denoising loss), from `python -m pipelines.compose` runs (`--weights` for the fixed mixes); it also records the
composition's wall time against training one LoRA on the same photos.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
LIBRARY = ("dog", "backpack", "clock")
PROMPT = "a photo of sks thing"
TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2,ff.net.0.proj,ff.net.2"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def call(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        if subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT).returncode != 0:
            raise RuntimeError(f"failed: see {log}")


def train(model: Path, photos: Path, out: Path, steps: int) -> float:
    if not (out / "run.json").is_file():
        call([sys.executable, str(ROOT / "dreamlora" / "train.py"), "--pretrained_model_name_or_path", str(model),
              "--instance_data_dir", str(photos), "--instance_prompt", PROMPT, "--output_dir", str(out),
              "--resolution", "64", "--center_crop", "--report_to", "none", "--rank", "4", "--target_modules", TARGETS,
              "--max_train_steps", str(steps), "--learning_rate", "3e-3", "--checkpointing_steps", "100000",
              "--no_kohya_format"], out.with_suffix(".log"))
    return json.loads((out / "run.json").read_text())["wall_time_s"]


def compose(model: Path, library: list[Path], photos: Path, out: Path, *flags: str) -> dict:
    if not (out / "run.json").is_file():
        command = [sys.executable, "-m", "pipelines.compose", "--pretrained_model_name_or_path", str(model),
                   "--instance_data_dir", str(photos), "--instance_prompt", PROMPT, "--resolution", "64",
                   "--output_dir", str(out), "--report_to", "none", *flags]
        for folder in library:
            command += ["--adapter", str(folder)]
        out.parent.mkdir(parents=True, exist_ok=True)
        call(command, out.with_suffix(".log"))
    return json.loads((out / "run.json").read_text())


def study(model: Path, root: Path, steps: int) -> dict:
    library = [root / "library" / s for s in LIBRARY]
    train_time = {s: train(model, ASSETS / s, root / "library" / s, steps) for s in LIBRARY}
    names = {str(a): a.name for a in library}
    result: dict = {"library_train_time_s": train_time, "targets": {}}
    for subject in LIBRARY:
        run = compose(model, library, ASSETS / subject, root / "compose" / subject)
        result["targets"][subject] = {
            "seeded_loss": {names.get(k.removeprefix("single:"), k): v["loss"] for k, v in run["seeded"].items()},
            "composed_loss": run["composed_loss"], "weights": {names[k]: w for k, w in run["weights"].items()},
            "search_time_s": run["search_time_s"], "wall_time_s": run["wall_time_s"]}
    # a subject in no adapter: search on two photos, compare every mix on the third
    search_photos, held_out = root / "duck_search", root / "duck_held_out"
    files = sorted((ASSETS / "duck_toy").iterdir())
    for folder, chosen in ((search_photos, files[:2]), (held_out, files[2:])):
        folder.mkdir(parents=True, exist_ok=True)
        for f in chosen:
            shutil.copy(f, folder)
    run = compose(model, library, search_photos, root / "compose" / "duck_toy")
    mixes = {"composed": list(run["weights"].values()), "uniform": [1 / 3] * 3, "base": [0.0] * 3,
             **{s: [1.0 if t == s else 0.0 for t in LIBRARY] for s in LIBRARY}}
    held = {name: compose(model, library, held_out, root / "held_out" / name, "--weights",
                          ",".join(map(str, w)))["search_loss"] for name, w in mixes.items()}
    result["targets"]["duck_toy (new)"] = {
        "seeded_loss": {names.get(k.removeprefix("single:"), k): v["loss"] for k, v in run["seeded"].items()},
        "composed_loss": run["composed_loss"], "weights": {names[k]: w for k, w in run["weights"].items()},
        "held_out_loss": held, "search_time_s": run["search_time_s"], "wall_time_s": run["wall_time_s"]}
    # the cost: one LoRA trained on the new subject's two photos, as the library's were
    result["lora_on_the_new_photos_wall_time_s"] = train(model, search_photos, root / "lora_duck", steps)
    return result


def report(results: dict) -> str:
    lines = ["# Composition on images (tiny model, fixed-pair denoising loss; lower is better)", ""]
    for base, r in results.items():
        lines += [f"## {base}", "", "| photos of | base | dog alone | backpack alone | clock alone | uniform | "
                  "composed | weights (dog, backpack, clock) | search s |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for target, t in r["targets"].items():
            s = t["seeded_loss"]
            w = ", ".join(f"{t['weights'][n]:+.2f}" for n in LIBRARY)
            lines.append(f"| {target} | {s['base']:.4f} | {s['dog']:.4f} | {s['backpack']:.4f} | {s['clock']:.4f} | "
                         f"{s['uniform']:.4f} | {t['composed_loss']:.4f} | {w} | {t['search_time_s']:.1f} |")
        held = r["targets"]["duck_toy (new)"]["held_out_loss"]
        lines += ["", "duck_toy's held-out photo: " + ", ".join(f"{k} {v:.4f}" for k, v in held.items()),
                  f"One LoRA on duck_toy's two photos: {r['lora_on_the_new_photos_wall_time_s']:.1f} s wall; "
                  f"the composition: {r['targets']['duck_toy (new)']['wall_time_s']:.1f} s wall.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "compose_images"))
    p.add_argument("--steps", type=int, default=120, help="training steps of each library adapter")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from pipelines.diffusion import tiny_model

    out = Path(args.output)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        random_vae = tiny_model.write(Path(tmp) / "tiny")
        signal = tiny_model.keep_photo_signal(Path(shutil.copytree(random_vae, Path(tmp) / "signal")),
                                              [ASSETS / s for s in (*LIBRARY, "duck_toy")])
        for name, model in (("embedded tiny model (random VAE)", random_vae),
                            ("tiny model with a signal-keeping VAE (the tests')", signal)):
            results[name] = study(model, out / ("random_vae" if "random" in name else "signal_vae"), args.steps)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report(results))
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
