"""Scoring throughput of `eval.score` against the floor of encoding each unique image once.

Builds a samples folder of N distinct images (the test photos with per-image noise) for one subject plus its
references, then times `score()` (CLIP + DINO, CLIP-T text encoding, all pairs, cache writes) against the bare
encoder work: every unique image through both image encoders once, and every prompt through CLIP's text tower.
Backbones are the default architectures with random weights (same cost as the real ones). Target ≤ 1.2×.

    python bench/score_speed.py --images 64      # writes bench/results/score_speed.{json,md}
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from report import write_report  # bench/report.py (scripts run from bench/)

from eval.encoders import load_clip, load_dino
from eval.score import score

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def make_samples(folder: Path, n: int) -> tuple[Path, Path]:
    photos = sorted((ROOT / "tests" / "assets" / "dog").glob("*.jpg"))
    rng = np.random.default_rng(0)
    samples, refs = folder / "samples", folder / "refs" / "dog"
    (samples / "dog").mkdir(parents=True)
    refs.mkdir(parents=True)
    rows = []
    for i in range(n):
        base = np.asarray(Image.open(photos[i % len(photos)]).convert("RGB").resize((256, 256)), dtype=np.int16)
        noisy = np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(samples / "dog" / f"{i:03d}.png")
        rows.append({"file_name": f"dog/{i:03d}.png", "subject": "dog", "method": "bench",
                     "prompt": f"a sks dog {i}", "prompt_for_clip_t": f"a dog {i}"})
    (samples / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for p in photos:
        Image.open(p).save(refs / p.name)
    return samples, folder / "refs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--output", default=str(RESULTS / "score_speed"))
    args = parser.parse_args()
    clip, dino = load_clip("ViT-B-32", "none"), load_dino("vit_small_patch16_224.dino", "none")
    with tempfile.TemporaryDirectory() as tmp:
        samples, refs = make_samples(Path(tmp), args.images)
        paths = sorted((samples / "dog").glob("*.png")) + sorted((refs / "dog").glob("*.jpg"))
        prompts = [f"a dog {i}" for i in range(args.images)]
        score(samples, refs, clip, dino, cache_dir=None)  # warm-up: allocator, thread pools
        start = time.perf_counter()
        images = [Image.open(p).convert("RGB") for p in paths]
        clip.image.encode(images)
        dino.encode(images)
        clip.encode_text(prompts)
        floor = time.perf_counter() - start
        start = time.perf_counter()
        score(samples, refs, clip, dino, cache_dir=Path(tmp) / "cache")
        scored = time.perf_counter() - start
    rows = [{"images": args.images, "references": len(paths) - args.images, "encode_once_s": floor,
             "score_s": scored, "images_per_s": args.images / scored, "ratio": scored / floor,
             "threads": torch.get_num_threads()}]
    r = rows[0]
    table = ("| generated | references | encode-once floor (s) | eval.score (s) | images/s | × floor |\n"
             "|---:|---:|---:|---:|---:|---:|\n"
             f"| {r['images']} | {r['references']} | {r['encode_once_s']:.2f} | {r['score_s']:.2f} | "
             f"{r['images_per_s']:.1f} | {r['ratio']:.2f} |\n")
    write_report(args.output, {"args": vars(args), "rows": rows}, table)


if __name__ == "__main__":
    main()
