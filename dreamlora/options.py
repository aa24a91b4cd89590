"""A method's own options: a small dataclass in the method's file, a docstring under each field (litgpt's
`args.py` style), checked in its `__post_init__`, stored in the adapter file's metadata (`AdapterConfig.options`).

The code here is the one place that turns dataclasses into command-line flags (`flag_specs`, `add_flag`): a
method's options, and the trainers' own flag groups (`dreamlora/train_args.py`), so a new method never edits a
trainer or the app. A method's flag is named `--<method>_<field>` after the method that declares the options
(`LoRAPlusOptions.ratio` → `--loraplus_ratio`); a subclass method that inherits its parent's options shares its
parent's flags. A trainer's flag is named as its field. Standard library only: the core stays torch-only.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any


@dataclass
class MethodOptions:
    """No options of its own (LoRA, DoRA). A method with options subclasses this dataclass."""

    @classmethod
    def run_defaults(cls, total_steps: int) -> dict[str, Any]:
        """Defaults that depend on the run's length (SingLoRA's ramp: 1 % of the steps), by field name. A
        trainer uses them where the user gave no flag, and a resume keeps the checkpoint's value instead."""
        return {}

    def check(self, config, total_steps: int | None) -> None:
        """Checks that need more than one field: the adapter's `config` (its rank) and, from a trainer, the run's
        number of optimizer steps (None outside one). Raise ValueError whose message starts with the flag, e.g.
        `--relora_steps 500 is more than the run's 300 optimizer steps`. Called by `AdapterConfig` and by the
        trainers (which show it as the one error of the run)."""


@dataclass(frozen=True)
class FlagSpec:
    """One dataclass field as a command-line flag."""

    field: str  # the dataclass field: "ratio"
    flag: str  # the flag without "--", also argparse's dest and the key in run.json's args: "loraplus_ratio"
    type: type  # int, float, bool, str, or list (of str, given comma-separated); an `X | None` annotation gives X
    default: Any  # the dataclass default
    help: str  # the field's docstring
    choices: Any = None  # from a `Literal[...]` annotation, or `metadata={"choices": ...}`: values, a mapping of
    # value to description (listed in --help), or a function giving either when the parser is built (a registry)
    default_words: str | None = None  # a None default that the method resolves, in words: `metadata={"default":...}`


@dataclass(frozen=True)
class OptionSpec(FlagSpec):
    """One method option as a flag and an app field sees it."""

    owner: str = ""  # the method that declares it: "loraplus"
    run_dependent: bool = False  # the trainers' default comes from the run (`run_defaults`), not from `default`

    @property
    def trainer_default(self) -> str:
        """The default as a trainer applies it, in words (for --help, the app and the README)."""
        if self.run_dependent:
            return "set by the run"
        return self.default_words if self.default_words is not None else str(self.default)


def flag_specs(cls, prefix: str = "") -> list[FlagSpec]:
    """Every field of the dataclass `cls` as a flag named `prefix + field`, with its docstring as help."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    specs = []
    for f in dataclasses.fields(cls):
        kind, choices = _flag_type(hints[f.name])
        specs.append(FlagSpec(f.name, prefix + f.name, kind, _default(f), docs.get(f.name, ""),
                              f.metadata.get("choices", choices), f.metadata.get("default")))
    return specs


def add_flag(group, spec: FlagSpec, default: Any = dataclasses.MISSING, help: str | None = None) -> None:
    """`spec` as an argparse argument of `group`, default the field's unless given. A bool whose default is False
    is a switch (`--x`); any other bool can be set either way (`--x`/`--no-x`), as None means "not given"."""
    default = spec.default if default is dataclasses.MISSING else default
    kwargs: dict[str, Any] = {"default": default}
    if spec.type is bool:
        kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    else:
        kwargs["type"] = comma_list if spec.type is list else spec.type
    help = spec.help if help is None else help
    choices = spec.choices() if callable(spec.choices) else spec.choices
    if choices:
        kwargs["choices"] = list(choices)
        if isinstance(choices, dict):  # each value with what it means
            help = f"{help}: " + "; ".join(f"{value}: {meaning}" for value, meaning in choices.items())
    group.add_argument(f"--{spec.flag}", help=help.replace("%", "%%") or None, **kwargs)


def comma_list(value: str | list) -> list[str]:
    """`a, b,c` (a flag) or a list (a config file) as a list of non-empty stripped names."""
    return [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]


def options_owner(method_cls) -> str:
    """The registered name of the class in `method_cls`'s MRO that declares its `Options`."""
    for klass in method_cls.__mro__:
        if "Options" in vars(klass):
            return getattr(klass, "method", method_cls.method)  # the base class's empty options: no flags anyway
    return method_cls.method


def option_specs(method_cls) -> list[OptionSpec]:
    owner = options_owner(method_cls)
    run_dependent = method_cls.Options.run_defaults(1)
    specs = []
    for spec in flag_specs(method_cls.Options, prefix=f"{owner}_"):
        if spec.type not in (int, float, bool, str) or spec.choices is not None:
            raise TypeError(f"method options are int, float, bool or str (or X | None); got {spec.field}: "
                            f"{spec.type.__name__}")  # what an app text field and run.json can carry
        specs.append(OptionSpec(**vars(spec), owner=owner, run_dependent=spec.field in run_dependent))
    return specs


def field_docs(cls) -> dict[str, str]:
    """The string literal under each annotated field, read from the source (the convention of AdapterConfig and
    litgpt). Classes without reachable source (built in a REPL) give no docs rather than an error."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError, IndexError, AttributeError, SyntaxError):
            continue
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _flag_type(hint) -> tuple[type, tuple | None]:
    """The flag's type and choices of an annotation: int, float, bool, str, list[str], Literal[...] of one of
    those, each optionally `| None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    if typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
        return list, None
    if hint not in (int, float, bool, str):
        raise TypeError(f"a flag is int, float, bool, str, list[str] or a Literal (or X | None); got {hint!r}")
    return hint, None


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def unique_specs(method_classes) -> list[OptionSpec]:
    """Every method's option specs, each flag once (a method that inherits options shares its parent's flags)."""
    seen: dict[str, OptionSpec] = {}
    for cls in method_classes:
        for spec in option_specs(cls):
            seen.setdefault(spec.flag, spec)
    return list(seen.values())


def add_option_flags(group, method_classes) -> None:
    """One flag per option. Its default is None ("not given"), so a trainer can tell a value the user chose
    from the method's default or the run's (`run_defaults`)."""
    for spec in unique_specs(method_classes):
        add_flag(group, spec, default=None,
                 help=f"{spec.owner} only: {spec.help} (default: {spec.trainer_default})")


def given_options(method_cls, values: dict[str, Any]) -> dict[str, Any]:
    """The options of `method_cls` present (not None) in `values`, a mapping of flag names (argparse's dest,
    run.json's args) to values, by field name. Other methods' flags are ignored: a sweep passes one set to all."""
    return {s.field: values[s.flag] for s in option_specs(method_cls) if values.get(s.flag) is not None}


def parse_option(spec: OptionSpec, text: str) -> Any:
    """A value typed into an app field (text) as the option's type; '' means not given (None)."""
    text = str(text).strip()
    if text == "":
        return None
    if spec.type is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{spec.flag}: true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    try:
        return spec.type(float(text)) if spec.type is int and float(text).is_integer() else spec.type(text)
    except ValueError:
        raise ValueError(f"{spec.flag}: a{'n' if spec.type is int else ''} {spec.type.__name__}, "
                         f"got {text!r}") from None
