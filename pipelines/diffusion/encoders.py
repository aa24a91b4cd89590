"""What the DreamBooth loss reads, encoded: photos to scaled VAE latents (cached per view with --cache_latents, with
their loss masks at latent size) and prompts to the SD 1.x/2.x text encoder's states (cached per prompt when the
encoder is frozen). SDXL's two encoders are `pipelines.diffusion.sdxl.PromptEncoderXL`."""

from __future__ import annotations

import torch

from pipelines.diffusion import data as dbdata
from pipelines.diffusion.loss import draw_noise, latent_mask
from pipelines.diffusion.models import encode_prompts


class LatentEncoder:
    """Pixels -> scaled VAE latents; with --cache_latents each (image, flip) is encoded once and its latent
    distribution sampled per step, and its loss mask (if any) kept at latent size beside it."""

    def __init__(self, vae, dtype, cache: bool):
        self.vae, self.dtype, self.cache, self.stats, self.mask_cache = vae, dtype, cache, {}, {}

    @torch.no_grad()
    def _dist(self, pixels: torch.Tensor):
        return self.vae.encode(pixels.to(self.vae.device, self.dtype)).latent_dist

    def fill_cache(self, dataset: dbdata.DreamBoothDataset) -> None:
        from tqdm.auto import tqdm

        for key, pixels in tqdm(list(dataset.all_views()), desc="caching latents", unit="img"):
            dist = self._dist(pixels[None])
            self.stats[key] = (dist.mean[0], dist.std[0])
        if dataset.masked:  # each at its own latent's size (buckets differ)
            self.mask_cache = {key: latent_mask(mask[None], self.stats[key][0].shape[-2:])[0].to(self.vae.device)
                               for key, mask in dataset.all_masks()}

    def masks(self, batch: dict) -> torch.Tensor | None:
        """The batch's loss masks (B, 1, ., .), or None when no photo has one."""
        if self.cache and self.mask_cache:
            return torch.stack([self.mask_cache[k] for k in batch["keys"]])
        return batch.get("masks")

    @torch.no_grad()
    def means(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE means, no sampling (the validation loss's fixed latents)."""
        return self._dist(pixels).mean * self.vae.config.scaling_factor

    def __call__(self, batch: dict, generators: list[torch.Generator]) -> torch.Tensor:
        if self.cache:
            mean = torch.stack([self.stats[k][0] for k in batch["keys"]])
            std = torch.stack([self.stats[k][1] for k in batch["keys"]])
        else:
            dist = self._dist(batch["pixel_values"])
            mean, std = dist.mean, dist.std
        return (mean + std * draw_noise(mean.shape, generators).to(mean)) * self.vae.config.scaling_factor


class PromptEncoder:
    """CLIP states for a batch's prompts: through the trained text encoder, or cached per prompt when frozen."""

    def __init__(self, tokenizer, trained_text_encoder, frozen_text_encoder, cache: bool = True):
        self.tokenizer, self.trained, self.frozen, self.cache = tokenizer, trained_text_encoder, frozen_text_encoder, {}
        self.caching = cache  # off with --shuffle_caption: shuffled captions rarely repeat, the cache would only grow

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.trained is not None:
            return encode_prompts(self.tokenizer, self.trained, prompts)
        if not self.caching:
            with torch.no_grad():
                return encode_prompts(self.tokenizer, self.frozen, prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad():
                self.cache.update(zip(missing, encode_prompts(self.tokenizer, self.frozen, missing), strict=True))
        return torch.stack([self.cache[p] for p in prompts])
