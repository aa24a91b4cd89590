"""What SDXL adds to training: two text encoders and the UNet's added conditioning.

SDXL's UNet reads (Podell et al. 2023, §2.1-2.2; diffusers' `StableDiffusionXLPipeline.encode_prompt`):
- as context, the penultimate hidden states of both text encoders, concatenated on the feature axis
  (CLIP ViT-L 768 + OpenCLIP bigG 1280 = 2048 in the base model);
- as `added_cond_kwargs["text_embeds"]`, the second encoder's pooled output through its projection
  (`CLIPTextModelWithProjection.text_embeds`);
- as `added_cond_kwargs["time_ids"]`, six numbers per image: original (height, width), crop (top, left),
  target (height, width). The trainer takes them from each view it trains on (`data.crop_view`), not constants.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pipelines.diffusion.models import encoder_device


def encode_prompts_xl(tokenizers: list, text_encoders: list[torch.nn.Module],
                      prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, 77, Σ hidden), pooled (B, projection_dim)) of `prompts`, as SDXL's pipeline computes them:
    each tokenizer pads to its 77 tokens (the second with its own pad token), each encoder's penultimate
    hidden states, and the last encoder's projected pooled output."""
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(encoder_device(encoder)), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds; only the last encoder's is kept
    return torch.cat(states, dim=-1), pooled


class PromptEncoderXL:
    """SDXL's context and pooled embedding for a batch's prompts: through the trained text encoders (both train
    together under --train_text_encoder), or from a per-prompt cache when both are frozen."""

    def __init__(self, sd, models: dict, dtype: torch.dtype):
        self.tokenizers = [sd.tokenizer, sd.tokenizer_2]
        trained = [models.get(name) for name in ("text_encoder", "text_encoder_2")]
        self.trained = trained if all(m is not None for m in trained) else None
        self.frozen = [sd.text_encoder, sd.text_encoder_2]
        self.dtype, self.cache = dtype, {}

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.trained is not None:
            return encode_prompts_xl(self.tokenizers, self.trained, prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad():
                states, pooled = encode_prompts_xl(self.tokenizers, self.frozen, missing)
            self.cache.update(zip(missing, zip(states, pooled, strict=True), strict=True))
        return (torch.stack([self.cache[p][0] for p in prompts]), torch.stack([self.cache[p][1] for p in prompts]))

    def __call__(self, prompts: list[str], time_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(context, the UNet's `added_cond_kwargs`) of one batch; `time_ids` (B, 6) from the batch's views."""
        states, pooled = self._encode(prompts)
        return states.to(self.dtype), {"text_embeds": pooled.to(self.dtype),
                                       "time_ids": time_ids.to(pooled.device, self.dtype)}


def sampling_precision(sd, device: torch.device, dtype: torch.dtype):
    """Around sampling with the training components in fp16/bf16: SDXL's VAE stays fp32 while the UNet runs in half
    precision (and the fp32 adapters can hand fp32 latents to a half-precision VAE), so the pipeline samples under
    autocast, as diffusers' SDXL scripts do. SD 1.x is left as it was: no autocast."""
    if not sd.is_sdxl or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
