"""AdaLoRA (Zhang et al., ICLR 2023): an SVD-shaped update whose rank is allocated while training.

- Parametrisation (§3.1): ΔW = B·diag(E)·A·s, A (r, d_in) right and B (d_out, r) left singular vectors, E (r, 1)
  the singular values, s = α / (r + 1e-5) with r the initial rank (PEFT's `ranknum`, constant; the 1e-5 is
  PEFT's). Forward: y = base(x) + (x·(A⊙E)ᵀ·Bᵀ)·s. Conv2d follows PEFT's SVDConv2d: A is (r, C_in·kh·kw); PEFT
  builds ΔW and convolves with it, here A⊙E runs as a kh×kw conv to r channels and B as a 1×1 conv (the same
  sum, never a d_out×d_in matrix in training). Linear, Conv2d and Conv1D; embeddings are refused, as in PEFT.
- Init (PEFT's reset_lora_parameters): E = 0, A and B ~ N(0, 0.02²), so the layer is the base at step 0.
- Importance (§3.2): for every entry w of A, E and B, I = |w·∂L/∂w|, Ī ← β1·Ī + (1−β1)·I,
  Ū ← β2·Ū + (1−β2)·|I − Ī|, score Ī·Ū. Triplet i scores s(E_i) + mean_j s(A_ij) + mean_k s(B_ki). Updated in
  the per-optimizer-step hook (gradients already unscaled; steps the fp16 scaler skipped never reach it) while
  step < T − tfinal.
- Budget (§3.3, PEFT's RankAllocator.budget_schedule): the total rank b(t) is r·n (n adapted matrices) while
  t ≤ tinit, then int((r·n − r_T·n)·(1 − (t − tinit)/(T − tfinal − tinit))³ + r_T·n) with masking when
  t % ΔT == 0; at t = T − tfinal the pattern is forced to r_T·n and frozen, and every later step re-applies it
  (E_i = 0 for each pruned triplet). Masking: the k-th smallest triplet score over ALL layers of the adapter,
  k = r·n − b(t), is the threshold, and every triplet scoring `<=` it gets E_i = 0 (ties all go). Between two
  masking steps a pruned E_i may move off zero again, as in PEFT and the authors' code.
  Step convention: t is the number of optimizer steps taken (1 after the first, `StepContext.step`), passed as
  PEFT's `update_and_allocate(global_step)`; PEFT's example scripts count global_step from 0, one behind.
  PEFT 0.21.2 and the authors' code (QingruZhang/AdaLoRA, loralib/adalora.py) agree on the scores, the
  threshold (the k-th value over the triplet sums only; the E-only scores enter just through those sums) and
  the schedule; this follows PEFT where they differ: PEFT forces the mask at t = T − tfinal (the authors mask
  there only if t % ΔT == 0, then re-rank every step with the frozen scores: the same pattern) and drops
  its averages there. A target equal to the initial rank masks nothing (k = 0; PEFT's kthvalue fails).
- Orthogonality (§3.1, Eq. 4): R = w·(1/2n)·Σ over the 2n matrices of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F, PEFT's
  form (the norm, not its square), w = `orth_reg_weight` (default 0.1 as the authors; PEFT's default is 0.5).
- State: the six EMAs and the pruning mask (fp32 0/1, PEFT's rank_pattern) are persistent buffers, so a
  checkpoint resumes the allocator exactly; the native file carries the mask under `adalora_mask`.
- Export: the triplets with E_i ≠ 0, A' = (A⊙E)[kept], B' = B[:, kept]·s, so the file's rank differs per layer;
  a layer with no triplet left is rank 0 and left out of the PEFT/diffusers file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from dreamlora.config import AdapterConfig
from dreamlora.layer_kinds import LayerKind
from dreamlora.methods.base import AdapterLayer, register
from dreamlora.options import MethodOptions

if TYPE_CHECKING:  # hooks imports the methods: the type only, no import cycle
    from dreamlora.hooks import StepContext

RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


@dataclass
class AdaLoRAOptions(MethodOptions):
    target_r: int | None = field(default=None, metadata={"default": "2/3 of --rank"})
    """Average rank per adapted matrix at the end of the budget schedule (total budget target_r × matrices);
    default: round(2/3 × --rank), at least 1 (PEFT's init_r 12 → target_r 8)."""
    tinit: int = 0
    """Optimizer steps at full rank before pruning starts. The trainers' default is 10 % of the run's steps."""
    tfinal: int = 0
    """Optimizer steps at the end with the rank pattern frozen. The trainers' default is 30 % of the run's steps."""
    delta_t: int = 1
    """Re-mask every this many optimizer steps while the budget shrinks (PEFT's deltaT). The trainers' default
    is 1 % of the run's steps, at least 1."""
    total_step: int | None = None
    """Optimizer steps of the schedule (PEFT's total_step); the trainers set it to the run's length. Outside a
    trainer: the run length the step hook is given."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity |w·∂L/∂w|."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty |I − Ī|."""
    orth_reg_weight: float = 0.1
    """Weight of the orthogonality penalty on A and B (the authors' 0.1; PEFT's default is 0.5)."""

    def __post_init__(self) -> None:
        for name in ("tinit", "tfinal", "delta_t", "target_r", "total_step"):
            value = getattr(self, name)
            if value is None and name in ("target_r", "total_step"):
                continue
            least = 0 if name in ("tinit", "tfinal") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"--adalora_{name} must be an integer >= {least}, got {value!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"--adalora_{name} must be in (0, 1), got {getattr(self, name)!r}")
        if not self.orth_reg_weight >= 0.0:
            raise ValueError(f"--adalora_orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")

    @classmethod
    def run_defaults(cls, total_steps: int) -> dict:
        return {"total_step": total_steps, "tinit": total_steps // 10, "tfinal": 3 * total_steps // 10,
                "delta_t": max(1, total_steps // 100)}

    def final_rank(self, rank: int) -> int:
        """target_r, or its default for an initial rank `rank`."""
        return self.target_r if self.target_r is not None else max(1, round(2 * rank / 3))

    def check(self, config, total_steps: int | None) -> None:
        if self.final_rank(config.rank) > config.rank:
            raise ValueError(f"--adalora_target_r {self.target_r} is more than --rank {config.rank}: AdaLoRA "
                             "starts at --rank and only prunes")
        if config.use_rslora:
            raise ValueError("--use_rslora does not apply to adalora: its scale is alpha / r, as PEFT's")
        if total_steps is not None and self.total_step is not None and self.total_step > total_steps:
            raise ValueError(f"--adalora_total_step {self.total_step} is more than the run's {total_steps} "
                             "optimizer steps: the budget would never reach its target")
        total = self.total_step if self.total_step is not None else total_steps
        if total is not None and self.tinit >= total - self.tfinal:
            raise ValueError(f"--adalora_tinit {self.tinit} and --adalora_tfinal {self.tfinal} leave no steps to "
                             f"prune in {total}: the schedule ends before it starts (need tinit < "
                             "total_step - tfinal)")


def budget_schedule(step: int, initial: int, target: int, options: AdaLoRAOptions, total: int) -> tuple[int, bool]:
    """(total rank allowed after `step`, whether to mask at this step): PEFT's RankAllocator.budget_schedule."""
    if step <= options.tinit:
        return initial, False
    if step > total - options.tfinal:
        return target, True
    left = 1 - (step - options.tinit) / (total - options.tfinal - options.tinit)
    return int((initial - target) * (left**3) + target), step % options.delta_t == 0


@register
class AdaLoRA(AdapterLayer):
    method = "adalora"
    description = "AdaLoRA: SVD-form LoRA whose rank is pruned to a budget by importance"
    Options = AdaLoRAOptions
    inits = ("gaussian",)
    file_keys = {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}  # PEFT's AdaLoRA names
    roles = {"lora_A": "down", "lora_E": "shared", "lora_B": "up"}
    # the allocator's EMAs (ipt: sensitivity, unc: uncertainty) per factor, and the last pruning pattern
    state_keys = {f"{stat}_{f}": f"adalora_{stat}_{f}" for stat in ("ipt", "unc") for f in "AEB"}
    state_keys["mask"] = "adalora_mask"
    averageable = False
    averaging_note = ("its allocator zeroes the singular values E of pruned triplets as the budget shrinks, so an "
                      "average of E would bring pruned triplets back and no longer match the rank budget or the mask")

    def __init__(self, kind: LayerKind, config: AdapterConfig):
        if kind.is_embedding:
            raise ValueError("adalora adapts Linear, Conv1D and Conv2d layers (as PEFT's AdaLoRA), not Embedding: "
                             "leave embeddings out of target_modules")
        super().__init__(kind, config)
        self.scaling = config.alpha / (config.rank + RANKNUM_EPS)
        device, r = kind.base.weight.device, config.rank
        self.lora_A = nn.Parameter(nn.init.normal_(torch.empty(r, kind.d_in, device=device), std=0.02))  # (r, d_in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device))  # (r, 1)
        self.lora_B = nn.Parameter(nn.init.normal_(torch.empty(kind.d_out, r, device=device), std=0.02))  # (out, r)
        for f in "AEB":  # the parameters' dtype (fp32; float64 in the parity tests, where ties need it)
            param = getattr(self, f"lora_{f}")
            self.register_buffer(f"ipt_{f}", torch.zeros_like(param))
            self.register_buffer(f"unc_{f}", torch.zeros_like(param))
        self.register_buffer("mask", torch.ones(r, device=device, dtype=self.lora_E.dtype))  # (r,) 1 = kept

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A⊙E, B) in the base kind's factor shapes."""
        return self.kind.down_from_matrix(self.lora_A * self.lora_E), self.kind.up_from_matrix(self.lora_B)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        down, up = self.factors()
        h = self.kind.up(self.kind.down(self._input(x, down.dtype), down), up)
        return base_out.add(h.to(base_out.dtype), alpha=self.effective_scale)

    def delta_weight(self) -> torch.Tensor:
        return self.effective_scale * (self.lora_B @ (self.lora_A * self.lora_E))  # (d_out, d_in)

    def kept(self) -> torch.Tensor:
        """The triplets that still contribute (E_i ≠ 0), as a bool (r,)."""
        return self.lora_E.detach().reshape(-1) != 0

    def lora_factors(self) -> dict[str, torch.Tensor]:
        keep = self.kept()
        if not keep.any():
            return {}  # rank 0: the writers leave this layer out
        down = (self.lora_A * self.lora_E).detach()[keep]
        up = self.lora_B.detach()[:, keep] * self.scaling
        return {"lora_A.weight": self.kind.down_from_matrix(down).contiguous(),
                "lora_B.weight": self.kind.up_from_matrix(up).contiguous()}

    # --- the rank allocator ----------------------------------------------------------------------------
    def update_importance(self, beta1: float, beta2: float) -> None:
        """One EMA step of sensitivity and uncertainty for every entry of A, E and B (PEFT's update_ipt)."""
        for f in "AEB":
            param = getattr(self, f"lora_{f}")
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            now = (param * grad).abs()
            ipt = beta1 * getattr(self, f"ipt_{f}") + (1 - beta1) * now
            unc = beta2 * getattr(self, f"unc_{f}") + (1 - beta2) * (now - ipt).abs()
            getattr(self, f"ipt_{f}").copy_(ipt)
            getattr(self, f"unc_{f}").copy_(unc)

    def triplet_scores(self) -> torch.Tensor:
        """s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki)), (r,), in PEFT's order of additions."""
        score_a = (self.ipt_A * self.unc_A).mean(dim=1)
        score_b = (self.ipt_B * self.unc_B).mean(dim=0)
        return (self.ipt_E * self.unc_E).view(-1) + (score_a + score_b)

    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(self.mask.view(-1, 1) == 0, 0.0)

    @classmethod
    def after_optimizer_step(cls, layers: Iterable[AdapterLayer], ctx: StepContext) -> None:
        super().after_optimizer_step(layers, ctx)
        layers = list(layers)
        options: AdaLoRAOptions = layers[0].config.options
        total = options.total_step if options.total_step is not None else ctx.total_steps
        if total is None:
            raise ValueError("adalora needs the schedule's length: set --adalora_total_step (AdaLoRAOptions."
                             "total_step) or pass total_steps to dreamlora.on_optimizer_step")
        end = total - options.tfinal
        with torch.no_grad():
            if ctx.step > end:  # frozen pattern
                for layer in layers:
                    layer.apply_mask()
                return
            if ctx.step < end:
                for layer in layers:
                    layer.update_importance(options.beta1, options.beta2)
            initial = sum(layer.rank for layer in layers)
            target = options.final_rank(layers[0].rank) * len(layers)
            budget, mask_now = budget_schedule(ctx.step, initial, target, options, total)
            if mask_now or ctx.step == end:
                mask_to_budget(layers, initial - budget)
            if ctx.step == end:  # PEFT drops its averages here: they are never read again
                for layer in layers:
                    for attr in cls.state_keys:
                        if attr != "mask":
                            getattr(layer, attr).zero_()

    @classmethod
    def regularization(cls, layers: Iterable[AdapterLayer]) -> torch.Tensor | None:
        layers = [la for la in layers if la.lora_A.requires_grad]
        weight = layers[0].config.options.orth_reg_weight if layers else 0.0
        if weight == 0:
            return None
        total, count = 0.0, 0
        for layer in layers:  # PEFT's order: A then B, summed, then divided by the number of matrices
            for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
                total = total + torch.norm(gram - eye, p="fro")
                count += 1
        return weight * (total / count)

    @classmethod
    def report(cls, layers: dict[str, AdapterLayer]) -> dict:
        options: AdaLoRAOptions = next(iter(layers.values())).config.options
        ranks = {path: int(layer.kept().sum()) for path, layer in layers.items()}
        rank = next(iter(layers.values())).rank
        budget = {"initial": rank * len(layers), "target": options.final_rank(rank) * len(layers),
                  "final": sum(ranks.values()), "total_step": options.total_step, "tinit": options.tinit,
                  "tfinal": options.tfinal, "delta_t": options.delta_t}
        # what the pruned adapter holds as plain LoRA (E folded into A): one row of A and one column of B per kept
        # triplet, comparable with a LoRA's parameter count at the same budget
        final_params = sum(ranks[path] * (layer.lora_A[0].numel() + layer.lora_B.numel() // layer.rank)
                           for path, layer in layers.items())
        return {"budget": budget, "rank_per_layer": ranks, "final_params": final_params,
                "masks": {path: [bool(v) for v in layer.mask.tolist()] for path, layer in layers.items()}}


def mask_to_budget(layers: list[AdaLoRA], k: int) -> None:
    """Prune the k lowest-scoring triplets over all `layers` (`<=` the k-th smallest score, so ties all go):
    E_i = 0 and mask_i = 0; every other mask entry becomes 1 (PEFT's RankAllocator.mask_to_budget)."""
    scores = [layer.triplet_scores() for layer in layers]
    threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item() if k > 0 else float("-inf")
    for layer, score in zip(layers, scores, strict=True):
        layer.mask.copy_((score > threshold).to(layer.mask.dtype))
        layer.apply_mask()
