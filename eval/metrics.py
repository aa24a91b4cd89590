"""DreamBench metrics as pure functions on embeddings (DreamBooth paper §4.1).

- DINO and CLIP-I: the mean cosine similarity over all (generated, real reference) pairs of a subject.
- CLIP-T: the mean cosine similarity between each generated image and its prompt.
All pairs come from one matrix product of L2-normalised embeddings.
"""

from __future__ import annotations

import torch


def unit_rows(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.double(), dim=-1)


def pairwise_cosine(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(n_generated, n_references) cosine similarities."""
    return unit_rows(generated) @ unit_rows(references).T


def per_image_subject_fidelity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(n_generated,): each generated image's mean cosine to all references. Their mean is DINO / CLIP-I."""
    return pairwise_cosine(generated, references).mean(dim=1)


def subject_fidelity(generated: torch.Tensor, references: torch.Tensor) -> float:
    """DINO or CLIP-I of one subject: the mean over all (generated, reference) pairs."""
    return pairwise_cosine(generated, references).mean().item()


def per_image_prompt_fidelity(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """(n,): cosine of image i with its own prompt i. Their mean is CLIP-T."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"CLIP-T needs one prompt per image: {tuple(image_embeddings.shape)} images vs "
                         f"{tuple(text_embeddings.shape)} prompts")
    return (unit_rows(image_embeddings) * unit_rows(text_embeddings)).sum(dim=-1)
