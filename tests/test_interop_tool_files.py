"""The trainer writes, by default, a file for every tool it can serve, and says in run.json which one each reads."""

from __future__ import annotations

import json

import pytest
from conftest import randomize_adapters, tiny_unet
from safetensors.torch import load_file
from train_helpers import run_train

from dreamlora import AdapterConfig, attach
from pipelines.diffusion import export

SHORT = ("--rank", 2, "--max_train_steps", 1, "--checkpointing_steps", 100, "--train_text_encoder")


def run_json(out) -> dict:
    return json.loads((out / "run.json").read_text())


def test_kohya_file_is_written_by_default_and_the_old_flag_still_parses(tiny_model_dir, tmp_path):
    # --output_kohya_format, as configs written before it became the default still pass it: a no-op
    done = run_train(tiny_model_dir, tmp_path, "--adapter", "lora", "--output_kohya_format", *SHORT)
    assert "--output_kohya_format is deprecated" in done.stderr
    files = run_json(tmp_path)["files_for_tools"]
    assert files == {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "kohya_lora.safetensors",
                     "lycoris": "kohya_lora.safetensors", "comfyui": "kohya_lora.safetensors",
                     "a1111": "kohya_lora.safetensors"}
    kohya = load_file(tmp_path / "kohya_lora.safetensors")
    assert any(k.startswith("lora_unet_") for k in kohya) and any(k.startswith("lora_te_text_model_") for k in kohya)
    assert not (tmp_path / "comfyui_lora.safetensors").exists()  # LoRA: ComfyUI reads the kohya file


def test_no_kohya_format_opts_out(tiny_model_dir, tmp_path):
    run_train(tiny_model_dir, tmp_path, "--no_kohya_format", *SHORT)
    assert not (tmp_path / "kohya_lora.safetensors").exists()
    assert run_json(tmp_path)["files_for_tools"] == {"diffusers": "pytorch_lora_weights.safetensors", "kohya": None,
                                                     "lycoris": None, "comfyui": None, "a1111": None}


@pytest.mark.parametrize("method", ["dora", "singlora"])
def test_dora_gets_a_comfyui_file_and_no_a1111_file(method, tmp_path):
    unet = attach(tiny_unet(), AdapterConfig(method=method, rank=2, target_modules=["to_q", "conv1"]))
    randomize_adapters(unet)
    files = export.write_tool_files(tmp_path, unet)
    is_dora = method == "dora"
    assert files["comfyui"] == ("comfyui_lora.safetensors" if is_dora else "kohya_lora.safetensors")
    assert files["a1111"] == (None if is_dora else "kohya_lora.safetensors")  # README: A1111 DoRA unsupported
    assert (tmp_path / "comfyui_lora.safetensors").is_file() == is_dora
    if is_dora:
        kohya, comfy = load_file(tmp_path / "kohya_lora.safetensors"), load_file(tmp_path / files["comfyui"])
        assert kohya.keys() == comfy.keys()
        scales = [k for k in kohya if k.endswith(".dora_scale")]
        assert scales and all(not kohya[k].equal(comfy[k]) for k in scales)  # compensated for ComfyUI's rule
