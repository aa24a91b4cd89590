"""LoRA+ (Hayou, Ghosh, Yu 2024, §3): LoRA layers, with B trained at λ times A's learning rate.

Only the optimizer groups differ from LoRA. They match `peft.optimizers.create_loraplus_optimizer`:
A at lr; B at lr·λ with weight decay; adapters on embedding layers at `loraplus_lr_embedding`.
Deliberate difference: PEFT sends every 1-D parameter to the λ group, so a Linear DoRA magnitude trains
at lr·λ but a Conv2d one (shape (1, C, 1, 1)) at lr. Here magnitudes always train at lr without decay:
they start at ‖W0‖, not at zero, so the width argument that motivates λ for B does not apply to them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dreamlora.config import AdapterConfig
from dreamlora.methods.base import register
from dreamlora.methods.lora import LoRA


@register
class LoRAPlus(LoRA):
    method = "loraplus"

    @classmethod
    def param_groups(
        cls, params: Sequence[tuple[str, nn.Parameter, str]], lr: float, weight_decay: float, config: AdapterConfig
    ) -> list[dict]:
        ratio = config.loraplus_ratio
        by_role: dict[str, list[nn.Parameter]] = {"down": [], "up": [], "embedding": [], "magnitude": []}
        for _, p, role in params:
            by_role[role].append(p)
        groups = [
            {"params": by_role["down"], "lr": lr, "weight_decay": weight_decay, "role": "lora_A"},
            {"params": by_role["embedding"], "lr": config.loraplus_lr_embedding, "weight_decay": weight_decay,
             "role": "embedding"},
            {"params": by_role["up"], "lr": lr * ratio, "weight_decay": weight_decay, "role": "lora_B"},
            {"params": by_role["magnitude"], "lr": lr, "weight_decay": 0.0, "role": "magnitude"},
        ]
        return [g for g in groups if g["params"]]
