"""`AdapterConfig`: what to attach, where, and with which method options.

Validation happens in `__post_init__` so a bad value fails where the user wrote it, with the field named.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

SD_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class AdapterConfig:
    method: str = "lora"
    """Registered method name: `lora`, `loraplus`, `dora` or `singlora`."""

    rank: int = 4
    """Rank r of the update. Must not exceed min(d_in, d_out) of any matched layer."""

    alpha: float | None = None
    """Scale numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rsLoRA). None means alpha = rank."""

    target_modules: list[str] | str = field(default_factory=lambda: list(SD_ATTENTION))
    """PEFT convention: a list of names matched as `name == p or name.endswith('.' + p)`, or one string
    matched as a full regular expression. The default selects Stable Diffusion attention projections."""

    exclude_modules: list[str] | str = field(default_factory=list)
    """Same matching rules as `target_modules`; a module matching both is left alone."""

    dropout: float = 0.0
    """Dropout on the adapter's input (PEFT's `lora_dropout`)."""

    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)."""

    init: str | None = None
    """Init of the trainable factors; None means the method's own default (the first of its `inits`).
    LoRA, LoRA+, DoRA: `kaiming` (Kaiming-uniform of A, a=sqrt(5), as PEFT; the default) or `gaussian`
    (N(0, 1/r^2), as diffusers' DreamBooth script). SingLoRA: `scaled` (the default: entries of order
    (d_in·d_out)^-1/4, see `dreamlora.methods.singlora`) or `kaiming` (the third-party reference init)."""

    loraplus_ratio: float = 16.0
    """LoRA+: the up factor B trains at lr * ratio (Hayou et al. 2024 recommend 2^4)."""

    loraplus_lr_embedding: float = 1e-6
    """LoRA+: absolute learning rate of adapters on embedding layers, as PEFT's `loraplus_lr_embedding`."""

    singlora_ramp_steps: int = 100
    """SingLoRA: T in u(t) = min(t/T, 1), t counted in optimizer steps. 0 turns the ramp off (u = 1)."""

    def __post_init__(self) -> None:
        from dreamlora.methods import METHODS  # late import: methods import this module

        if self.method not in METHODS:
            raise ValueError(
                f"AdapterConfig.method: unknown method {self.method!r}; known: {', '.join(sorted(METHODS))}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"AdapterConfig.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"AdapterConfig.alpha must be a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if not self.target_modules:
            raise ValueError("AdapterConfig.target_modules is empty: name at least one module pattern")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")
        inits = METHODS[self.method].inits
        if self.init is None:
            self.init = inits[0]
        if self.init not in inits:
            raise ValueError(
                f"AdapterConfig.init: {self.init!r} is not an init of {self.method}; choose from {', '.join(inits)}"
            )
        if not self.loraplus_ratio > 0:
            raise ValueError(f"AdapterConfig.loraplus_ratio must be > 0, got {self.loraplus_ratio!r}")
        if not self.loraplus_lr_embedding >= 0:
            raise ValueError(
                f"AdapterConfig.loraplus_lr_embedding must be >= 0, got {self.loraplus_lr_embedding!r}"
            )
        if isinstance(self.singlora_ramp_steps, bool) or not isinstance(self.singlora_ramp_steps, int) or (
            self.singlora_ramp_steps < 0
        ):
            raise ValueError(
                f"AdapterConfig.singlora_ramp_steps must be an integer >= 0, got {self.singlora_ramp_steps!r}"
            )

    @property
    def scaling(self) -> float:
        """s in ΔW = s·(...): alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"adapter config has unknown fields {unknown}; written by a newer dreamlora?")
        return cls(**_legacy_init(data))


def _legacy_init(data: dict) -> dict:
    """Files written before per-method inits may name an init their method no longer takes (train.py stored
    `gaussian` for SingLoRA). The init only shapes freshly created weights, and a loaded file overwrites them,
    so such a value falls back to the method's default instead of refusing a good file."""
    from dreamlora.methods import METHODS

    cls = METHODS.get(data.get("method", "lora"))
    if cls is not None and data.get("init") is not None and data["init"] not in cls.inits:
        return {**data, "init": None}
    return data
