"""The DreamBooth denoising loss, with prior preservation, min-SNR weighting and noise offset.

Each sample's noise and timestep come from a generator the caller seeds from (seed, epoch, sample), so a
resumed run draws exactly what an uninterrupted one would, and the draws do not depend on the batch size
or the number of processes. Prediction types: epsilon, v_prediction and sample (x0); others are refused.

A loss mask (`--masked_loss`) weights the squared error per latent pixel: the pixel mask is area-averaged down
to the latent grid (each latent pixel gets the mean of the VAE-factor square it encodes), and the weighted error
is averaged over *all* latent elements, as kohya's `apply_masked_loss` followed by its mean over (C, H, W) does:
masked-out pixels count as zeros, not as absent, so a photo that is half masked contributes about half its
unmasked loss. (The alternative, dividing by the mask's sum, would let a tiny mask dominate a batch.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(noise_scheduler) -> str:
    kind = noise_scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"the model's scheduler has prediction_type {kind!r}; training supports "
                         f"{', '.join(PREDICTION_TYPES)}")
    return kind


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023) on the MSE of each prediction type: min(SNR, γ)/SNR for ε,
    min(SNR, γ)/(SNR+1) for v, min(SNR, γ) for x0 (`sample`), SNR = ᾱ_t/(1-ᾱ_t)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    kind = prediction_type(noise_scheduler)
    if kind == "v_prediction":
        return weights / (snr + 1)
    if kind == "epsilon":
        return weights / snr
    return weights


def draw_noise(shape: tuple[int, ...], generators: list[torch.Generator], noise_offset: float = 0.0) -> torch.Tensor:
    """N(0, 1) noise of `shape`, row i from generators[i]; with an offset, each (row, channel) is shifted by
    offset·N(0, 1) so the model learns very dark and very bright images (the mean brightness varies)."""
    rows = []
    for g in generators:
        row = torch.randn(shape[1:], generator=g)
        if noise_offset:
            row = row + noise_offset * torch.randn((shape[1], *[1] * (len(shape) - 2)), generator=g)
        rows.append(row)
    return torch.stack(rows)


def draw_timesteps(num_train_timesteps: int, generators: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in generators])


def target_of(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = prediction_type(noise_scheduler)
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return latents if kind == "sample" else noise


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A (B, 1, H, W) pixel mask area-averaged to (B, 1, h, w) latent pixels (h = H / the VAE's factor)."""
    return F.interpolate(mask.float(), size=tuple(latent_size), mode="area")


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   is_class: torch.Tensor, generators: list[torch.Generator] | None, *,
                   prior_loss_weight: float = 1.0, snr_gamma: float | None = None, noise_offset: float = 0.0,
                   timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, added_cond_kwargs: dict | None = None) -> dict:
    """Loss of one batch: instance MSE + prior_loss_weight · class MSE. Returns the parts for logging.
    `added_cond_kwargs`: SDXL's pooled text embedding and time ids (`pipelines.diffusion.sdxl`).

    Each row draws its noise and timestep from its own generator (`generators[i]`), so a sample's draws do
    not depend on the batch it lands in. With `snr_gamma` every row is weighted, class (prior) rows included,
    as kohya's scripts do (diffusers' SDXL script weights only the instance half). `mask` (B, 1, H, W) in
    [0, 1], at pixel or latent size, weights each latent pixel's squared error (see the module's note)."""
    if noise is None:
        noise = draw_noise(latents.shape, generators, noise_offset).to(latents)
    if timesteps is None:
        timesteps = draw_timesteps(noise_scheduler.config.num_train_timesteps, generators)
    timesteps = timesteps.to(latents.device)
    target = target_of(noise_scheduler, latents, noise, timesteps)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}  # SDXL's only
    pred = unet(noisy, timesteps, encoder_hidden_states, **extra).sample
    squared = F.mse_loss(pred.float(), target.float(), reduction="none")  # (B, C, h, w)
    if mask is not None:
        squared = squared * latent_mask(mask.to(squared.device), squared.shape[-2:])
    per_sample = squared.mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma:
        per_sample = per_sample * snr_weights(noise_scheduler, timesteps, snr_gamma).to(per_sample)
    is_class = is_class.to(per_sample.device)
    instance = per_sample[~is_class].mean()
    parts = {"instance_loss": instance, "loss": instance}
    if is_class.any():
        prior = per_sample[is_class].mean()
        parts.update(prior_loss=prior, loss=instance + prior_loss_weight * prior)
    return parts


def fixed_pairs(latents_shape: tuple[int, ...], num_train_timesteps: int, pairs: int = 8,
                seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`pairs` draws of (timesteps (N,), noise (N, C, h, w)) for N latents: the same for every call with the same
    seed, so losses before and after training (or of two candidate adapters) compare like with like."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(pairs):
        timesteps = torch.randint(0, num_train_timesteps, (latents_shape[0],), generator=gen)
        out.append((timesteps, torch.randn(latents_shape, generator=gen)))
    return out


@torch.no_grad()
def fixed_pairs_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     pairs: int = 8, seed: int = 1234, added_cond_kwargs: dict | None = None) -> float:
    """Mean denoising loss of `latents` over a fixed set of (timestep, noise) pairs (`fixed_pairs`)."""
    total = 0.0
    is_class = torch.zeros(latents.shape[0], dtype=torch.bool)
    for timesteps, noise in fixed_pairs(tuple(latents.shape), noise_scheduler.config.num_train_timesteps, pairs, seed):
        total += denoising_loss(unet, noise_scheduler, latents, encoder_hidden_states, is_class, None,
                                timesteps=timesteps, noise=noise.to(latents),
                                added_cond_kwargs=added_cond_kwargs)["loss"].item()
    return total / pairs
