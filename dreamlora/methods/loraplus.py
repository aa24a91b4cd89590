"""LoRA+ (Hayou, Ghosh, Yu 2024, §3): LoRA layers, with B trained at λ times A's learning rate.

Only the optimizer groups differ from LoRA. They match `peft.optimizers.create_loraplus_optimizer`:
A at lr; B at lr·λ with weight decay; adapters on embedding layers at `loraplus_lr_embedding`.
Deliberate difference: PEFT sends every 1-D parameter to the λ group, so a Linear DoRA magnitude trains
at lr·λ but a Conv2d one (shape (1, C, 1, 1)) at lr. Here magnitudes always train at lr without decay:
they start at ‖W0‖, not at zero, so the width argument that motivates λ for B does not apply to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from dreamlora.config import AdapterConfig
from dreamlora.methods.base import register
from dreamlora.methods.lora import LoRA
from dreamlora.options import MethodOptions


@dataclass
class LoRAPlusOptions(MethodOptions):
    ratio: float = 16.0
    """λ: the up factor B trains at λ times the learning rate (Hayou et al. 2024 recommend 2^4)."""

    lr_embedding: float = 1e-6
    """Absolute learning rate of adapters on embedding layers, as PEFT's `loraplus_lr_embedding`."""

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not self.ratio > 0:
            raise ValueError(f"loraplus_ratio must be > 0, got {self.ratio!r}")
        if isinstance(self.lr_embedding, bool) or not isinstance(self.lr_embedding, (int, float)) or (
                not self.lr_embedding >= 0):
            raise ValueError(f"loraplus_lr_embedding must be >= 0, got {self.lr_embedding!r}")


@register
class LoRAPlus(LoRA):
    method = "loraplus"
    description = "LoRA+: B learns λ× faster than A"
    Options = LoRAPlusOptions

    @classmethod
    def param_groups(
        cls, params: Sequence[tuple[str, nn.Parameter, str]], lr: float, weight_decay: float, config: AdapterConfig
    ) -> list[dict]:
        ratio = config.options.ratio
        by_role: dict[str, list[nn.Parameter]] = {"down": [], "up": [], "embedding": [], "magnitude": []}
        for _, p, role in params:
            by_role[role].append(p)
        groups = [
            {"params": by_role["down"], "lr": lr, "weight_decay": weight_decay, "role": "lora_A"},
            {"params": by_role["embedding"], "lr": config.options.lr_embedding, "weight_decay": weight_decay,
             "role": "embedding"},
            {"params": by_role["up"], "lr": lr * ratio, "weight_decay": weight_decay, "role": "lora_B"},
            {"params": by_role["magnitude"], "lr": lr, "weight_decay": 0.0, "role": "magnitude"},
        ]
        return [g for g in groups if g["params"]]
