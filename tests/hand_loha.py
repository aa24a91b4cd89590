"""LoHa's hand formula for the method table: W0 + s·(B1·A1) ⊙ (B2·A2) (LyCORIS names: hada_w1_a = B1)."""

from __future__ import annotations

import torch


def weight_matrix(layer, w0: torch.Tensor, s: float) -> torch.Tensor:
    w1 = layer.hada_w1_a @ layer.hada_w1_b
    w2 = layer.hada_w2_a @ layer.hada_w2_b
    return w0 + s * w1 * w2
