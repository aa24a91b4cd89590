"""LoHa (LyCORIS; Yeh et al., ICLR 2024): ΔW = s·(B1·A1) ⊙ (B2·A2), the Hadamard product of two rank-r LoRAs.

- Shapes and names as LyCORIS 4.1.3's `LohaModule` (no Tucker core): `hada_w1_a` = B1 (d_out, r), `hada_w1_b` =
  A1 (r, d_in), likewise w2. Conv2d takes LyCORIS's plain (non-Tucker) form: A is (r, C_in·kh·kw), so ΔW has the
  conv weight's shape; the parameters are stored in that matrix form for every layer kind (the LyCORIS layout).
- Init as LyCORIS: B1 ~ N(0, 0.1²), A1 ~ N(0, 1), B2 = 0, A2 ~ N(0, 1), so ΔW = 0 at init; `init` has the one
  value "lycoris".
- Scale s = alpha/r (alpha/√r with rsLoRA), as LyCORIS. An unset `--alpha` resolves to alpha = r (s = 1), as for
  every dreamlora method and as LyCORIS itself does for alpha None/0; LyCORIS's `LohaModule` argument default
  alpha = 1 (s = 1/r) applies only when a caller leaves that argument out, so pass `--alpha 1` for it.
- No dropout: LyCORIS's LoHa has no plain dropout (it warns and ignores it), so `--lora_dropout > 0` is refused.
- Forward without a weight-sized temporary, through the Khatri–Rao factors. Column by column,
      (B1A1) ⊙ (B2A2) = Σ_i diag(B1[:, i]) · B2 · A2 · diag(A1[i])
  so ΔW·x is r sums of a rank-r LoRA whose down factor is A2 with its columns scaled by A1[i] and whose up factor
  is B2 with its rows scaled by B1[:, i]: cost r·r·(d_in + d_out) per token, and no tensor larger than
  r·max(d_in, d_out) or the activations. On Conv2d the down factor is a kh×kw conv, the up factor a 1×1 conv.
- Exact LoRA form (`lora_factors`): (B1A1) ⊙ (B2A2) = (B1 • B2)(A1 ∗ A2), with • the face-splitting (row-wise
  Kronecker) product, (d_out, r²), and ∗ the Khatri–Rao (column-wise Kronecker) product, (r², d_in). Above
  the cap min(d_out, d_in) the update is re-factorised exactly by a thin QR of the tall side at rank ≤ the cap.
- Kohya/LyCORIS keys (`kohya_tensors`): `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` with alpha = r, the
  scale s folded into `hada_w1_a`: readers (LyCORIS, ComfyUI, A1111) multiply by alpha/r = 1, and LyCORIS 4.1.3's
  `merge_to`, which applies alpha/r twice, then merges the same weight as its own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from dreamlora.config import AdapterConfig
from dreamlora.layer_kinds import LayerKind
from dreamlora.methods.base import AdapterLayer, register


@register
class LoHa(AdapterLayer):
    method = "loha"
    description = "LoHa: Hadamard product of two low-rank updates (LyCORIS)"
    file_keys = {"hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a",
                 "hada_w2_b": "hada_w2_b"}
    roles = {"hada_w1_a": "up", "hada_w1_b": "down", "hada_w2_a": "up", "hada_w2_b": "down"}
    inits = ("lycoris",)
    kohya_network_module = "lycoris.kohya"

    def __init__(self, kind: LayerKind, config: AdapterConfig):
        if config.dropout > 0:
            raise ValueError(f"--lora_dropout must be 0 for loha (got {config.dropout:g}): LyCORIS's LoHa has no "
                             "plain dropout, so there is no reference for it")
        super().__init__(kind, config)
        device, r = kind.base.weight.device, config.rank
        # drawn in LyCORIS's order (w1_b, w1_a, w2_b), so the same seed gives LyCORIS's very tensors
        w1_b = nn.init.normal_(torch.empty(r, kind.d_in, device=device), std=1.0)
        w1_a = nn.init.normal_(torch.empty(kind.d_out, r, device=device), std=0.1)
        w2_b = nn.init.normal_(torch.empty(r, kind.d_in, device=device), std=1.0)
        self.hada_w1_a, self.hada_w1_b = nn.Parameter(w1_a), nn.Parameter(w1_b)
        self.hada_w2_a = nn.Parameter(torch.zeros(kind.d_out, r, device=device))
        self.hada_w2_b = nn.Parameter(w2_b)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        k = self.kind
        x = self._input(x, self.hada_w2_b.dtype)
        out = None
        for i in range(self.hada_w1_b.shape[0]):  # Σ_i diag(B1[:, i])·B2·A2·diag(A1[i]), see the docstring
            down = k.down_from_matrix(self.hada_w2_b * self.hada_w1_b[i])  # (r, d_in), A2's columns scaled
            up = k.up_from_matrix(self.hada_w2_a * self.hada_w1_a[:, i:i + 1])  # (d_out, r), B2's rows scaled
            term = k.up(k.down(x, down), up)
            out = term if out is None else out + term
        return base_out.add(out.to(base_out.dtype), alpha=self.effective_scale)

    def delta_weight(self) -> torch.Tensor:
        w1 = self.hada_w1_a @ self.hada_w1_b
        w2 = self.hada_w2_a @ self.hada_w2_b
        return self.effective_scale * (w1 * w2)  # (d_out, d_in)

    def product_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B1 • B2, A1 ∗ A2): (d_out, r²) and (r², d_in) with their product the unscaled ΔW, exactly."""
        b1, a1, b2, a2 = (p.detach() for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b))
        up = (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], -1)  # row o: B1[o] ⊗ B2[o]
        down = (a1[:, None, :] * a2[None, :, :]).reshape(-1, a1.shape[1])  # row (i, j): A1[i] ⊙ A2[j]
        return up, down

    def lora_factors(self) -> dict[str, torch.Tensor]:
        up, down = self.product_factors()
        up = up * self.scaling
        cap = min(self.kind.d_out, self.kind.d_in)
        if up.shape[1] > cap:
            up, down = refactor(up.double(), down.double())
            up, down = up.float(), down.float()
        k = self.kind
        return {"lora_A.weight": k.down_from_matrix(down).contiguous(),
                "lora_B.weight": k.up_from_matrix(up).contiguous()}

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        # matrices on every kind, as LyCORIS stores them (it reshapes ΔW to the conv weight's shape)
        b1, a1, b2, a2 = (p.detach() for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b))
        return {"hada_w1_a": (b1 * self.scaling).contiguous(), "hada_w1_b": a1.contiguous(),
                "hada_w2_a": b2.contiguous(), "hada_w2_b": a2.contiguous(),
                "alpha": torch.tensor(float(self.rank))}


def refactor(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The product up·down ((d_out, R), (R, d_in), R > min(d_out, d_in)) as exact factors of rank ≤
    min(d_out, d_in): a thin QR of the tall side, so up·down = Q·(R·down) or (up·Rᵀ)·Qᵀ."""
    if up.shape[0] <= down.shape[1]:  # d_out is the cap: ΔW = I·(up·down)
        q, r = torch.linalg.qr(up)  # q (d_out, d_out), r (d_out, R)
        return q, r @ down
    q, r = torch.linalg.qr(down.t())  # down = rᵀ·qᵀ with q (d_in, d_in)
    return up @ r.t(), q.t()
