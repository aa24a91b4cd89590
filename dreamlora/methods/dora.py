"""DoRA (Liu et al. 2024, §4): W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖, the norm per output unit.

- m (the magnitude) starts at ‖W0‖ per row, so the layer is the base layer at step 0.
- The norm is detached (§4.3): it is a constant for the backward pass, as in PEFT and NVlabs' reference.
- The bias stays outside the rescale, as in PEFT: y = (m/n)·(W0·x + s·B·A·x) + b.
- Conv2d: the norm is over (C_in, kh, kw); the magnitude is stored (1, C_out, 1, 1) like PEFT.

The norm is computed without a d_out×d_in temporary (PEFT builds B·A every forward):
    ‖W0 + s·BA‖²_row = ‖W0‖²_row + 2s·rowsum(B ⊙ (W0·Aᵀ)) + s²·rowsum((B·(A·Aᵀ)) ⊙ B)
where W0·Aᵀ is (d_out, r) and A·Aᵀ is (r, r); ‖W0‖² is cached because W0 is frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from dreamlora.config import AdapterConfig
from dreamlora.layer_kinds import LayerKind
from dreamlora.methods.base import register
from dreamlora.methods.lora import LoRA


@register
class DoRA(LoRA):
    method = "dora"
    description = "DoRA: magnitude and direction"
    file_keys = {**LoRA.file_keys, "lora_magnitude_vector": "lora_magnitude_vector"}
    roles = {**LoRA.roles, "lora_magnitude_vector": "magnitude"}
    reads_base_weight = True
    composition = None
    composition_note = ("DoRA's update m·(W0 + BA)/‖W0 + BA‖ − W0 is neither a low-rank product nor linear in its "
                        "scale, so weighted sums of DoRA adapters are not sums of their updates")

    def __init__(self, kind: LayerKind, config: AdapterConfig):
        super().__init__(kind, config)
        # ‖W0‖² per row, cached because W0 is frozen. A non-persistent buffer, so device moves carry it (and it
        # stays out of files); the base class keeps it fp32 through dtype casts, which keeps m/‖W0‖ = 1 exactly.
        self.register_buffer("_w0_sq_norm", self._w0_row_sq_norm(), persistent=False)
        magnitude = self._w0_sq_norm.sqrt().reshape(kind.magnitude_shape())  # (d_out,) or (1, C_out, 1, 1)
        self.lora_magnitude_vector = nn.Parameter(magnitude.clone())

    @torch.no_grad()
    def _w0_row_sq_norm(self) -> torch.Tensor:
        w0 = self.kind.weight_matrix().float()
        return (w0 * w0).sum(dim=1)  # (d_out,) fp32

    def base_weight_changed(self) -> None:
        self._w0_sq_norm = self._w0_row_sq_norm()

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output unit, (d_out,) fp32, from (d_out, r) and (r, r) products only."""
        s = self.effective_scale
        a = self.kind.down_matrix(self.lora_A)  # (r, d_in)
        b = self.kind.up_matrix(self.lora_B)  # (d_out, r)
        w0 = self.kind.weight_matrix()
        if w0.is_meta and not a.is_meta:
            raise RuntimeError(
                "DoRA needs the base weight in its forward, but it is on the meta device while the adapter is not: "
                "accelerate's sequential CPU offload (enable_sequential_cpu_offload) loads it only inside the base "
                "layer's own call. Merge the adapter first (dreamlora.merge) or use enable_model_cpu_offload()."
            )
        w0_at = (w0 @ a.to(w0.dtype).t()).float()  # (d_out, r)
        cross = (b * w0_at).sum(dim=1)  # (d_out,)
        ba_sq = ((b @ (a @ a.t())) * b).sum(dim=1)  # (d_out,)
        return (self._w0_sq_norm + (2 * s) * cross + (s * s) * ba_sq).clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        ratio = self.lora_magnitude_vector.reshape(-1) / self.weight_norm()  # (d_out,), grad reaches m only
        scaled = self.kind.per_output(ratio * self.effective_scale)
        if self.dropout is not None and self.training:
            # As PEFT: drop x once and use the dropped input in both terms, W0·x_d (recomputed, since base_out
            # saw the undropped x) and B·A·x_d. Two draws would rescale W0 on a mask the update never saw.
            xd = self._input(x, self.lora_A.dtype)
            lora = self.lora_of_prepared(xd)
            w0x = self.kind.base_without_bias(xd.to(x.dtype) if xd.is_floating_point() else xd).to(lora.dtype)
            delta = torch.addcmul(lora * scaled, w0x, self.kind.per_output(ratio - 1))
            return base_out + delta.to(base_out.dtype)
        lora = self.lora_term(x)
        # y = (m/n)·(W0x + s·BAx) + b with W0x = base_out - b, rearranged so base_out is read once and the
        # layer stays bit-exact at init (m/n = 1 exactly, BA = 0):  y = (m/n)·base_out + (m/n)·s·BAx - (m/n - 1)·b
        out = lora * scaled
        bias = self.kind.bias()
        if bias is not None:
            out = out - self.kind.per_output((ratio - 1) * bias.to(ratio.dtype))
        return torch.addcmul(out, base_out.to(out.dtype), self.kind.per_output(ratio)).to(base_out.dtype)

    def merge_into(self, w: torch.Tensor) -> torch.Tensor:
        w = w + self.delta_weight()  # (d_out, d_in)
        ratio = self.lora_magnitude_vector.detach().reshape(-1) / w.norm(dim=1)
        return w * ratio[:, None]

    def lora_factors(self) -> dict[str, torch.Tensor]:
        return {**super().lora_factors(), "lora_magnitude_vector": self.lora_magnitude_vector.detach()}
