"""SingLoRA (Bensaïd et al. 2025, arXiv 2507.05566): one matrix, ΔW = s·u(t)·A[:d_out]·A[:d_in]ᵀ.

- A is (n, r) with n = max(d_in, d_out): the truncation (A·Aᵀ)[:d_out, :d_in] of the square update, which
  handles d_out > d_in and d_out < d_in alike.
- Init (`scaled`, the default): Kaiming-uniform(a=√5) with fan √(d_in·d_out), i.e. entries U(±(d_in·d_out)^-1/4)
  (Conv2d: d_in = C_in·kh·kw). The paper asks for entries of order Θ(n^-1/2) (§3.2, §4.2, App. A.1), and
  ‖ΔW‖_F ≈ √(d_out·d_in·r)·σ² for entries of variance σ², so this gives ‖ΔW‖_F ≈ √r/3 at α = r on square and
  non-square layers of any width: the scale of a learned LoRA update.
  This departs from both public third-party implementations (kyegomez, PyPI `peft-singlora`), which call
  `kaiming_uniform_` on the (n, r) tensor, so PyTorch takes fan_in = r and the entries are U(±1/√r): then
  ‖ΔW‖_F ≈ d/(3√r), larger than the pretrained weight (45.5 on a 384-wide layer, ≈480 at 4096), and SingLoRA
  overwrites the backbone instead of adapting it (52 % on SST-2 where LoRA reaches 84 %). That init stays
  reachable as `init="kaiming"`, to reproduce runs made with those implementations.
- s = α/r (α/√r with rsLoRA); u(t) = min(t/T, 1) with t the number of optimizer steps taken, set by the
  per-optimizer-step hook (never by forward calls), so gradient accumulation, gradient checkpointing and
  resume leave it right. T = 0 turns the ramp off (u = 1, and the layer is no longer an identity at init).
- At t = 0, u = 0 would zero both ΔW and ∂L/∂A, so the first update would be lost. Instead the forward
  value uses u(0) = 0 (the attached model is the base model) while the gradient flows as at u(1) = 1/T:
  y = W0·x + s·(1/T)·(h − stopgrad(h)), h = A[:d_out]·A[:d_in]ᵀ·x.
- Conv2d (no published definition): the matrix view (C_out, C_in·kh·kw); A[:d_in]ᵀ becomes a kh×kw conv
  to r channels and A[:d_out] a 1×1 conv, so the training forward never builds a d_out×d_in matrix.
- Lossless LoRA export (α' = r): B' = s·u·A[:d_out], A' = A[:d_in]ᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dreamlora.config import AdapterConfig
from dreamlora.layer_kinds import LayerKind
from dreamlora.methods.base import AdapterLayer, kaiming_, register
from dreamlora.options import MethodOptions


@dataclass
class SingLoRAOptions(MethodOptions):
    ramp_steps: int = 100
    """T in u(t) = min(t/T, 1), t counted in optimizer steps; 0 turns the ramp off (u = 1). The trainers'
    default is 1 % of the run's optimizer steps, rounded half up, at least 1 (the paper's App. A.1), and a
    resume keeps the checkpoint's T."""

    def __post_init__(self) -> None:
        if isinstance(self.ramp_steps, bool) or not isinstance(self.ramp_steps, int) or self.ramp_steps < 0:
            raise ValueError(f"singlora_ramp_steps must be an integer >= 0, got {self.ramp_steps!r}")

    @classmethod
    def run_defaults(cls, total_steps: int) -> dict:
        return {"ramp_steps": max(1, (total_steps + 50) // 100)}


@register
class SingLoRA(AdapterLayer):
    method = "singlora"
    description = "SingLoRA: one symmetric matrix"
    Options = SingLoRAOptions
    file_keys = {"singlora_A": "singlora_A"}
    roles = {"singlora_A": "shared"}
    inits = ("scaled", "kaiming")

    def __init__(self, kind: LayerKind, config: AdapterConfig):
        super().__init__(kind, config)
        n = max(kind.d_in, kind.d_out)
        a = torch.empty(n, config.rank, device=kind.base.weight.device)  # (n, r)
        self.singlora_A = nn.Parameter(self._init(a, kind, config))
        self.ramp_steps = config.options.ramp_steps

    @staticmethod
    def _init(a: torch.Tensor, kind: LayerKind, config: AdapterConfig) -> torch.Tensor:
        if config.init == "kaiming":
            return kaiming_(a)  # fan_in = r: the third-party reference init (see the module docstring)
        bound = (kind.d_in * kind.d_out) ** -0.25  # Kaiming-uniform(a=√5) with fan √(d_in·d_out)
        return nn.init.uniform_(a, -bound, bound)

    def ramp(self, step: int | None = None) -> float:
        """u(t) = min(t/T, 1); 1 when the ramp is off."""
        t = self.step if step is None else step
        return 1.0 if self.ramp_steps == 0 else min(t / self.ramp_steps, 1.0)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) in the base kind's factor shapes: A[:d_in]ᵀ (r, d_in) and A[:d_out] (d_out, r)."""
        a = self.singlora_A
        return self.kind.down_from_matrix(a[: self.kind.d_in].t()), self.kind.up_from_matrix(a[: self.kind.d_out])

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        down, up = self.factors()
        h = self.kind.up(self.kind.down(self._input(x, down.dtype), down), up)
        if self.step == 0 and self.ramp_steps > 0:
            h = h - h.detach()  # value 0, gradient as at u(1): see the module docstring
            u = self.ramp(1)
        else:
            u = self.ramp()
        return base_out.add(h.to(base_out.dtype), alpha=self.effective_scale * u)

    def delta_weight(self) -> torch.Tensor:
        a = self.singlora_A
        return (self.effective_scale * self.ramp()) * (a[: self.kind.d_out] @ a[: self.kind.d_in].t())

    def lora_factors(self) -> dict[str, torch.Tensor]:
        down, up = self.factors()
        return {"lora_A.weight": down.detach().contiguous(),
                "lora_B.weight": (up.detach() * (self.scaling * self.ramp())).contiguous()}
