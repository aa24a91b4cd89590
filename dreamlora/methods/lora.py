"""LoRA (Hu et al. 2021, §4.1): y = W0·x + b + s·B·A·x, with s = α/r (α/√r with rsLoRA).

Init: A (r, d_in) Kaiming-uniform(a=√5), B (d_out, r) zero, so the layer is the base layer at step 0.
Embeddings are the other way round, as in PEFT: A zero, B ~ N(0, 1).
Merge: W ← W0 + s·B·A. Conv2d: A is a k×k conv to r channels, B a 1×1 conv (see layer_kinds).
"""

from __future__ import annotations

import torch
from torch import nn

from dreamlora.config import AdapterConfig
from dreamlora.layer_kinds import LayerKind
from dreamlora.methods.base import AdapterLayer, init_down_, register


@register
class LoRA(AdapterLayer):
    method = "lora"
    description = "LoRA: the classic low-rank update"
    file_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    roles = {"lora_A": "down", "lora_B": "up"}

    def __init__(self, kind: LayerKind, config: AdapterConfig):
        super().__init__(kind, config)
        device = kind.base.weight.device
        r = config.rank
        a = torch.empty(kind.down_shape(r), device=device)  # (r, d_in)
        b = torch.empty(kind.up_shape(r), device=device)  # (d_out, r)
        if kind.is_embedding:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        else:
            init_down_(a, config)
            nn.init.zeros_(b)
        self.lora_A, self.lora_B = nn.Parameter(a), nn.Parameter(b)

    def lora_term(self, x: torch.Tensor) -> torch.Tensor:
        """B·A·x in the adapter's dtype (fp32), unscaled, dropout included."""
        return self.lora_of_prepared(self._input(x, self.lora_A.dtype))

    def lora_of_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """B·A·x for an input already cast (and dropped out) by `_input`."""
        return self.kind.up(self.kind.down(x, self.lora_A), self.lora_B)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out.add(self.lora_term(x).to(base_out.dtype), alpha=self.effective_scale)

    def delta_weight(self) -> torch.Tensor:
        k = self.kind
        return self.effective_scale * (k.up_matrix(self.lora_B) @ k.down_matrix(self.lora_A))  # (d_out, d_in)

    def lora_factors(self) -> dict[str, torch.Tensor]:
        # alpha = r in the exported file, so the scale goes into B.
        return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach() * self.scaling}
