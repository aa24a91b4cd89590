"""How an adapter sees a base layer: as a matrix (d_out, d_in), and as two cheap ops on its input.

Every method is written once against this view, so Linear, Conv2d, Embedding and transformers' Conv1D
(GPT-2) share the method code. Conv2d follows PEFT and kohya (LoCon): the down factor is a k×k conv from C_in to r with
the base's stride, padding and dilation, the up factor a 1×1 conv from r to C_out, so the matrix view of the
conv weight is (C_out, C_in·k·k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedLayer(TypeError):
    pass


class LayerKind:
    """The view every kind shares, written for a weight stored (d_out, d_in) with y = x·Wᵀ + b; the other kinds
    override what differs."""

    is_embedding = False
    file_key_names: dict[str, str] = {}  # PEFT renames some keys per layer type (embeddings)

    def __init__(self, base: nn.Module):
        self.base = base
        self.d_out, self.d_in = base.weight.shape

    # --- factor shapes and the matrix view -------------------------------------------------------------
    def down_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.d_in)

    def up_shape(self, r: int) -> tuple[int, ...]:
        return (self.d_out, r)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.d_out,)

    def down_matrix(self, down: torch.Tensor) -> torch.Tensor:
        return down.reshape(down.shape[0], -1)  # (r, d_in)

    def up_matrix(self, up: torch.Tensor) -> torch.Tensor:
        return up.reshape(up.shape[0], -1)  # (d_out, r)

    def down_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m  # a Linear factor already is its matrix; Conv2d reshapes

    def up_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def weight_matrix(self) -> torch.Tensor:
        return self.base.weight  # (d_out, d_in)

    def weight_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def file_key(self, key: str) -> str:
        return self.file_key_names.get(key, key)

    # --- the ops on the input ------------------------------------------------------------------------
    def prepare_input(self, x: torch.Tensor, dtype: torch.dtype, dropout: nn.Module | None) -> torch.Tensor:
        x = x.to(dtype)  # cast in: adapter weights stay fp32 on a half-precision base
        return dropout(x) if dropout is not None else x

    def down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return F.linear(x, down)

    def up(self, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.linear(h, up)

    def per_output(self, v: torch.Tensor) -> torch.Tensor:
        """Broadcast a (d_out,) vector over the base output."""
        return v

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight)

    def bias(self) -> torch.Tensor | None:
        return self.base.bias


class LinearKind(LayerKind):
    """nn.Linear: weight (d_out, d_in), y = x·Wᵀ + b — the shared view as is."""


class TransposedKind(LayerKind):
    """A layer whose weight is stored (d_in, d_out): its matrix view is Wᵀ."""

    def __init__(self, base: nn.Module):
        self.base = base
        self.d_in, self.d_out = base.weight.shape

    def weight_matrix(self) -> torch.Tensor:
        return self.base.weight.t()

    def weight_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m.t().contiguous()


class Conv1DKind(TransposedKind):
    """transformers' Conv1D (GPT-2): weight stored (d_in, d_out), y = x·W + b. PEFT's fan_in_fan_out."""

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.base.weight


class Conv2dKind(LayerKind):
    """nn.Conv2d with groups=1 and zero padding: matrix view (C_out, C_in·kh·kw)."""

    def __init__(self, base: nn.Conv2d):
        if base.groups != 1:
            raise UnsupportedLayer(f"grouped Conv2d (groups={base.groups}) is not supported")
        if base.padding_mode != "zeros":
            raise UnsupportedLayer(f"Conv2d with padding_mode={base.padding_mode!r} is not supported")
        if isinstance(base.padding, str) and base.padding != "valid" and base.stride != (1, 1):
            raise UnsupportedLayer("Conv2d with padding='same' and stride > 1 is not supported")
        self.base = base
        self.c_out, self.c_in, self.kh, self.kw = base.weight.shape
        self.d_out, self.d_in = self.c_out, self.c_in * self.kh * self.kw

    def down_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.c_in, self.kh, self.kw)

    def up_shape(self, r: int) -> tuple[int, ...]:
        return (self.c_out, r, 1, 1)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.c_out, 1, 1)  # PEFT's shape, so files interoperate

    def down_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(self.down_shape(m.shape[0]))

    def up_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(self.up_shape(m.shape[1]))

    def weight_matrix(self) -> torch.Tensor:
        return self.base.weight.reshape(self.c_out, -1)

    def weight_from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(self.base.weight.shape)

    def down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.conv2d(x, down, None, b.stride, b.padding, b.dilation)

    def up(self, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, up)

    def per_output(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, 1, 1)  # channels are dim -3 for batched and unbatched input

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.conv2d(x, b.weight, None, b.stride, b.padding, b.dilation)


class EmbeddingKind(TransposedKind):
    """nn.Embedding: weight (num_embeddings, dim). As in PEFT the matrix view is Wᵀ (dim, num_embeddings), so
    A (r, num_embeddings) is looked up by token id and B is (dim, r); files name them lora_embedding_A/B."""

    is_embedding = True
    file_key_names = {"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B"}

    def __init__(self, base: nn.Embedding):
        if base.max_norm is not None or base.sparse:
            raise UnsupportedLayer("Embedding with max_norm or sparse gradients is not supported")
        super().__init__(base)

    def prepare_input(self, x: torch.Tensor, dtype: torch.dtype, dropout: nn.Module | None) -> torch.Tensor:
        return x  # token ids: nothing to cast, and PEFT applies no dropout to them

    def down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, down.t(), padding_idx=self.base.padding_idx)

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.base.weight, padding_idx=self.base.padding_idx)

    def bias(self) -> None:
        return None


def file_key_spellings(key: str) -> set[str]:
    """Every way some layer kind spells file key `key` (PEFT renames a few per layer type)."""
    kinds, spellings = [LayerKind], {key}
    while kinds:
        kind = kinds.pop()
        spellings.add(kind.file_key_names.get(key, key))
        kinds.extend(kind.__subclasses__())
    return spellings


def kind_of(module: nn.Module) -> LayerKind:
    """The view of a supported layer; `UnsupportedLayer` for anything else."""
    if isinstance(module, nn.Linear):
        return LinearKind(module)
    if isinstance(module, nn.Conv2d):
        return Conv2dKind(module)
    if isinstance(module, nn.Embedding):
        return EmbeddingKind(module)
    # transformers' Conv1D, recognised by shape so the core does not import transformers.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return Conv1DKind(module)
    raise UnsupportedLayer(
        f"{type(module).__name__} is not an adaptable layer (supported: Linear, Conv2d, Embedding, Conv1D)"
    )
