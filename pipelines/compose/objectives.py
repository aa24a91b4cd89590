"""What a candidate mix is scored by, on the few examples of the new task. Both are means over fixed rows, split
across processes (`rows[rank::world]`) and summed back, so one process and several give the same number.

- Diffusion: the denoising loss of the subject's photos (center-cropped at --resolution, VAE means) over a fixed
  set of (timestep, noise) pairs per photo, drawn from --seed: the measure of the trainer's learning test
  (`pipelines.diffusion.loss.fixed_pairs`). The instance prompt is encoded again per candidate when the text encoder
  carries adapters.
- Classifier: the cross-entropy of the labelled examples.
"""

from __future__ import annotations

import torch


def reduce_mean(total: float, count: int, accelerator) -> float:
    """Σ loss / Σ rows over every process (the rows are split between them)."""
    if accelerator.num_processes == 1:
        return total / max(count, 1)
    sums = accelerator.reduce(torch.tensor([total, float(count)], dtype=torch.float64, device=accelerator.device),
                              reduction="sum")
    return float(sums[0] / sums[1])


class DenoisingObjective:
    def __init__(self, sd, photos: str, prompt: str, resolution: int, pairs: int, seed: int, batch_size: int,
                 accelerator, dtype: torch.dtype):
        from pipelines.diffusion.data import center_crops, read_examples
        from pipelines.diffusion.loss import fixed_pairs

        self.sd, self.prompt, self.batch_size, self.accelerator = sd, prompt, batch_size, accelerator
        examples = read_examples(photos, "--instance_data_dir", prompt, resolution, is_class=False,
                                 use_captions=False)
        self.photos = [str(e.path) for e in examples]
        pixels = center_crops(examples, resolution)
        with torch.no_grad():
            vae = sd.vae
            latents = vae.encode(pixels.to(vae.device, dtype)).latent_dist.mean * vae.config.scaling_factor
        draws = fixed_pairs(tuple(latents.shape), sd.noise_scheduler.config.num_train_timesteps, pairs, seed)
        rows = [(i, t[i], noise[i]) for t, noise in draws for i in range(latents.shape[0])]
        mine = rows[accelerator.process_index::accelerator.num_processes]
        self.latents = torch.stack([latents[i] for i, _, _ in mine]) if mine else latents[:0]
        self.timesteps = torch.stack([t for _, t, _ in mine]) if mine else torch.zeros(0, dtype=torch.long)
        self.noise = torch.stack([n for _, _, n in mine]).to(latents) if mine else latents[:0]
        self.rows = len(rows)

    @torch.no_grad()
    def __call__(self) -> float:
        from pipelines.diffusion.loss import denoising_loss
        from pipelines.diffusion.models import encode_prompts

        sd = self.sd
        states = encode_prompts(sd.tokenizer, sd.text_encoder, [self.prompt])
        total, count = 0.0, 0
        for start in range(0, self.latents.shape[0], self.batch_size):
            latents = self.latents[start:start + self.batch_size]
            n = latents.shape[0]
            is_class = torch.zeros(n, dtype=torch.bool)
            parts = denoising_loss(sd.unet, sd.noise_scheduler, latents, states.expand(n, -1, -1), is_class, None,
                                   timesteps=self.timesteps[start:start + n], noise=self.noise[start:start + n])
            total += float(parts["loss"]) * n
            count += n
        return reduce_mean(total, count, self.accelerator)


class CrossEntropyObjective:
    def __init__(self, model, features: list[dict], collator, batch_size: int, accelerator):
        self.model, self.collator, self.batch_size, self.accelerator = model, collator, batch_size, accelerator
        self.features = features[accelerator.process_index::accelerator.num_processes]
        self.rows = len(features)

    @torch.no_grad()
    def __call__(self) -> float:
        device = self.accelerator.device
        total = 0.0
        self.model.eval()
        for start in range(0, len(self.features), self.batch_size):
            batch = self.collator(self.features[start:start + self.batch_size])
            labels = batch.pop("labels").to(device)
            logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        return reduce_mean(total, len(self.features), self.accelerator)
