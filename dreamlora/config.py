"""`AdapterConfig`: what to attach, where, and with which method options.

Validation happens in `__post_init__` so a bad value fails where the user wrote it, with the field named.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SD_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class AdapterConfig:
    method: str = "lora"
    """Registered method name (`dreamlora.METHODS`): `lora`, `loraplus`, `dora`, `singlora`, `loha`, `lokr`, or a
    plugin's."""

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
    """Init of the trainable factors; None means the method's own default, the first of its class's `inits`
    (each method's docstring says what they draw). E.g. LoRA, LoRA+, DoRA: `kaiming` (Kaiming-uniform of A,
    a=sqrt(5), as PEFT; the default) or `gaussian` (N(0, 1/r^2), as diffusers' DreamBooth script); SingLoRA:
    `scaled` (the default: entries of order (d_in·d_out)^-1/4) or `kaiming` (the third-party reference init);
    LoHa: `lycoris`; LoKr: `kaiming` (LyCORIS's inits)."""

    options: Any = None
    """The method's own options: an instance of its `Options` dataclass (e.g. `SingLoRAOptions(ramp_steps=10)`),
    a dict of its fields (`{"ramp_steps": 10}`), or None for its defaults. Stored as a dict in adapter files."""

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
        self.options = _method_options(METHODS[self.method], self.options)
        self.options.check(self, None)

    @property
    def scaling(self) -> float:
        """s in ΔW = s·(...): alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        data = _legacy_options(_legacy_init(json.loads(text)))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"adapter config has unknown fields {unknown}; written by a newer dreamlora?")
        return cls(**data)


def _method_options(method_cls, options):
    """`options` as an instance of the method's own dataclass; its `__post_init__` checks the values."""
    kind = method_cls.Options
    if options is None:
        return kind()
    if isinstance(options, dict):
        names = {f.name for f in fields(kind)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"AdapterConfig.options: {method_cls.method} has no options {unknown}; "
                             f"its options are {sorted(names) or 'none'}")
        return kind(**options)
    if type(options) is not kind:
        raise ValueError(f"AdapterConfig.options: {method_cls.method} takes {kind.__name__}, "
                         f"got {type(options).__name__}")
    return options


def _legacy_init(data: dict) -> dict:
    """Files written before per-method inits may name an init their method no longer takes (train.py stored
    `gaussian` for SingLoRA). The init only shapes freshly created weights, and a loaded file overwrites them,
    so such a value falls back to the method's default instead of refusing a good file."""
    from dreamlora.methods import METHODS

    cls = METHODS.get(data.get("method", "lora"))
    if cls is not None and data.get("init") is not None and data["init"] not in cls.inits:
        return {**data, "init": None}
    return data


def _legacy_options(data: dict) -> dict:
    """Files written before methods owned their options hold every method's options as flat fields named as
    their flags (`loraplus_ratio`, `singlora_ramp_steps`). The file's own method's move into `options`; the
    other methods' are dropped (they never applied to this adapter)."""
    from dreamlora.methods import METHODS
    from dreamlora.options import option_specs, unique_specs

    known = {f.name for f in fields(AdapterConfig)}
    flat = {k: v for k, v in data.items() if k not in known}
    if not flat or "options" in data:
        return data
    every = {s.flag for s in unique_specs(METHODS.values())}
    method = METHODS.get(data.get("method", "lora"))
    own = {s.flag: s.field for s in option_specs(method)} if method is not None else {}
    options = {own[k]: v for k, v in flat.items() if k in own}
    return {**{k: v for k, v in data.items() if k in known or k not in every}, "options": options}
