"""ReLoRA (Lialin et al., ICLR 2024, §3): LoRA merged and restarted every N steps, so the update's rank grows.

Reference: Guitaricet/relora. The accumulated update Σ_k s·B_k·A_k has a rank above r.

- Layer: LoRA's (A (r, d_in) Kaiming-uniform, B (d_out, r) zero; embeddings A zero, B ~ N(0, 1)), the same
  trainable factors and file keys. The reference also zeroes A when it wraps a layer (relora#18), so its first
  cycle learns nothing: not copied.
- Merge and restart, after optimizer step k·N (`--relora_steps N`, never at the run's last step): the live update
  s·B·A is appended to the stacked merges, `merged_A` (k·r, d_in…) gets A and `merged_B` (d_out, k·r…) gets s·B,
  then A and B are drawn afresh with the attach init (B·A = 0, so the model's function is unchanged). The draw is
  seeded by (the layer's seed, the merge index): the layer's seed is drawn from torch's global RNG when the layer
  is built (so it follows the trainer's --seed and the attach order) and rides in the file, so a resumed run and
  every process of a multi-process run draw the same factors.
- The merged update stays fp32 and is never rounded into the base weight: forward computes
  y = base(x) + m·(merged_B·merged_A·x + s·B·A·x), m the user's scale (`set_scale`), so a half-precision base is
  untouched, disable/detach/set_scale act on the whole accumulated update, and a resume is exact. The base is
  only cast once, at `dreamlora.merge` (--save_merged) or a tool export. Dropout acts on the live term only: the
  merged term stands for weights already in the base, which see the plain input.
- Optimizer reset, after each merge, on this adapter's factors only (other parameters, a classifier head, keep
  their state): AdamW's `exp_avg` and `exp_avg_sq` (and `max_exp_avg_sq` with amsgrad) are zeroed in full (the
  reference's default), or pruned: `magnitude` zeroes the int(p·n) entries of smallest |value| of each moment
  tensor (ties at the threshold included), `random` a seeded random int(p·n) of them (p = --relora_prune_ratio).
  The step count is kept, as in the reference. Other optimizers (8-bit AdamW, Prodigy, SGD) are refused.
- Jagged schedule: after each optimizer step the lr of this adapter's parameter groups is set for the next step,
      lr(t) = lr_0 · (min + (1 − min)·e(t)) · f(t),
  e(t) the trainer's own --lr_scheduler as a ratio of lr_0 (warmup, cosine, constant...: read from the scheduler
  just stepped, so it must be a closed-form schedule of the initial lr, as diffusers' and transformers' are),
  min = --relora_min_lr_ratio, and f the restart factor: with p the step's place in its N-step cycle (1..N), the
  first W = --relora_warmup_steps steps after a restart run at f = p/W (the lr drops near 0 and re-warms
  linearly), and the last A = --relora_anneal_steps steps of each cycle at f = (N − p + 1)/(A + 1). The first
  cycle has no re-warm (the envelope's own warmup applies), and the run's first step runs at the scheduler's own
  lr (the hook first runs after it).
- Export: `lora_factors()` is exact at rank (merges + 1)·r, A' = [merged_A; A], B' = [merged_B, s·B]; the
  plain-LoRA files default to the truncated SVD keeping 99 % of its energy (`default_export_rank = "auto"`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from dreamlora import compress
from dreamlora.config import AdapterConfig
from dreamlora.layer_kinds import LayerKind
from dreamlora.methods.base import AdapterLayer, register
from dreamlora.methods.lora import LoRA
from dreamlora.options import MethodOptions

RESETS = ("full", "magnitude", "random")
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # AdamW's (the last with amsgrad only)
SEED_BYTES = 8  # the layer seed as 8 bytes in an fp32 buffer: exact in fp32, fp16 and bf16 alike
RESTART, PRUNE = 1, 2  # salts of the two seeded draws


@dataclass
class ReLoRAOptions(MethodOptions):
    steps: int | None = None
    """merge the update and restart every N optimizer steps (axolotl's relora_steps); the trainers' default is a
    quarter of the run, at least 1. Outside a trainer None means a quarter of the run when the step hook is told
    the run's length, else no merge"""
    warmup_steps: int | None = field(default=None, metadata={"default": "--relora_steps/10, at most 50"})
    """after each restart the lr re-warms linearly over N steps, the i-th step after a merge at i/N of the
    schedule (axolotl's relora_warmup_steps); default a tenth of --relora_steps, at most 50; 0: no re-warm"""
    anneal_steps: int = 0
    """the lr falls linearly over the last N steps before each merge, the j-th last at j/(N+1) of the schedule
    (axolotl's relora_anneal_steps)"""
    optimizer_reset: str = "full"
    """AdamW's moments of the adapter at each merge: full (all zeroed, the reference's default), magnitude (the
    --relora_prune_ratio share of smallest |value| zeroed, per tensor) or random (a seeded random share zeroed)"""
    prune_ratio: float = 0.9
    """the share of each moment tensor the magnitude and random resets zero (axolotl's relora_prune_ratio)"""
    min_lr_ratio: float = 0.1
    """the floor of the schedule: the lr is lr0·(min + (1-min)·schedule), the schedule being --lr_scheduler's
    ratio to lr0, times the restart factor"""

    def __post_init__(self) -> None:
        for name in ("steps", "warmup_steps", "anneal_steps"):
            value, low = getattr(self, name), 1 if name == "steps" else 0
            if value is None and name != "anneal_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"relora_{name} must be an integer >= {low}, got {value!r}")
        if self.optimizer_reset not in RESETS:
            raise ValueError(f"relora_optimizer_reset must be one of {', '.join(RESETS)}, got {self.optimizer_reset!r}")
        if not (isinstance(self.prune_ratio, (int, float)) and 0.0 <= self.prune_ratio < 1.0):
            raise ValueError(f"relora_prune_ratio must be in [0, 1), got {self.prune_ratio!r}")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"relora_min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.steps is not None:
            self.cycle(None)  # warmup + anneal against the steps given

    @classmethod
    def run_defaults(cls, total_steps: int) -> dict:
        return {"steps": max(1, total_steps // 4)}

    def cycle(self, total_steps: int | None) -> tuple[int, int, int] | None:
        """(N, W, A): the merge period, the re-warm and the anneal in optimizer steps; None when no merge is
        planned (no --relora_steps and no known run length). ValueError, flags named, when they do not fit."""
        n = self.steps if self.steps is not None else (max(1, total_steps // 4) if total_steps else None)
        if n is None:
            return None
        w = min(50, n // 10) if self.warmup_steps is None else self.warmup_steps
        if w + self.anneal_steps >= n:
            raise ValueError(f"--relora_warmup_steps {w} + --relora_anneal_steps {self.anneal_steps} must be below "
                             f"--relora_steps {n}: the re-warm and the anneal share one cycle of {n} steps")
        return n, w, self.anneal_steps

    def check(self, config, total_steps: int | None) -> None:
        if total_steps is not None and self.steps is not None and self.steps > total_steps:
            raise ValueError(f"--relora_steps {self.steps} is more than the run's {total_steps} optimizer steps: "
                             "no merge would happen (that is plain LoRA); give a smaller --relora_steps")
        self.cycle(total_steps)


@register
class ReLoRA(LoRA):
    method = "relora"
    description = "ReLoRA: LoRA merged and restarted every N steps, so the update's rank grows"
    Options = ReLoRAOptions
    state_keys = {"merged_A": "relora_merged_A", "merged_B": "relora_merged_B", "seed": "relora_seed"}
    default_export_rank = "auto"
    composition = "updates"
    composition_note = ("ReLoRA's update is its stacked merges plus the last B·A (factor rank (merges + 1)·r), no "
                        "single trained pair of factors: it is composed from that exact accumulated update")
    averageable = False
    averaging_note = ("each merge folds B·A into the stacked merges and draws A and B afresh, so an average of the "
                      "factors across a merge would count the merged update a second time")

    def __init__(self, kind: LayerKind, config: AdapterConfig):
        super().__init__(kind, config)
        device = self.lora_A.device
        self.register_buffer("merged_A", torch.zeros(kind.down_shape(0), device=device))  # (k·r, d_in…), k = 0
        self.register_buffer("merged_B", torch.zeros(kind.up_shape(0), device=device))  # (d_out, k·r…)
        self.register_buffer("seed", torch.randint(0, 256, (SEED_BYTES,)).float().to(device))  # (8,) bytes

    @property
    def merges(self) -> int:
        """Merges done so far: the stacked factors hold that many blocks of rank r."""
        return self.merged_A.shape[0] // self.rank

    def seed_for(self, *values: int) -> int:
        """A generator seed from this layer's seed and `values` (the merge index, a salt, ...): BLAKE2b of their
        bytes, the same on every platform and process."""
        data = bytes(int(b) for b in self.seed.tolist()) + b"".join(int(v).to_bytes(8, "little") for v in values)
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.merged_A.shape[0] == 0:
            return super().forward(x, base_out)
        k, dtype = self.kind, self.merged_A.dtype
        merged = k.up(k.down(k.prepare_input(x, dtype, None), self.merged_A), self.merged_B)  # no dropout
        return base_out.add((merged + self.scaling * self.lora_term(x)).to(base_out.dtype), alpha=self.multiplier)

    def delta_weight(self) -> torch.Tensor:
        if self.merged_A.shape[0] == 0:
            return super().delta_weight()  # (the matrix views cannot reshape an empty stack)
        k = self.kind
        merged = k.up_matrix(self.merged_B) @ k.down_matrix(self.merged_A)  # (d_out, d_in), s already in merged_B
        return self.multiplier * merged + super().delta_weight()

    def lora_factors(self) -> dict[str, torch.Tensor]:
        live = super().lora_factors()  # s folded into B, alpha = factor rank
        return {"lora_A.weight": torch.cat([self.merged_A, live["lora_A.weight"]]).contiguous(),
                "lora_B.weight": torch.cat([self.merged_B, live["lora_B.weight"]], dim=1).contiguous()}

    def resize_state(self, attr: str, shape: tuple[int, ...]) -> bool:
        """The stacked merges take the file's number of merges (any multiple of r, in this layer's shapes)."""
        if attr not in ("merged_A", "merged_B"):
            return False
        stacked = shape[0] if attr == "merged_A" else (shape[1] if len(shape) > 1 else -1)
        make_shape = self.kind.down_shape if attr == "merged_A" else self.kind.up_shape
        if stacked < 0 or stacked % self.rank or tuple(make_shape(stacked)) != tuple(shape):
            return False
        self.register_buffer(attr, torch.zeros(shape, device=getattr(self, attr).device))
        return True

    @torch.no_grad()
    def merge_and_restart(self) -> None:
        """Append s·B·A to the stacked merges, then draw A and B afresh (seeded by the merge index)."""
        index = self.merges
        self.merged_A = torch.cat([self.merged_A, self.lora_A.float()])
        self.merged_B = torch.cat([self.merged_B, self.lora_B.float() * self.scaling], dim=1)
        generator = torch.Generator().manual_seed(self.seed_for(index, RESTART))
        a, b = torch.zeros(self.lora_A.shape), torch.zeros(self.lora_B.shape)  # drawn on the CPU: same everywhere
        if self.kind.is_embedding:
            nn.init.normal_(b, generator=generator)
        elif self.config.init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.rank, generator=generator)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)

    # --- hooks over all layers of one adapter ---------------------------------------------------------------
    @classmethod
    def check_optimizer(cls, optimizer: torch.optim.Optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if not isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)):
            raise ValueError(f"relora resets AdamW's moments (exp_avg, exp_avg_sq) at each merge, so it trains with "
                             f"torch.optim.AdamW or Adam only, not {type(inner).__module__}.{type(inner).__name__}")

    @classmethod
    def after_optimizer_step(cls, layers: Iterable[AdapterLayer], ctx) -> None:
        super().after_optimizer_step(layers, ctx)
        layers = list(layers)
        options = layers[0].config.options
        cycle = options.cycle(ctx.total_steps)
        if cycle is None:
            return
        n, warmup, anneal = cycle
        if ctx.step % n == 0 and (ctx.total_steps is None or ctx.step < ctx.total_steps):
            for layer in layers:
                layer.merge_and_restart()
            if ctx.optimizer is not None:
                cls.check_optimizer(ctx.optimizer)
                reset_moments(layers, getattr(ctx.optimizer, "optimizer", ctx.optimizer), options)
        if ctx.optimizer is not None:
            factor = restart_factor(ctx.step + 1, n, warmup, anneal)
            set_jagged_lr(layers, ctx, factor, options.min_lr_ratio)

    @classmethod
    def report(cls, layers: dict[str, AdapterLayer]) -> dict:
        """The merges done and the effective rank of each layer's accumulated update (singular values above 1 %
        of the largest, from the factors: `dreamlora.compress`), next to r: what ReLoRA bought over LoRA."""
        ranks = {path: compress.layer_spectrum(layer).effective_rank() for path, layer in layers.items()}
        first = next(iter(layers.values()))
        values = torch.tensor(list(ranks.values()) or [0], dtype=torch.float64)
        return {"merges": first.merges, "rank": first.rank,
                "effective_rank": {"mean": values.mean().item(), "median": values.quantile(0.5).item(),
                                   "max": int(values.max().item())},
                "layers_above_rank": sum(v > first.rank for v in ranks.values()), "rank_per_layer": ranks}


def restart_factor(t: int, n: int, warmup: int, anneal: int) -> float:
    """f(t) of the jagged schedule for optimizer step t (1-based): p = t's place in its n-step cycle (1..n); p/warmup
    over the first `warmup` steps after a merge (not in the first cycle), (n − p + 1)/(anneal + 1) over the last
    `anneal` steps of each cycle, else 1."""
    p, cycle = (t - 1) % n + 1, (t - 1) // n
    warm = min(1.0, p / warmup) if cycle >= 1 and warmup > 0 else 1.0
    fall = min(1.0, (n - p + 1) / (anneal + 1)) if anneal > 0 else 1.0
    return min(warm, fall)


def set_jagged_lr(layers: list[ReLoRA], ctx, factor: float, min_ratio: float) -> None:
    """Set the lr of the next step in every optimizer group that holds this adapter's parameters (see the module
    docstring). The scheduler has just stepped, so its last lr is the envelope e(t)·lr_0 whatever this wrote before."""
    optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)
    ours = {id(p) for layer in layers for p in layer.parameters()}
    last = ctx.lr_scheduler.get_last_lr() if ctx.lr_scheduler is not None else None
    for i, group in enumerate(optimizer.param_groups):
        if not any(id(p) in ours for p in group["params"]):
            continue
        base = group.setdefault("initial_lr", group["lr"])  # set by any torch scheduler; else the first lr seen
        envelope = last[i] / base if last is not None and base else 1.0
        group["lr"] = base * (min_ratio + (1.0 - min_ratio) * envelope) * factor


@torch.no_grad()
def reset_moments(layers: list[ReLoRA], optimizer: torch.optim.Optimizer, options: ReLoRAOptions) -> None:
    """Zero (or prune) AdamW's moments of these layers' factors, right after their merge."""
    for layer in layers:
        index = layer.merges - 1  # the merge just done
        for which, p in enumerate((layer.lora_A, layer.lora_B)):
            state = optimizer.state.get(p)
            if not state:
                continue  # never stepped (no gradient yet): nothing to reset
            if "exp_avg" not in state or "exp_avg_sq" not in state:
                raise ValueError(f"relora resets AdamW's moments, but {type(optimizer).__name__} keeps no exp_avg/"
                                 f"exp_avg_sq for the adapter (state: {sorted(state)})")
            for moment, key in enumerate(MOMENTS):
                if key in state:
                    prune_(state[key], options, layer.seed_for(index, PRUNE, which, moment))


def prune_(t: torch.Tensor, options: ReLoRAOptions, seed: int) -> None:
    """Zero all of `t` (full), or its int(p·n) smallest-|value| entries (magnitude), or a seeded random int(p·n)."""
    if options.optimizer_reset == "full":
        t.zero_()
        return
    flat = t.view(-1)
    count = int(options.prune_ratio * flat.numel())
    if count == 0:
        return
    if options.optimizer_reset == "magnitude":
        threshold = flat.abs().kthvalue(count).values
        flat.masked_fill_(flat.abs() <= threshold, 0.0)
    else:
        chosen = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:count]
        flat[chosen.to(flat.device)] = 0.0
