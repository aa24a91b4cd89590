"""What the code needs from diffusers/transformers matches the floors pyproject declares, and it speaks to the
installed release in its own terms (`make floors` runs the interop tests at those floors)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from packaging.version import Version

from pipelines.diffusion.models import diffusers_dtype_kwargs
from pipelines.diffusion.sample import load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def declared_floor(package: str) -> Version:
    found = re.search(rf'"{re.escape(package)}\s*>=\s*([0-9][0-9.]*)"', (ROOT / "pyproject.toml").read_text())
    assert found, f"{package} has no >= floor in pyproject.toml"
    return Version(found.group(1))


def test_diffusers_floor_has_the_lora_metadata_argument():
    # pipelines.diffusion.export passes `unet_lora_adapter_metadata` to save_lora_weights: diffusers 0.34.0 and later
    assert declared_floor("diffusers") >= Version("0.34.0")


def test_load_pipeline_uses_the_dtype_argument_the_installed_diffusers_takes(tiny_model_dir):
    import diffusers

    kwargs = diffusers_dtype_kwargs(torch.bfloat16)
    new_api = Version(diffusers.__version__) >= Version("0.40.0")
    assert kwargs == ({"dtype": torch.bfloat16} if new_api else {"torch_dtype": torch.bfloat16})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(str(tiny_model_dir), "cpu", torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
