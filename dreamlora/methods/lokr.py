"""LoKr (LyCORIS; Yeh et al., ICLR 2024): ΔW = s · W1 ⊗ W2, W2 full or low-rank (W2 = w2_a·w2_b).

Facts from `lycoris-lora` 4.1.3 (`lycoris/modules/lokr.py`, `functional/general.py`), the plain (non-Tucker,
non-`decompose_both`) form:
- The layer's dimensions are factored with LyCORIS's `factorization(dim, factor)`: d_out = a·b, C_in = c·d with
  a ≤ b, c ≤ d; the divisor pair closest to √dim when factor = -1, else the pair (factor, dim/factor) when factor
  divides dim, else the closest pair with the small side ≤ factor. W1 `lokr_w1` is (a, c), always full.
- W2 is low-rank, `lokr_w2_a` (b, r) · `lokr_w2_b` (r, d·kh·kw), when r < max(b, d)/2; otherwise full `lokr_w2`,
  (b, d) on Linear and (b, d, kh, kw) on Conv2d. So the form differs per layer.
- Init: W1 and w2_a Kaiming-uniform(a=√5) (fan-in c and r), w2_b = 0 and a full W2 = 0, so ΔW = 0 at init.
- Scale: s = alpha/r (alpha/√r with rsLoRA) when W2 is low-rank; s = 1 when W1 and W2 are both full (LyCORIS
  resets alpha to r there). Alpha default: LyCORIS's module argument defaults to alpha = 1 (s = 1/r), but here an
  unset `--alpha` means alpha = r, as everywhere in dreamlora, i.e. s = 1 (LyCORIS also takes alpha = r when it
  is given None or 0). Pass `--alpha 1` for LyCORIS's module default.
- No plain dropout (LyCORIS has none): `--lora_dropout > 0` is refused.
- Conv2d: LyCORIS's plain conv form: the full kernel lives in W2 (the kron is over (C_out, C_in) with the
  kh×kw window in W2); no Tucker core. Embedding and Conv1D use the same matrix view.

Forward without a weight-sized temporary: (W1 ⊗ W2)·vec(X) = vec(W1·X·W2ᵀ) with X the input reshaped (c, d);
on Conv2d the input's channels are grouped (N·c, d, H, W), W2 runs as a conv (w2_b a kh×kw conv to r channels,
w2_a a 1×1 conv) and W1 mixes the c groups. Embeddings gather columns of W1 and W2 per token.

Exact plain-LoRA form: W1 ⊗ (B2·A2) = (U1 ⊗ B2)(V1 ⊗ A2) for W1 = U1·V1 (U1 = I or V1 = I, whichever is
smaller), rank min(a, c)·r2 (r2 = r, or min(b, d·kh·kw) for a full W2). Above min(d_out, d_in·kh·kw) it is
re-factorised exactly as I·ΔW or ΔW·I at that rank.

Native LyCORIS keys: `lokr_w1`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`, `alpha`. The file folds s into `lokr_w1`
and writes alpha = r, so every reader's scale is 1: LyCORIS 4.1.3's `merge_to` (via `get_diff_weight`)
multiplies its scale in twice, while its forward and ComfyUI apply it once; at scale 1 they all agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dreamlora.config import AdapterConfig
from dreamlora.layer_kinds import Conv2dKind, LayerKind
from dreamlora.methods.base import AdapterLayer, kaiming_, register
from dreamlora.options import MethodOptions


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dim and m ≤ n, as LyCORIS splits a layer's dimension (see the module docstring)."""
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:  # grow the small divisor while m + n shrinks and m stays within the limit
        new_m = next(k for k in range(m + 1, dim + 1) if dim % k == 0)
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


@dataclass
class LoKrOptions(MethodOptions):
    factor: int = -1
    """LyCORIS's factorisation factor: -1 splits each dimension into the divisor pair closest to its square
    root; f > 0 makes f one side of the split where f divides the dimension (else the closest pair with the
    small side at most f)."""

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor == 0 or self.factor < -1:
            raise ValueError(f"lokr_factor must be -1 or a positive integer, got {self.factor!r}")


@register
class LoKr(AdapterLayer):
    method = "lokr"
    description = "LoKr (LyCORIS): Kronecker product of a small and a low-rank factor"
    Options = LoKrOptions
    file_keys = {"lokr_w1": "lokr_w1", "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b"}
    roles = {"lokr_w1": "shared", "lokr_w2": "shared", "lokr_w2_a": "up", "lokr_w2_b": "down"}
    inits = ("kaiming",)  # LyCORIS's: Kaiming-uniform(a=√5) of W1 and w2_a, zero w2_b or full W2 (as LoRA's A, B)
    kohya_network_module = "lycoris.kohya"

    def __init__(self, kind: LayerKind, config: AdapterConfig):
        if config.dropout > 0:
            raise ValueError(f"lokr has no plain dropout (LyCORIS's LoKr has none): --lora_dropout must be 0, "
                             f"got {config.dropout}")
        super().__init__(kind, config)
        factor = config.options.factor
        c_in = kind.c_in if isinstance(kind, Conv2dKind) else kind.d_in
        self.window = kind.d_in // c_in  # kh·kw, 1 off Conv2d
        (self.a, self.b), (self.c, self.d) = factorization(kind.d_out, factor), factorization(c_in, factor)
        r, device = config.rank, kind.base.weight.device
        self.low_rank = r < max(self.b, self.d) / 2
        # W2 before W1: LyCORIS's order of random draws, so one seed gives both the same init
        if self.low_rank:
            self.lokr_w2_a = nn.Parameter(kaiming_(torch.empty(self.b, r, device=device)))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r, self.d * self.window, device=device))
            self.register_parameter("lokr_w2", None)
        else:
            w2_shape = (self.b, self.d, *kind.base.weight.shape[2:])  # (b, d[, kh, kw])
            self.lokr_w2 = nn.Parameter(torch.zeros(w2_shape, device=device))
            self.register_parameter("lokr_w2_a", None)
            self.register_parameter("lokr_w2_b", None)
        self.lokr_w1 = nn.Parameter(kaiming_(torch.empty(self.a, self.c, device=device)))
        self.scaling = config.scaling if self.low_rank else 1.0  # LyCORIS: full W1 and W2 take scale 1

    def w2_matrix(self) -> torch.Tensor:
        """W2 as a (b, d·kh·kw) matrix."""
        if self.low_rank:
            return self.lokr_w2_a @ self.lokr_w2_b
        return self.lokr_w2.reshape(self.b, -1)

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        x = self._input(x, self.lokr_w1.dtype)
        if self.kind.is_embedding:
            h = self._embedding_delta(x)
        elif isinstance(self.kind, Conv2dKind):
            h = self._conv_delta(x)
        else:
            h = self._linear_delta(x)
        return base_out.add(h.to(base_out.dtype), alpha=self.effective_scale)

    def _linear_delta(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.reshape(*x.shape[:-1], self.c, self.d)  # X (…, c, d)
        if self.low_rank:
            xw2 = (xs @ self.lokr_w2_b.t()) @ self.lokr_w2_a.t()  # X·W2ᵀ through rank r: (…, c, b)
        else:
            xw2 = xs @ self.lokr_w2.t()
        return (self.lokr_w1 @ xw2).reshape(*x.shape[:-1], self.a * self.b)  # W1·X·W2ᵀ, row-major vec

    def _conv_delta(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n, _, height, width = x.shape
        grouped = x.reshape(n * self.c, self.d, height, width)  # channel ci·d + di -> group ci
        base, kernel = self.kind.base, self.kind.base.weight.shape[2:]
        if self.low_rank:
            down = self.lokr_w2_b.reshape(-1, self.d, *kernel)  # (r, d, kh, kw)
            h = F.conv2d(grouped, down, None, base.stride, base.padding, base.dilation)
            h = F.conv2d(h, self.lokr_w2_a[:, :, None, None])  # (n·c, b, H', W')
        else:
            h = F.conv2d(grouped, self.lokr_w2, None, base.stride, base.padding, base.dilation)
        h = h.reshape(n, self.c, self.b, *h.shape[2:])
        out = torch.einsum("ac,ncbhw->nabhw", self.lokr_w1, h).reshape(n, self.a * self.b, *h.shape[3:])
        return out.squeeze(0) if unbatched else out

    def _embedding_delta(self, ids: torch.Tensor) -> torch.Tensor:
        """Column `id` of the (dim, vocab) matrix view W1 ⊗ W2: W1[:, id // d] ⊗ W2[:, id % d]."""
        w1_cols = F.embedding(ids // self.d, self.lokr_w1.t())  # (…, a)
        if self.low_rank:
            w2_cols = F.embedding(ids % self.d, self.lokr_w2_b.t()) @ self.lokr_w2_a.t()  # (…, b)
        else:
            w2_cols = F.embedding(ids % self.d, self.lokr_w2.t())
        return (w1_cols.unsqueeze(-1) * w2_cols.unsqueeze(-2)).reshape(*ids.shape, self.a * self.b)

    # --- merge and export ----------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        return self.effective_scale * torch.kron(self.lokr_w1, self.w2_matrix())  # (d_out, d_in·kh·kw)

    def lora_factors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            up, down = self._kron_lora()
            up = up * self.scaling
            if up.shape[1] > min(self.kind.d_out, self.kind.d_in):  # exact re-factorisation at the cap
                delta = up @ down
                eye = torch.eye(min(delta.shape), dtype=delta.dtype, device=delta.device)
                up, down = (eye, delta) if delta.shape[0] <= delta.shape[1] else (delta, eye)
        return {"lora_A.weight": self.kind.down_from_matrix(down.contiguous()),
                "lora_B.weight": self.kind.up_from_matrix(up.contiguous())}

    def _kron_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U1 ⊗ B2, V1 ⊗ A2), unscaled: W1 ⊗ W2 = (U1·V1) ⊗ (B2·A2) with one side of each an identity."""
        w1 = self.lokr_w1
        u1, v1 = (torch.eye(self.a, dtype=w1.dtype, device=w1.device), w1) if self.a <= self.c else (
            w1, torch.eye(self.c, dtype=w1.dtype, device=w1.device))
        if self.low_rank:
            b2, a2 = self.lokr_w2_a, self.lokr_w2_b
        else:
            w2 = self.w2_matrix()
            eye = torch.eye(min(w2.shape), dtype=w2.dtype, device=w2.device)
            b2, a2 = (eye, w2) if w2.shape[0] <= w2.shape[1] else (w2, eye)
        return torch.kron(u1, b2), torch.kron(v1, a2)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """LyCORIS keys with the scale folded into `lokr_w1` and alpha = r: every reader's scale is 1."""
        out = {"lokr_w1": (self.lokr_w1.detach() * self.scaling).contiguous()}
        if self.low_rank:
            out |= {"lokr_w2_a": self.lokr_w2_a.detach().contiguous(),
                    "lokr_w2_b": self.lokr_w2_b.detach().contiguous()}
        else:
            out["lokr_w2"] = self.lokr_w2.detach().contiguous()
        return out | {"alpha": torch.tensor(float(self.rank))}

    def extra_repr(self) -> str:
        w2 = f"({self.b}, {self.rank})·({self.rank}, {self.d * self.window})" if self.low_rank else (
            f"({self.b}, {self.d * self.window}) full")
        return f"{super().extra_repr()}, w1=({self.a}, {self.c}), w2={w2}"
