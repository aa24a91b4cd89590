"""A method is one file: a module dropped into `dreamlora/methods/` (or an entry point of another package) is
registered, trains in both trainers with its own option flags and shows in the app, with no other file edited.
Also: plugins load lazily and fail one by one, `import dreamlora` stays torch-only, options are generated into
flags, files written before methods owned their options still load, and the README's method table is the
registry's."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from text_helpers import SST2_TRAIN, build_tiny_text_model
from torch import nn
from train_helpers import INSTANCE_DIR, PROMPT

import dreamlora
from dreamlora import AdapterConfig
from dreamlora.errors import ArgError
from dreamlora.methods import METHODS
from dreamlora.options import option_specs
from dreamlora.train_args import parse_args

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets" / "adapters_v0"

# A throwaway method: LoRA with its update multiplied by an option of its own. The same text serves as a file in
# the package folder and as a plugin module; only the registration line differs.
THROWAWAY = '''
"""{name} (a test's throwaway method): LoRA with its update multiplied by `gain`."""

from dataclasses import dataclass

from dreamlora.methods.base import register
from dreamlora.methods.lora import LoRA
from dreamlora.options import MethodOptions


@dataclass
class GainOptions(MethodOptions):
    gain: float = 0.5
    """Multiplier of the LoRA update."""

    def __post_init__(self):
        if not self.gain > 0:
            raise ValueError(f"{name}_gain must be > 0, got {{self.gain}}")


{decorator}
class GainLoRA(LoRA):
    method = "{name}"
    description = "GainLoRA: LoRA times a gain"
    Options = GainOptions

    def __init__(self, kind, config):
        super().__init__(kind, config)
        self.scaling = config.scaling * config.options.gain
'''


def run(cmd: list[str], cwd: Path, pythonpath: list[Path], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def stored_config(file: Path) -> dict:
    with safe_open(str(file), framework="pt") as f:
        return json.loads(f.metadata()["config"])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return build_tiny_text_model("bert", tmp_path_factory.mktemp("bert") / "bert")


# --- one file in the package folder ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    """A copy of the repository with one new file, `dreamlora/methods/gainlora.py`, and nothing else changed."""
    root = tmp_path_factory.mktemp("copy") / "repo"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "artifacts"))
    (root / "dreamlora" / "methods" / "gainlora.py").write_text(
        THROWAWAY.format(name="gainlora", decorator="@register").lstrip(), encoding="utf-8")
    return root


def test_a_dropped_in_module_trains_with_train_py_and_its_own_flag(package_copy, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run([sys.executable, str(package_copy / "dreamlora" / "train.py"), "--adapter", "gainlora", "--gainlora_gain",
         "0.25", "--pretrained_model_name_or_path", str(tiny_model_dir), "--instance_data_dir", str(INSTANCE_DIR),
         "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", "64", "--center_crop",
         "--max_train_steps", "2", "--checkpointing_steps", "100", "--report_to", "none", "--no_kohya_format"],
        package_copy, [package_copy])
    summary = json.loads((out / "run.json").read_text())
    assert summary["method"] == "gainlora" and summary["steps"] == 2 and summary["args"]["gainlora_gain"] == 0.25
    config = stored_config(out / "unet_adapter.safetensors")
    assert config["method"] == "gainlora" and config["options"] == {"gain": 0.25}
    b = [v for k, v in load_file(out / "unet_adapter.safetensors").items() if k.endswith("lora_B.weight")]
    assert b and any(t.abs().max() > 0 for t in b)  # it trained: B moved off its zero init


def test_a_dropped_in_module_trains_with_train_text_py(package_copy, tiny_bert, tmp_path):
    out = tmp_path / "run"
    run([sys.executable, str(package_copy / "dreamlora" / "train_text.py"), "--adapter", "gainlora",
         "--model_name_or_path", str(tiny_bert), "--train_file", str(SST2_TRAIN), "--max_train_steps", "2",
         "--per_device_train_batch_size", "4", "--max_length", "24", "--max_train_samples", "16",
         "--report_to", "none", "--output_dir", str(out)], package_copy, [package_copy])
    summary = json.loads((out / "run.json").read_text())
    assert summary["method"] == "gainlora" and summary["finished"]
    assert summary["adapter_config"]["options"] == {"gain": 0.5}  # the option's own default


def test_a_dropped_in_module_is_in_the_apps_method_list(package_copy):
    probe = textwrap.dedent("""
        import json, app
        from app_backend.settings import TrainSettings
        settings = TrainSettings(name="r", base_model="tiny", method="gainlora",
                                 method_options={"gainlora_gain": "0.75", "singlora_ramp_steps": "3"}).validate()
        print(json.dumps({"choices": app.method_choices(), "fields": app.option_flags(),
                          "argv": settings.argv(__import__("pathlib").Path("r"))}))
    """)
    found = json.loads(run([sys.executable, "-c", probe], package_copy, [package_copy]).stdout.splitlines()[-1])
    assert ["GainLoRA: LoRA times a gain", "gainlora"] in found["choices"]
    assert "gainlora_gain" in found["fields"]
    argv = found["argv"]
    assert argv[argv.index("--gainlora_gain") + 1] == "0.75" and "--singlora_ramp_steps" not in argv


# --- one entry point in another package ------------------------------------------------------------------------
def write_plugins(folder: Path) -> Path:
    """An installed-looking distribution (a .dist-info with entry_points.txt) holding one good and one broken
    method plugin."""
    folder.mkdir(parents=True)
    (folder / "eplora_plugin.py").write_text(THROWAWAY.format(name="eplora", decorator=""), encoding="utf-8")
    (folder / "broken_plugin.py").write_text("raise ImportError('this plugin is broken on purpose')\n",
                                             encoding="utf-8")
    info = folder / "dreamlora_test_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dreamlora-test-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[dreamlora.methods]\nbroken = broken_plugin:Nothing\neplora = eplora_plugin:GainLoRA\n")
    return folder


def test_entry_point_plugins_load_lazily_and_fail_one_by_one(tmp_path):
    plugins = write_plugins(tmp_path / "site")
    probe = textwrap.dedent("""
        import json, sys, warnings
        import dreamlora
        at_import = "eplora_plugin" in sys.modules
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = list(dreamlora.METHODS)
        print(json.dumps({"at_import": at_import, "names": names, "warnings": [str(w.message) for w in caught]}))
    """)
    found = json.loads(run([sys.executable, "-c", probe], ROOT, [plugins, ROOT]).stdout.splitlines()[-1])
    assert found["at_import"] is False  # never read at `import dreamlora`
    assert found["names"] == [*METHODS, "eplora"]  # the broken one took nothing else down
    assert len(found["warnings"]) == 1 and "'broken'" in found["warnings"][0]
    assert "broken on purpose" in found["warnings"][0]


def test_an_entry_point_plugin_trains_with_its_flag(tmp_path, tiny_bert):
    plugins, out = write_plugins(tmp_path / "site"), tmp_path / "run"
    run([sys.executable, str(ROOT / "dreamlora" / "train_text.py"), "--adapter", "eplora", "--eplora_gain", "2",
         "--model_name_or_path", str(tiny_bert), "--train_file", str(SST2_TRAIN), "--max_train_steps", "1",
         "--per_device_train_batch_size", "4", "--max_length", "24", "--max_train_samples", "8",
         "--report_to", "none", "--output_dir", str(out)], ROOT, [plugins, ROOT])
    assert json.loads((out / "run.json").read_text())["adapter_config"]["options"] == {"gain": 2.0}


def test_import_dreamlora_loads_nothing_beyond_torch_and_safetensors():
    probe = textwrap.dedent("""
        import sys
        import safetensors.torch, torch
        before = {m.split(".")[0] for m in sys.modules}
        import dreamlora
        print(sorted({m.split(".")[0] for m in sys.modules} - before))
    """)
    assert run([sys.executable, "-c", probe], ROOT, [ROOT]).stdout.split() == ["['dreamlora']"]


# --- options as flags ----------------------------------------------------------------------------------------
def required_flags(tmp_path) -> list[str]:
    return ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p",
            "--output_dir", str(tmp_path)]


def test_option_flags_come_from_the_dataclasses_with_their_docstrings(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in METHODS.values():
        assert cls.description and cls.description in text
        for spec in option_specs(cls):
            assert f"--{spec.flag}" in text and spec.help and spec.help[:40] in text
    args = parse_args([*required_flags(tmp_path), "--adapter", "loraplus", "--loraplus_ratio", "4"])
    assert args.loraplus_ratio == 4.0 and args.singlora_ramp_steps is None  # None: not given


@pytest.mark.parametrize(("flags", "message"), [
    (["--adapter", "singlora", "--singlora_ramp_steps", "-1"], "singlora_ramp_steps must be an integer >= 0"),
    (["--adapter", "loraplus", "--loraplus_lr_embedding=-1e-3"], "loraplus_lr_embedding must be >= 0"),
])
def test_a_bad_option_fails_at_parse_time_naming_its_flag(tmp_path, flags, message):
    with pytest.raises(ArgError, match=message):
        parse_args([*required_flags(tmp_path), *flags])


def test_another_methods_option_flag_is_ignored(tmp_path):
    """A sweep passes one set of flags to every method: `--singlora_ramp_steps` does not disturb LoRA."""
    args = parse_args([*required_flags(tmp_path), "--adapter", "lora", "--singlora_ramp_steps", "-1"])
    assert args.adapter == "lora"


# --- files written before methods owned their options --------------------------------------------------------
@pytest.mark.parametrize(("method", "options"), [("singlora", {"ramp_steps": 7}),
                                                  ("loraplus", {"ratio": 4.0, "lr_embedding": 1e-5})])
def test_files_with_flat_option_fields_still_load(method, options):
    """tests/assets/adapters_v0 was written by the code before this change: every method's options as flat
    `loraplus_*`/`singlora_*` fields in the metadata."""
    file = ASSETS / f"{method}.safetensors"
    flat = stored_config(file)
    assert "options" not in flat and "singlora_ramp_steps" in flat and "loraplus_ratio" in flat
    model = dreamlora.load(nn.Sequential(nn.Linear(6, 4)), file)
    config = dreamlora.adapter_config(model, "default")
    assert config.method == method and vars(config.options) == options
    layer = dreamlora.adapter_layers(model, "default")["0"]
    tensors = load_file(file)
    for attr in type(layer).file_keys:
        assert torch.equal(getattr(layer, attr).detach(), tensors[f"0.{layer.file_key(attr)}"])
    assert layer.step == 3
    assert AdapterConfig.from_json(config.to_json()) == config  # and it is written back in the new form


# --- the README's method table is the registry's -------------------------------------------------------------
def method_rows(unet) -> list[str]:
    from test_sd15_counts import count

    rows = ["| method | in the app | what it is | options (flag: default) | params, SD 1.5 attention, r = 4 |",
            "|---|---|---|---|---:|"]
    for name, cls in METHODS.items():
        summary = inspect.getmodule(cls).__doc__.strip().splitlines()[0]
        options = "; ".join(f"`--{s.flag}`: {s.trainer_default}" for s in option_specs(cls)) or "–"
        rows.append(f"| `{name}` | {cls.description} | {summary} | {options} | {count(unet, name)[0]:,} |")
    return rows


def test_readme_method_table_is_the_registrys():
    from pipelines.diffusion.sd_configs import build_sd15_unet

    expected = "\n".join(method_rows(build_sd15_unet("meta")))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- methods: begin[^\n]*-->\n(.*?)\n<!-- methods: end -->", readme, re.S)
    assert found, "README.md lacks the <!-- methods: begin/end --> markers"
    assert found.group(1) == expected, f"README.md's method table is out of date; it should read:\n{expected}"
