"""Low-rank updates by their singular values, from the factors alone: an update ΔW = B·A of factor rank k has the
same nonzero singular values as the k×k core R_B·R_Aᵀ of the thin QR decompositions B = Q_B·R_B, Aᵀ = Q_A·R_A,
so its spectrum, its effective rank and a truncated SVD cost O((d_in + d_out)·k²), never a d_out×d_in matrix.

Used where an exact update has a rank above what a user wants in a file: ReLoRA's accumulated merges (rank
(merges + 1)·r) are written to the diffusers file at `--export_rank` by truncated SVD, with the relative error
‖ΔW − ΔW_k‖_F / ‖ΔW‖_F reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ENERGY = 0.99  # "auto" keeps the smallest rank holding this share of ‖ΔW‖²_F
EFFECTIVE_RANK_CUTOFF = 0.01  # effective rank: singular values above this share of the largest


@dataclass(frozen=True)
class Spectrum:
    """ΔW = left · diag(values) · rightᵀ with orthonormal columns in `left` (d_out, k) and `right` (d_in, k)."""

    left: torch.Tensor
    values: torch.Tensor  # descending
    right: torch.Tensor

    def effective_rank(self, cutoff: float = EFFECTIVE_RANK_CUTOFF) -> int:
        """The number of singular values above `cutoff` times the largest (0 for a zero update)."""
        if self.values.numel() == 0 or float(self.values[0]) == 0.0:
            return 0
        return int((self.values > cutoff * self.values[0]).sum())

    def energy_rank(self, energy: float = ENERGY) -> int:
        """The smallest rank keeping `energy` of ‖ΔW‖²_F (at least 1)."""
        squares = self.values.double() ** 2
        total = float(squares.sum())
        if total == 0.0:
            return 1
        return max(1, int((squares.cumsum(0) < energy * total).sum()) + 1)

    def relative_error(self, rank: int) -> float:
        """‖ΔW − ΔW_rank‖_F / ‖ΔW‖_F of the truncation to `rank` (0.0 for a zero update)."""
        squares = self.values.double() ** 2
        total = float(squares.sum())
        return 0.0 if total == 0.0 else float(squares[rank:].sum() / total) ** 0.5


def spectrum(up: torch.Tensor, down: torch.Tensor) -> Spectrum:
    """The SVD of up·down, `up` (d_out, k) and `down` (k, d_in) as matrices, computed in float64."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return Spectrum(left=q_up @ u, values=s, right=q_down @ vh.T)


def layer_spectrum(layer) -> Spectrum:
    """The spectrum of an adapter layer's exact update, from its plain-LoRA factors (`lora_factors`)."""
    factors = layer.lora_factors()
    kind = layer.kind
    return spectrum(kind.up_matrix(factors["lora_B.weight"]), kind.down_matrix(factors["lora_A.weight"]))


def truncate(layer, rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """The layer's LoRA factors (`lora_A.weight`, `lora_B.weight`, scale folded into B) truncated to `rank` by SVD,
    and the relative Frobenius error."""
    factors = layer.lora_factors()
    down, up, error = refactor(layer.kind, factors["lora_A.weight"], factors["lora_B.weight"], rank)
    return {"lora_A.weight": down, "lora_B.weight": up}, error


def refactor(kind, down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors (down, up) of the layer kind `kind` re-factored by SVD at `rank` (exact when the product's rank is at
    most `rank`), and the relative Frobenius error. √σ goes to each side, so neither factor dwarfs the other."""
    spec = spectrum(kind.up_matrix(up), kind.down_matrix(down))
    rank = min(rank, spec.values.numel())
    root = spec.values[:rank].sqrt()
    new_up = kind.up_from_matrix((spec.left[:, :rank] * root).float()).contiguous()
    new_down = kind.down_from_matrix((spec.right[:, :rank] * root).T.float()).contiguous()
    return new_down, new_up, spec.relative_error(rank)


def parse_export_rank(value: str | int) -> str | int:
    """`--export_rank`: "exact", "auto" or a positive integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif str(value).strip() in ("exact", "auto"):
        return str(value).strip()
    else:
        try:
            number = int(str(value))
        except ValueError:
            raise ValueError(f"--export_rank: 'exact', 'auto' or a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"--export_rank: a positive integer, got {number}")
    return number
