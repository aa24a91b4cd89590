"""A trainer's flags from its groups of typed dataclasses (litgpt's `args.py` style), plus `--config FILE`.

Each group is a dataclass: a field is a flag of the same name, its docstring the --help text, and its
`__post_init__` checks it (raising `ArgError` that names the flag) and normalises it (comma lists become lists).
`dreamlora/options.py` turns each field into an argparse argument; this module assembles the parser, reads the
config file and runs the checks. Parsing returns a flat `argparse.Namespace` (`args.rank`), as the trainers, the
app and the run summaries (`vars(args)`) read it. Standard library only (PyYAML is imported for a YAML file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dreamlora.errors import ArgError
from dreamlora.options import add_flag, flag_specs

CONFIG_HELP = "YAML or JSON file of flag values (keys as the flags, without --); the command line wins"


def make_parser(prog: str, description: str, groups: Sequence[type]) -> argparse.ArgumentParser:
    """`--config` and one argument group per dataclass in `groups`, titled by its `title`. A group may add flags
    that are not its fields (the methods' options) with a `more_flags(group)` classmethod."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=CONFIG_HELP)
    for cls in groups:
        group = parser.add_argument_group(cls.title)
        for spec in flag_specs(cls):
            add_flag(group, spec)
        if hasattr(cls, "more_flags"):
            cls.more_flags(group)
    return parser


def parse(parser: argparse.ArgumentParser, groups: Sequence[type], argv: list[str] | None,
          check: Callable[[argparse.Namespace], None]) -> argparse.Namespace:
    """Flags, with `--config FILE` values as defaults (the command line wins); then each group's own checks
    (its dataclass built from the values, whose normalised values replace them), then `check(args)` for what
    spans groups."""
    first, _ = parser.parse_known_args(argv)
    if first.config:
        values = read_config_file(first.config)
        check_config_keys(parser, first.config, values)
        parser.set_defaults(**values)  # file values become defaults, so the command line still wins
    args = parser.parse_args(argv)
    for cls in groups:
        checked = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        vars(args).update(dataclasses.asdict(checked))
    check(args)
    return args


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ArgError(f"--config {path!r} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise ArgError(f"--config {path!r} could not be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ArgError(f"--config {path!r} must hold a mapping of flag names to values")
    return data


def check_config_keys(parser: argparse.ArgumentParser, path: str, values: dict[str, Any]) -> None:
    """Every key is a flag, and a flag with choices gets one of them: argparse checks neither for defaults."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ArgError(f"--config {path!r}: unknown keys {unknown}")
    for key, value in values.items():
        choices = actions[key].choices
        if choices is not None and value not in choices:
            raise ArgError(f"--config {path!r}: {key} must be one of {list(choices)}, got {value!r}")


def require_positive(group: Any, *names: str) -> None:
    """Each named field of `group` is None (not given) or > 0."""
    for name in names:
        value = getattr(group, name)
        if value is not None and value <= 0:
            raise ArgError(f"--{name} must be > 0, got {value}")


def require_given(group: Any, *names: str) -> None:
    for name in names:
        if not getattr(group, name):
            raise ArgError(f"--{name} is required")
