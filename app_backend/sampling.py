"""The Sample tab's work: a base model plus trained adapters with scales, through `pipelines.diffusion.sample`.

The base pipeline stays loaded between requests (the app serialises GPU work, and a lock guards the shared
pipeline besides); each request attaches its adapters, generates, and detaches them again. Images go to
RUNS/_samples/<id>/ with `metadata.jsonl` (prompt, seed, adapters, plus subject, method and
prompt_for_clip_t so the folder can be scored) and a `run.json` naming the adapters' training folders.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from app_backend.jobs import JobManager, read_json
from app_backend.safety import AppInputError, number
from app_backend.settings import SUBJECT, resolve_base_model
from dreamlora.atomic import atomic_write_text

SAMPLES = "_samples"
LIMITS = {"num_images": (1, 8), "steps": (1, 150), "size": (64, 1024)}


class Sampler:
    def __init__(self, jobs: JobManager):
        self.jobs = jobs
        self._pipe, self._model = None, None
        self._lock = threading.Lock()

    def _pipeline(self, model: str):
        from pipelines.diffusion.sample import load_pipeline

        if self._model != model:
            self._pipe, self._model = None, None
            try:
                self._pipe = load_pipeline(model)
            except (OSError, ValueError) as e:
                raise AppInputError(f"Base model {model!r} could not be loaded: {e}") from None
            self._model = model
        return self._pipe

    def release(self) -> None:
        """Free the cached pipeline (its GPU memory) before a training subprocess needs it."""
        with self._lock:
            self._pipe, self._model = None, None
        free_gpu_cache()

    def specs(self, adapters: list[tuple[str | None, float]]) -> list:
        """(run name, scale) pairs -> AdapterSpecs of runs that have an adapter; empty slots are skipped."""
        from pipelines.diffusion.sample import AdapterSpec

        specs = []
        for name, scale in adapters:
            if not name:
                continue
            run_dir = self.jobs.existing(name)
            if not self.jobs.has_adapter(name):
                raise AppInputError(f"Run {name!r} has no adapter yet: it is written when the run finishes or "
                                    "is stopped.")
            specs.append(AdapterSpec(run_dir, number(scale, f"The scale of {name!r}", -4, 4, float)))
        return specs

    def sample(self, base_model: str, adapters: list[tuple[str | None, float]], prompt: str,
               negative_prompt: str = "", seed: int = 0, num_images: int = 1, steps: int = 30,
               guidance: float = 7.5, size: int = 512) -> tuple[Path, list[Path]]:
        """Generate; returns the output folder and its PNGs."""
        from pipelines.diffusion.pivotal import merged_abstractions
        from pipelines.diffusion.sample import generate

        prompt = (prompt or "").strip()
        if not prompt:
            raise AppInputError("Write a prompt.")
        given = {"num_images": num_images, "steps": steps, "size": size}
        values = {key: number(given[key], key.replace("_", " ").capitalize(), *LIMITS[key]) for key in LIMITS}
        seed, guidance = number(seed, "Seed", 0, 2**32 - 1), number(guidance, "Guidance", 0, 30, float)
        if values["size"] % 8:
            raise AppInputError("Image size must be a multiple of 8.")
        specs = self.specs(adapters)
        model = resolve_base_model(self.jobs.runs_dir, base_model)
        out = self.jobs.runs_dir / SAMPLES / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        with self._lock, adapters_attached(self._pipeline(model), specs, model) as (pipe, applied):
            token = self.jobs.settings(specs[0].path.name).get("token", "") if specs else ""
            method = "+".join(a["method"] for a in applied) or "base"
            extra = {"adapters": applied, "subject": SUBJECT, "method": method,
                     "prompt_for_clip_t": " ".join(w for w in prompt.split() if w != token)}
            generate(pipe, [prompt], out, negative_prompt=(negative_prompt or "").strip() or None, seed=seed,
                     num_images_per_prompt=values["num_images"], num_inference_steps=values["steps"],
                     guidance_scale=guidance, height=values["size"], width=values["size"], extra=extra,
                     abstractions=merged_abstractions(applied))  # a pivotal run's "TOK" -> its trained tokens
        run = {"base_model": model, "adapters": applied, "prompt": prompt,
               "references": str(specs[0].path / "data") if specs else None}
        atomic_write_text(out / "run.json", json.dumps(run, indent=1))
        return out, sorted(out.glob("*.png"))

    def folders(self) -> list[str]:
        """Sample folders that can be scored (made with at least one adapter), newest first."""
        root = self.jobs.runs_dir / SAMPLES
        found = [p for p in root.glob("*") if (p / "metadata.jsonl").is_file()
                 and read_json(p / "run.json").get("references")]
        return [f"{SAMPLES}/{p.name}" for p in sorted(found, reverse=True)]


@contextmanager
def adapters_attached(pipe, specs: list, model: str):
    """The pipeline with `specs` attached (each under its own name and scale, a pivotal run's embeddings too),
    detached again after."""
    import dreamlora
    from pipelines.diffusion.pivotal import unload_embeddings
    from pipelines.diffusion.sample import apply_adapters, pipeline_components

    def detach_all():  # every component an adapter can sit on: SDXL's second text encoder too
        for component in pipeline_components(pipe).values():
            for name in dreamlora.adapter_names(component):
                dreamlora.detach(component, name)
        unload_embeddings(pipe)

    try:
        applied = apply_adapters(pipe, specs)
    except (ValueError, FileNotFoundError) as e:  # e.g. an adapter trained on another architecture
        detach_all()
        raise AppInputError(f"An adapter does not fit the base model {model!r}: {e}") from None
    try:
        yield pipe, applied
    finally:
        detach_all()


def free_gpu_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
