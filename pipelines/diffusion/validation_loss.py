"""Validation loss (kohya's `--validation_split --validate_every_n_steps --max_validation_steps --validation_seed`):
the denoising loss of instance photos held out of training, on (image, timestep, noise) triples that are drawn
once and stay fixed for the whole run, so the curve moves only when the adapter does.

- Held out: round(F·N) of the N instance photos (at least one when F > 0), chosen by a permutation seeded from
  the validation seed; a split that leaves nothing to train on is refused.
- A held-out photo is seen center-cropped and unflipped and encoded to its VAE mean (the latent is not sampled),
  so the only randomness is the triples: DRAWS_PER_IMAGE per photo, draw k with its timestep uniform in the k-th
  of DRAWS_PER_IMAGE equal bands of the schedule (every evaluation spans nearly clean to pure noise, which a
  handful of uniform draws would not) and N(0, 1) noise (no noise offset). Each triple has its own generator
  seeded from (validation seed, photo, k), and their order is a seeded permutation, so the set is a function of
  the seed alone, never of an RNG state: a resumed run recomputes exactly the same triples.
- The loss is the training loss of those triples without the prior term (the loss mask and min-SNR weights
  apply as in training), averaged over triples, under no_grad with the adapters in eval mode (no dropout).
  `--max_validation_steps M` keeps the first M batches of `--train_batch_size` triples.
- Several processes: batch b is computed by process b mod P and one all-reduce sums (loss·rows, rows), so every
  process gets the same value from one collective per evaluation, which all of them reach at the same steps.
  The forward runs through the unwrapped modules: a DDP forward may broadcast buffers, a collective that
  processes with different batch counts would not all reach.
- The history is written into each checkpoint (`validation_loss.json`) and read back on resume, so run.json
  holds the whole run's curve.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamlora.atomic import atomic_write_json
from dreamlora.errors import DataError
from pipelines.diffusion.data import Example, crop_view
from pipelines.diffusion.loss import denoising_loss
from pipelines.trainer.order import stable_seed
from pipelines.trainer.progress import ProgressLog

DRAWS_PER_IMAGE = 4
STREAM = 2  # stable_seed's stream tag of validation draws (training rows use 0: instance, 1: class)
HISTORY_FILE = "validation_loss.json"  # inside each checkpoint folder


def split_held_out(examples: list[Example], fraction: float, seed: int, folder) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples), each in folder order."""
    if fraction <= 0:
        return examples, []
    held = max(1, round(fraction * len(examples)))
    if held >= len(examples):
        raise DataError(f"--validation_split {fraction}: holding out {held} of the {len(examples)} photos in "
                        f"--instance_data_dir {str(folder)!r} leaves none to train on")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(stable_seed(seed, STREAM)))
    chosen = set(order[:held].tolist())
    return ([e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen])


@dataclass
class Triples:
    image: torch.Tensor  # (N,) index of the held-out photo
    timesteps: torch.Tensor  # (N,)
    noise: torch.Tensor  # (N, C, h, w)


def draw_triples(num_images: int, latent_shape: tuple[int, ...], num_train_timesteps: int, seed: int,
                 draws: int = DRAWS_PER_IMAGE) -> Triples:
    """The fixed validation set (see the module's note): a pure function of its arguments."""
    draws = min(draws, num_train_timesteps)
    images, timesteps, noise = [], [], []
    for i in range(num_images):
        for k in range(draws):
            g = torch.Generator().manual_seed(stable_seed(seed, STREAM, i, k))
            band = (k * num_train_timesteps // draws, (k + 1) * num_train_timesteps // draws)
            timesteps.append(torch.randint(*band, (1,), generator=g))
            noise.append(torch.randn(tuple(latent_shape), generator=g))
            images.append(i)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(stable_seed(seed, STREAM, -1)))
    return Triples(torch.tensor(images)[order], torch.cat(timesteps)[order], torch.stack(noise)[order])


def batch_slices(count: int, batch_size: int, max_batches: int | None) -> list[slice]:
    slices = [slice(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]
    return slices[:max_batches] if max_batches else slices


def held_out_views(examples: list[Example], resolution: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(pixels (N, 3, R, R) in [-1, 1], masks (N, 1, R, R) or None when no held-out photo has one, SDXL's time ids
    (N, 6) of each view): center crops, never flipped."""
    views = [crop_view(e.image, resolution, True, False, random.Random(0), flip=False, mask=e.mask) for e in examples]
    pixels = torch.stack([v.pixels for v in views])
    time_ids = torch.tensor([[*v.original_size, *v.crop_top_left, resolution, resolution] for v in views],
                            dtype=torch.float32)
    if all(v.mask is None for v in views):
        return pixels, None, time_ids
    return pixels, torch.stack([torch.ones_like(v.pixels[:1]) if v.mask is None else v.mask for v in views]), time_ids


@torch.no_grad()
def triples_loss_sum(unet, noise_scheduler, latents: torch.Tensor, states: torch.Tensor, masks: torch.Tensor | None,
                     triples: Triples, rows: slice, snr_gamma: float | None = None,
                     added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over the triples `rows` of their denoising loss (the instance term of `denoising_loss`). `added`: SDXL's
    per-photo pooled embedding and time ids, or None."""
    image = triples.image[rows].to(latents.device)
    count = len(image)
    parts = denoising_loss(unet, noise_scheduler, latents[image], states[image],
                           torch.zeros(count, dtype=torch.bool), None, snr_gamma=snr_gamma,
                           timesteps=triples.timesteps[rows], noise=triples.noise[rows].to(latents),
                           mask=None if masks is None else masks[image],
                           added_cond_kwargs=None if added is None else {k: v[image] for k, v in added.items()})
    return parts["instance_loss"].double() * count


class ValidationLoss:
    """The task's hook: `start` once the models are ready, `due(step)` to follow the cadence, `run` on every
    process at those steps, `summary` for run.json."""

    def __init__(self, held_out: list[Example], *, seed: int, every: int, max_batches: int | None,
                 batch_size: int, resolution: int, snr_gamma: float | None, max_steps: int, progress_path: Path,
                 resume_from: Path | None):
        self.held_out, self.seed, self.every, self.max_batches = held_out, seed, every, max_batches
        self.batch_size, self.resolution, self.snr_gamma, self.max_steps = batch_size, resolution, snr_gamma, max_steps
        self.progress_path, self.resume_from = progress_path, resume_from
        self.history: list[dict] = []

    def start(self, accelerator, noise_scheduler, encode_latents: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Encode the held-out photos (`encode_latents`: pixels -> scaled latents), draw the triples, read the
        history a resumed checkpoint holds, and have every checkpoint save it."""
        self.accelerator, self.noise_scheduler = accelerator, noise_scheduler
        pixels, masks, self.time_ids = held_out_views(self.held_out, self.resolution)
        self.latents = encode_latents(pixels)  # (N, C, h, w)
        self.masks = None if masks is None else masks.to(self.latents.device)
        self.triples = draw_triples(len(self.held_out), tuple(self.latents.shape[1:]),
                                    noise_scheduler.config.num_train_timesteps, self.seed)
        self.batches = batch_slices(len(self.triples.image), self.batch_size, self.max_batches)
        if self.resume_from is not None and (self.resume_from / HISTORY_FILE).is_file():
            self.history = json.loads((self.resume_from / HISTORY_FILE).read_text(encoding="utf-8"))["history"]
        self.log = ProgressLog(self.progress_path if accelerator.is_main_process else None, 0, 0)

        def save_history(models, weights, output_dir):
            if accelerator.is_main_process:
                atomic_write_json(Path(output_dir) / HISTORY_FILE, {"history": self.history})

        accelerator.register_save_state_pre_hook(save_history)

    def due(self, step: int) -> bool:
        return step == self.max_steps or step % self.every == 0

    def run(self, unet, encode_prompts: Callable, trained: Iterable[torch.nn.Module], step: int) -> float:
        """The validation loss at `step` (every process calls this; each gets the same value). `unet`: the
        unwrapped UNet; `encode_prompts(prompts, time_ids)` -> (context, SDXL's added conditioning or None);
        `trained`: the modules whose adapters train (put in eval mode meanwhile)."""
        accelerator = self.accelerator
        trained = list(trained)
        for model in trained:
            model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum of losses, triples)
        try:
            with torch.no_grad(), accelerator.autocast():
                states, added = encode_prompts([e.prompt for e in self.held_out], self.time_ids)
                states = states.to(self.latents.dtype)
                for rows in self.batches[accelerator.process_index::accelerator.num_processes]:
                    total[0] += triples_loss_sum(unet, self.noise_scheduler, self.latents, states, self.masks,
                                                 self.triples, rows, self.snr_gamma, added).to(total.device)
                    total[1] += rows.stop - rows.start
        finally:
            for model in trained:
                model.train()
        total = accelerator.reduce(total, "sum")
        value = (total[0] / total[1]).item()
        self.history.append({"step": step, "loss": value})
        accelerator.log({"val/loss": value}, step=step)
        self.log.write(event="validation", step=step, **{"val/loss": round(value, 6)})
        if accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"step {step}: val/loss {value:.6f}")
        return value

    def summary(self) -> dict:
        """run.json's `validation_loss`."""
        return {"held_out": [e.path.name for e in self.held_out], "triples": len(self.triples.image),
                "batches": len(self.batches), "seed": self.seed, "every_n_steps": self.every,
                "history": self.history, "final": self.history[-1]["loss"] if self.history else None}
