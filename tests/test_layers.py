"""The import-linter contracts (pyproject.toml) name dreamlora's modules one by one, because a contract cannot say
"dreamlora minus its commands". This keeps that list whole: every module of the package is either a command (top
layer) or core (torch, safetensors and the standard library only), and each contract lists all of its side, so a
new module cannot slip past `lint-imports`. `import dreamlora` itself is checked at run time in
test_method_registry.py (`test_import_dreamlora_loads_nothing_beyond_torch_and_safetensors`)."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest

import dreamlora

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"dreamlora.train", "dreamlora.train_text", "dreamlora.tiny", "dreamlora.train_args",
            "dreamlora.train_text_args", "dreamlora.flags"}


def contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def dreamlora_modules() -> set[str]:
    """The package's top-level modules and subpackages (a subpackage such as `methods` counts with its children)."""
    return {f"dreamlora.{m.name}" for m in pkgutil.iter_modules(dreamlora.__path__)}


def test_every_dreamlora_module_is_core_or_a_command_and_the_contracts_list_each():
    core_contract = contracts()["The core imports torch, safetensors and the standard library only"]
    top_contract = contracts()["The commands are the top: nothing imports dreamlora's training entry points"]
    core = set(core_contract["source_modules"])
    assert dreamlora_modules() == core | COMMANDS, "a dreamlora module is in neither list: add it to one"
    assert not core & COMMANDS
    assert COMMANDS <= set(core_contract["forbidden_modules"])
    assert COMMANDS == set(top_contract["forbidden_modules"])
