"""The DreamBooth denoising loss, with prior preservation, min-SNR weighting and noise offset.

Noise and timesteps come from a generator the caller seeds per micro-step, so a resumed run draws exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   is_class: torch.Tensor, generator: torch.Generator, *, prior_loss_weight: float = 1.0,
                   snr_gamma: float | None = None, noise_offset: float = 0.0,
                   timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> dict:
    """Loss of one batch: instance MSE + prior_loss_weight · class MSE. Returns the parts for logging."""
    b = latents.shape[0]
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        if noise_offset:
            # shifts the mean brightness of the noise so the model learns very dark/bright images
            noise = noise + noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator).to(latents)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = unet(noisy, timesteps, encoder_hidden_states).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma:
        per_sample = per_sample * snr_weights(noise_scheduler, timesteps, snr_gamma).to(per_sample)
    is_class = is_class.to(per_sample.device)
    instance = per_sample[~is_class].mean()
    parts = {"instance_loss": instance, "loss": instance}
    if is_class.any():
        prior = per_sample[is_class].mean()
        parts.update(prior_loss=prior, loss=instance + prior_loss_weight * prior)
    return parts


@torch.no_grad()
def fixed_pairs_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     pairs: int = 8, seed: int = 1234) -> float:
    """Mean denoising loss of `latents` over a fixed set of (timestep, noise) pairs: the same pairs for every
    call with the same seed, so before/after numbers of a run compare like with like."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    is_class = torch.zeros(latents.shape[0], dtype=torch.bool)
    for _ in range(pairs):
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        total += denoising_loss(unet, noise_scheduler, latents, encoder_hidden_states, is_class, gen,
                                timesteps=timesteps, noise=noise)["loss"].item()
    return total / pairs
