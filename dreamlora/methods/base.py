"""The contract every adapter method implements, and the registry that names them.

One `AdapterLayer` instance adapts one base layer for one named adapter. The host (`dreamlora.inject`)
runs the base layer and hands its output to each active adapter, PEFT's "variant" shape:

    y = base(x);  y = adapter(x, y)  for each active adapter

A method says what it is through:
- `forward(x, base_out)`: the adapted output, computed from the input side (never W0 + ΔW in training);
- `delta_weight()` / `merge_into(w)`: the merge rule, for export, inference and tests;
- its export (see "Export" below): `lora_factors()`, `kohya_tensors()`, `unsupported_formats`;
- class-level hooks over all layers of one adapter: `param_groups` (optimizer), `after_optimizer_step`
  (SingLoRA's ramp; ReLoRA's merge-and-reinit: it receives a `dreamlora.hooks.StepContext` with the step, the
  run's length, the optimizer and the LR scheduler), `regularization` (AdaLoRA's orthogonality loss);
- `state_keys`: state that is not a parameter but must survive a checkpoint and reach the saved file
  (ReLoRA's merged base delta, AdaLoRA's importance averages and masks), kept in persistent buffers.
The training loop calls those hooks through `dreamlora.hooks` and never asks which method it runs.
It also says `description` (one line for the app, `--help` and the README) and `Options`, its own options
dataclass (`dreamlora.options`): the trainers' flags and the app's fields are generated from it.

Export: a method says how it is written in each format of `EXPORT_FORMATS`, or that it cannot be, and why.
- "lora": `lora_factors()`, the exact update as plain PEFT LoRA factors of any rank, which may differ from the
  `rank` option and from layer to layer (AdaLoRA's pruned ranks, LoHa's r1·r2); alpha is that layer's factor
  rank, the scale folded into B. The PEFT/diffusers writers read each layer's rank from its factors.
- "kohya": `kohya_tensors()`, one layer in kohya/LyCORIS keys (suffixes after `lora_unet_<path>.`, each with
  its own `alpha`); by default the LoRA factors as `lora_down`/`lora_up`, so only a method with native
  LyCORIS keys (LoHa's `hada_*`) overrides it.
- `unsupported_formats`: format -> reason, for a format the method cannot be written in exactly. A writer
  asked for such a format raises `ExportUnsupported` naming the format and the reason; `write_tool_files`
  skips that file with a warning and writes the others. A method that defines no `lora_factors` cannot be
  written as "lora" (nor as "kohya" unless it defines `kohya_tensors`) without listing it here.

Device and dtype moves (one rule, here, so every registered method follows it): a device move of the model
(`.to("cuda")`, `.to("meta")`, `.cpu()`, accelerate's hooks) moves the adapter's parameters and buffers with
it; a dtype cast of the model (`.to(torch.bfloat16)`, `.half()`, `.bfloat16()`, `.float()`, `.double()`) does
not change them: they keep their own dtype (fp32) while the base layers take the new one. So an adapter on a
half-precision base is fp32 whether it was attached before or after the cast, training keeps fp32 weights
and optimizer states, and DoRA's cached fp32 ‖W0‖² keeps the layer an exact identity at init. State cached
from the base weight lives in non-persistent buffers, so it moves with the module and never enters a file.
State a method accumulates while training lives in persistent fp32 buffers named in `state_keys`: they move
and keep their dtype by the same rule, and `dreamlora.save`/`load` (so every checkpoint) write and read them
next to the parameters, so a resumed run continues from exactly the state the interrupted one had.
Code that writes tensors without `nn.Module._apply` (accelerate's `set_module_tensor_to_device` with a dtype)
can still hand an adapter half-precision tensors: the forward casts its input to the adapter's own dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from dreamlora.config import AdapterConfig
from dreamlora.layer_kinds import LayerKind
from dreamlora.options import MethodOptions

if TYPE_CHECKING:  # hooks imports this module: the type only, no import cycle at run time
    from dreamlora.hooks import StepContext

PLUGIN_GROUP = "dreamlora.methods"
# the formats a method is written in for other tools (see "Export" in the module docstring)
EXPORT_FORMATS = {"lora": "exact plain-LoRA factors (the PEFT/diffusers file, export_lora)",
                  "kohya": "kohya/LyCORIS keys (the kohya and ComfyUI files)"}


class ExportUnsupported(ValueError):
    """A method cannot be written in the format asked for (its `unsupported_formats` says why)."""


class Registry(MutableMapping):
    """The one list of methods, name -> class. Built-in methods register when `dreamlora.methods` loads (each
    module of that folder is imported); methods of other installed packages, declared in the entry-point group
    `dreamlora.methods`, load on the first lookup, never at `import dreamlora`, and a plugin that fails to load
    is reported by name with a warning while the others still load."""

    def __init__(self):
        self._methods: dict[str, type[AdapterLayer]] = {}
        self._plugins_loaded = False

    def _all(self) -> dict[str, type[AdapterLayer]]:
        if not self._plugins_loaded:
            self._plugins_loaded = True  # first: a plugin that looks methods up while loading must not recurse
            _load_plugins(self._methods)
        return self._methods

    def __getitem__(self, name: str) -> type[AdapterLayer]:
        return self._all()[name]

    def __setitem__(self, name: str, cls: type[AdapterLayer]) -> None:
        self._methods[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._methods[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"Registry({sorted(self._methods)}, plugins_loaded={self._plugins_loaded})"


def _load_plugins(methods: dict[str, type[AdapterLayer]]) -> None:
    from importlib.metadata import entry_points  # here, not at import: `import dreamlora` reads no metadata

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, AdapterLayer) and isinstance(cls.__dict__.get("method"),
                                                                                          str)):
                raise TypeError(f"{ep.value} is not an AdapterLayer subclass with its own `method` name")
            if methods.get(cls.method, cls) is not cls:
                raise ValueError(f"the name {cls.method!r} is taken by {methods[cls.method].__module__}")
            methods[cls.method] = cls
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the others (or the built-ins) down
            warnings.warn(f"dreamlora: method plugin {ep.name!r} ({ep.value}) was not loaded: "
                          f"{type(e).__name__}: {e}", stacklevel=2)


METHODS = Registry()


def register(cls: type[AdapterLayer]) -> type[AdapterLayer]:
    """Class decorator of a method: `@register` in its own file is all it takes (see `dreamlora.methods`)."""
    METHODS[cls.method] = cls
    return cls


class AdapterLayer(nn.Module):
    method: ClassVar[str]
    # one line for the app's method picker, `--help` and the README's method table.
    description: ClassVar[str] = ""
    # the method's own options (a dataclass with a docstring per field); `config.options` is an instance of it.
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    # parameter attribute -> key suffix in saved files (PEFT's names where the tensor means the same). A method
    # whose form differs per layer (LoKr: W2 full or low-rank) lists every attribute and registers the ones a
    # layer lacks as None (`register_parameter(name, None)`); files, roles and optimizers skip them.
    file_keys: ClassVar[dict[str, str]]
    # persistent buffer attribute -> key suffix in saved files: state beyond the parameters that a checkpoint and
    # the adapter file carry (the buffers are registered by the method's __init__, fp32). Empty for most methods.
    state_keys: ClassVar[dict[str, str]] = {}
    # parameter attribute -> role used by optimizer grouping: "down", "up", "magnitude" or "shared".
    roles: ClassVar[dict[str, str]]
    # the values `AdapterConfig.init` may take for this method; the first is its default (init=None).
    inits: ClassVar[tuple[str, ...]] = ("kaiming", "gaussian")
    # True when forward reads the base weight itself (DoRA's norm), not only the base layer's output: such a
    # method cannot run under accelerate's sequential CPU offload, which loads W0 only inside the base's own call.
    reads_base_weight: ClassVar[bool] = False
    # export format (a key of EXPORT_FORMATS) -> why this method cannot be written in it exactly.
    unsupported_formats: ClassVar[dict[str, str]] = {}
    # the kohya file's `ss_network_module`: what kohya/A1111 build to read this method's keys.
    kohya_network_module: ClassVar[str] = "networks.lora"
    # the rank of this method's plain-LoRA files (diffusers, PEFT, kohya) unless the user says (`export_rank`):
    # "exact" writes `lora_factors()` as they are; "auto" (ReLoRA, whose exact update has rank (merges + 1)·r) the
    # truncated SVD keeping 99 % of ‖ΔW‖²_F, at most 4×rank; an integer, that rank (see `dreamlora.compress`).
    default_export_rank: ClassVar[str | int] = "exact"
    # how `dreamlora.compose` may mix adapters of this method (see `RULES` there): "factors" (either rule: the update
    # is one low-rank product B·A, linear in the scale), "updates" (only as a weighted sum of whole updates, taken
    # from the exact `lora_factors()`: ReLoRA's stacked merges are no single trained B·A pair), or None (refused,
    # `composition_note` says why: DoRA's magnitude rescale is not additive).
    composition: ClassVar[str | None] = "factors"
    composition_note: ClassVar[str] = ""
    # whether an exponential moving average of this method's trained tensors over the optimizer steps (the trainers'
    # `--use_ema`) is itself an adapter of this method worth using: True when every trained tensor keeps its meaning
    # from step to step. False (refused, `averaging_note` says why) when a method re-initialises or masks its tensors
    # during training, so an average would mix tensors that no longer stand for the same thing (ReLoRA, AdaLoRA).
    averageable: ClassVar[bool] = True
    averaging_note: ClassVar[str] = ""

    def __init__(self, kind: LayerKind, config: AdapterConfig):
        super().__init__()
        self.kind = kind  # a plain object holding the base layer: not a submodule, so no duplicate weights
        self.config = config
        self.rank = config.rank
        self.scaling = config.scaling
        self.multiplier = 1.0  # the user's per-adapter scale (set_scale)
        self.enabled = True
        self.step = 0  # optimizer steps taken; persisted through get/set_extra_state
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.export_rank: str | int | None = None  # None: the method's `default_export_rank` (`set_export_rank`)

    def _apply(self, fn, recurse: bool = True):
        """Every `Module.to/.half/.cuda/...` comes through here: keep device moves, drop dtype casts (see the
        module docstring). `fn` is tried on an empty tensor of the same dtype and device to learn its target."""

        def device_only(t: torch.Tensor) -> torch.Tensor:
            target = fn(t.new_empty(0))
            if target.dtype == t.dtype:
                return fn(t)  # a pure device move (or to_empty, share_memory_): exactly what fn does
            return t.to(device=target.device)  # one copy, no rounding through the cast dtype

        return super()._apply(device_only, recurse)

    @property
    def effective_scale(self) -> float:
        return self.scaling * self.multiplier

    def _input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.kind.prepare_input(x, dtype, self.dropout)

    def present(self, attrs: Iterable[str]) -> list[str]:
        """The attributes of `attrs` this layer has (not None): see `file_keys`."""
        return [a for a in attrs if getattr(self, a, None) is not None]

    def file_key(self, attr: str) -> str:
        """The key suffix of parameter `attr` in saved files (PEFT names, per layer type)."""
        return self.kind.file_key(type(self).file_keys[attr])

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Everything this layer writes to a native file, by key suffix: its parameters (`file_keys`) and its
        persistent state (`state_keys`). Loading fills exactly these tensors back."""
        out = {self.file_key(attr): getattr(self, attr) for attr in self.present(type(self).file_keys)}
        out.update({key: getattr(self, attr) for attr, key in type(self).state_keys.items()})
        return out

    # --- what a method defines ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW as a (d_out, d_in) fp32 matrix, scale included."""
        raise NotImplementedError

    def merge_into(self, w: torch.Tensor) -> torch.Tensor:
        """The fp32 (d_out, d_in) matrix `w` with this adapter folded in. `w` is the base weight, or the base with
        earlier adapters already folded in: `merge` chains these in fp32 and rounds once."""
        return w + self.delta_weight()

    def merged_weight(self) -> torch.Tensor:
        """The base weight (in the base's own layout, fp32) with this adapter folded in."""
        return self.kind.weight_from_matrix(self.merge_into(self.kind.weight_matrix().float()))

    def lora_factors(self) -> dict[str, torch.Tensor]:
        """The exact update as PEFT LoRA tensors, `lora_A.weight` (rank, d_in[, kh, kw]) and `lora_B.weight`
        (d_out, rank[, 1, 1]) (and `lora_magnitude_vector` for DoRA), with alpha = this layer's factor rank:
        the scale is folded into B. The rank is this layer's own (any, not necessarily `self.rank`)."""
        raise NotImplementedError

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """This layer in kohya/LyCORIS keys, the suffixes after `lora_unet_<path>.`, `alpha` included. Default:
        the LoRA factors as `lora_down`/`lora_up`, DoRA's magnitude as a per-output-row `dora_scale` (LyCORIS's
        `wd_on_output` form). Readers scale by alpha / (the layer's factor rank); alpha is the `rank` option on
        every layer and `lora_up` carries factor rank / rank option, so the product is the exact update while
        the file has one alpha: diffusers' kohya converter loses per-module alphas of the text encoder under
        transformers 5 (its alpha_pattern keeps the `text_model.` level). For LoRA itself the factor is 1."""
        factors, _ = self.export_factors()
        if not factors:
            return {}
        down = factors["lora_A.weight"]
        ratio = down.shape[0] / self.rank
        up = factors["lora_B.weight"] if ratio == 1 else factors["lora_B.weight"] * ratio
        out = {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
               "alpha": torch.tensor(float(self.rank))}
        if "lora_magnitude_vector" in factors:
            out["dora_scale"] = per_row(factors["lora_magnitude_vector"], self.kind)
        return out

    def export_factors(self) -> tuple[dict[str, torch.Tensor], float]:
        """What the plain-LoRA files hold for this layer: `lora_factors()` at this layer's export rank (see
        `default_export_rank`), and the relative Frobenius error of that rank (0.0 when exact). Empty factors (a
        layer pruned to rank 0 by AdaLoRA) stay empty: the writers leave such a layer out."""
        from dreamlora import compress  # here: compress reads layers, and base must not import it at load time

        factors = self.lora_factors()
        wanted = type(self).default_export_rank if self.export_rank is None else self.export_rank
        if not factors or wanted == "exact":
            return factors, 0.0
        spec = compress.layer_spectrum(self)
        rank = min(spec.energy_rank(), 4 * self.rank) if wanted == "auto" else int(wanted)
        if rank >= factors["lora_A.weight"].shape[0]:
            return factors, 0.0  # the exact factors already have at most this rank
        truncated, error = compress.truncate(self, rank)
        return {**factors, **truncated}, error

    @classmethod
    def unsupported_reason(cls, fmt: str) -> str | None:
        """Why this method cannot be written in export format `fmt`; None when it can."""
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
        if fmt in cls.unsupported_formats:
            return cls.unsupported_formats[fmt]
        if fmt == "lora" and cls.lora_factors is AdapterLayer.lora_factors:
            return f"{cls.__name__} defines no lora_factors()"
        if fmt == "kohya" and cls.kohya_tensors is AdapterLayer.kohya_tensors:
            lora_reason = cls.unsupported_reason("lora")  # the default kohya form is built from the LoRA factors
            return lora_reason and f"{lora_reason} (its kohya keys are built from its LoRA form)"
        return None

    @classmethod
    def check_format(cls, fmt: str) -> None:
        """Raise `ExportUnsupported` (format and reason named) when this method cannot be written as `fmt`."""
        reason = cls.unsupported_reason(fmt)
        if reason is not None:
            raise ExportUnsupported(f"a {cls.method} adapter cannot be written as {EXPORT_FORMATS[fmt]} "
                                    f"(format {fmt!r}): {reason}")

    def resize_state(self, attr: str, shape: tuple[int, ...]) -> bool:
        """Give the persistent state buffer `attr` (one of `state_keys`) the shape a file holds, before loading it;
        False refuses (the default: a state whose shape differs belongs to another base). A method whose state
        grows while it trains (ReLoRA's stacked merges) re-registers the buffer with `shape` and returns True."""
        return False

    def base_weight_changed(self) -> None:
        """Called after something (a merge) rewrote the base weight; refresh anything cached from it."""

    # --- class-level hooks over all layers of one adapter -------------------------------------------
    @classmethod
    def param_groups(
        cls, params: Sequence[tuple[str, nn.Parameter, str]], lr: float, weight_decay: float, config: AdapterConfig
    ) -> list[dict]:
        """Optimizer groups for one adapter. `params` are (qualified name, parameter, role) triples.
        DoRA magnitudes get no weight decay: decaying them pulls each row's norm towards 0, not towards W0."""
        decayed = [p for _, p, role in params if role != "magnitude"]
        magnitudes = [p for _, p, role in params if role == "magnitude"]
        groups = [{"params": decayed, "lr": lr, "weight_decay": weight_decay, "role": "factors"}]
        if magnitudes:
            groups.append({"params": magnitudes, "lr": lr, "weight_decay": 0.0, "role": "magnitude"})
        return groups

    @classmethod
    def after_optimizer_step(cls, layers: Iterable[AdapterLayer], ctx: StepContext) -> None:
        """Run once per optimizer step, after `optimizer.step()` and before `zero_grad()` (gradients are still
        there). `ctx` carries the new step, the run's length, the optimizer and the LR scheduler; the base
        records the step (SingLoRA's ramp reads it), so an override calls `super()` first."""
        for layer in layers:
            layer.step = ctx.step

    @classmethod
    def check_optimizer(cls, optimizer: torch.optim.Optimizer) -> None:
        """Raise ValueError when this method cannot train with `optimizer` (ReLoRA resets AdamW's moments). The
        trainers call it once the optimizer is built and name the flag that chose it."""

    @classmethod
    def report(cls, layers: dict[str, AdapterLayer]) -> dict:
        """Figures about the trained adapter (layers by module path) for run.json's `method_report`, JSON-able.
        A `rank_per_layer` entry ({path: rank}) is also drawn as `ranks.png` by the trainers."""
        return {}

    @classmethod
    def regularization(cls, layers: Iterable[AdapterLayer]) -> torch.Tensor | None:
        """An extra loss term (AdaLoRA's orthogonality penalty); None when the method has none."""
        return None

    # --- persistence of the step counter in model.state_dict(), so accelerate checkpoints carry it ----
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.step, dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.step = int(state)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, multiplier={self.multiplier:g}, enabled={self.enabled}"


def per_row(vector: torch.Tensor, kind: LayerKind) -> torch.Tensor:
    """A per-output-row vector shaped (d_out, 1[, 1, 1]), always 2-D or more: ComfyUI broadcasts a 1-D
    `dora_scale` (N,) into an N×N outer product."""
    return vector.reshape(-1, *[1] * (kind.base.weight.dim() - 1)).contiguous()


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """PEFT's default init for the down factor: Kaiming-uniform with a=sqrt(5), fan_in from dim 1 onward."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def init_down_(t: torch.Tensor, config: AdapterConfig) -> torch.Tensor:
    """LoRA's down factor: Kaiming-uniform (PEFT) or N(0, 1/r²) (`gaussian`, diffusers' DreamBooth script)."""
    if config.init == "gaussian":
        return nn.init.normal_(t, std=1.0 / config.rank)
    return kaiming_(t)
