"""The trainer writes, by default, a file for every tool it can serve, and says in run.json which one each reads."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from train_helpers import run_train

SHORT = ("--rank", 2, "--max_train_steps", 1, "--checkpointing_steps", 100, "--train_text_encoder")


def run_json(out) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_kohya_and_comfyui_files_are_written_by_default(method, tiny_model_dir, tmp_path):
    run_train(tiny_model_dir, tmp_path, "--adapter", method, *SHORT)
    files = run_json(tmp_path)["files_for_tools"]
    comfy = "comfyui_lora.safetensors" if method == "dora" else "kohya_lora.safetensors"
    assert files == {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "kohya_lora.safetensors",
                     "lycoris": "kohya_lora.safetensors", "comfyui": comfy,
                     "a1111": None if method == "dora" else "kohya_lora.safetensors"}
    for name in set(files.values()) - {None}:
        keys = load_file(tmp_path / name)
        assert keys
    kohya = load_file(tmp_path / "kohya_lora.safetensors")
    assert any(k.startswith("lora_unet_") for k in kohya) and any(k.startswith("lora_te_text_model_") for k in kohya)
    assert (tmp_path / "comfyui_lora.safetensors").is_file() == (method == "dora")


def test_no_kohya_format_opts_out_and_the_old_flag_still_parses(tiny_model_dir, tmp_path):
    run_train(tiny_model_dir, tmp_path / "off", "--no_kohya_format", *SHORT)
    assert not (tmp_path / "off" / "kohya_lora.safetensors").exists()
    assert run_json(tmp_path / "off")["files_for_tools"]["comfyui"] is None
    old = run_train(tiny_model_dir, tmp_path / "old", "--output_kohya_format", *SHORT)  # configs written before
    assert (tmp_path / "old" / "kohya_lora.safetensors").is_file()
    assert "--output_kohya_format is deprecated" in old.stderr
