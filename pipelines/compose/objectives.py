"""What a candidate mix is scored by, on the few examples of the new task. Both are means over fixed rows, split
across processes (`rows[rank::world]`) and summed back, so one process and several give the same number.

- Diffusion: the denoising loss of the subject's photos (center-cropped at --resolution, VAE means) over a fixed
  set of (timestep, noise) pairs per photo, drawn from --seed: the measure of the trainer's learning test
  (`pipelines.diffusion.loss.fixed_pairs`). The instance prompt is encoded again per candidate (the text encoders
  may carry adapters). On SDXL the UNet is conditioned as in training: both encoders' states, the pooled embedding,
  and each photo's time ids (its original size, the center crop's top-left, the target size).
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
        import random

        from pipelines.diffusion.data import crop_view, read_examples
        from pipelines.diffusion.loss import fixed_pairs

        self.sd, self.prompt, self.batch_size, self.accelerator, self.dtype = sd, prompt, batch_size, accelerator, dtype
        examples = read_examples(photos, "--instance_data_dir", prompt, resolution, is_class=False,
                                 use_captions=False)
        self.photos = [str(e.path) for e in examples]
        views = [crop_view(e.image, resolution, True, False, random.Random(0), flip=False) for e in examples]
        pixels = torch.stack([v.pixels for v in views])  # (N, 3, R, R): `data.center_crops`
        time_ids = torch.tensor([[*v.original_size, *v.crop_top_left, resolution, resolution] for v in views],
                                dtype=torch.float32)  # (N, 6): SDXL's micro-conditioning of each view
        with torch.no_grad():
            vae = sd.vae  # SDXL's own stays fp32
            latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        latents = latents.to(dtype)
        draws = fixed_pairs(tuple(latents.shape), sd.noise_scheduler.config.num_train_timesteps, pairs, seed)
        rows = [(i, t[i], noise[i]) for t, noise in draws for i in range(latents.shape[0])]
        mine = rows[accelerator.process_index::accelerator.num_processes]
        self.latents = torch.stack([latents[i] for i, _, _ in mine]) if mine else latents[:0]
        self.timesteps = torch.stack([t for _, t, _ in mine]) if mine else torch.zeros(0, dtype=torch.long)
        self.noise = torch.stack([n for _, _, n in mine]).to(latents) if mine else latents[:0]
        self.time_ids = time_ids[[i for i, _, _ in mine]].to(latents.device, dtype)  # (rows, 6)
        self.rows = len(rows)

    def condition(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's context (1, 77, d) and, on SDXL, its pooled embedding (1, p), through the encoders as they
        are now (with the candidate's adapters)."""
        from pipelines.diffusion.models import encode_prompts
        from pipelines.diffusion.sdxl import encode_prompts_xl

        sd = self.sd
        if sd.is_sdxl:
            states, pooled = encode_prompts_xl([sd.tokenizer, sd.tokenizer_2], [sd.text_encoder, sd.text_encoder_2],
                                               [self.prompt])
            return states.to(self.dtype), pooled.to(self.dtype)
        return encode_prompts(sd.tokenizer, sd.text_encoder, [self.prompt]), None

    @torch.no_grad()
    def __call__(self) -> float:
        from pipelines.diffusion.loss import denoising_loss

        sd = self.sd
        states, pooled = self.condition()
        total, count = 0.0, 0
        for start in range(0, self.latents.shape[0], self.batch_size):
            latents = self.latents[start:start + self.batch_size]
            n = latents.shape[0]
            is_class = torch.zeros(n, dtype=torch.bool)
            added = None if pooled is None else {"text_embeds": pooled.expand(n, -1),
                                                 "time_ids": self.time_ids[start:start + n]}
            parts = denoising_loss(sd.unet, sd.noise_scheduler, latents, states.expand(n, -1, -1), is_class, None,
                                   timesteps=self.timesteps[start:start + n], noise=self.noise[start:start + n],
                                   added_cond_kwargs=added)
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
