"""Tiny models built from code; nothing here touches the network."""

from __future__ import annotations

import os
from dataclasses import fields

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dreamlora import AdapterConfig, attach  # noqa: E402
from dreamlora.methods import METHODS  # noqa: E402
from dreamlora.options import given_options  # noqa: E402

METHOD_NAMES = list(METHODS)  # the registry is the only method list
# On the architectures beyond SD 1.x (SDXL, SD 2.x) an every-method test runs these by default: one of each export
# path (plain LoRA factors, DoRA's magnitudes, a LyCORIS type exported as LoRA); SD 1.x's tests run every method, and
# `pytest -m slow` runs the rest here too (the suite's time on 2 cores stays near its budget).
QUICK_METHODS = ("lora", "dora", "lokr")


def method_params(methods=None, quick=QUICK_METHODS) -> list:
    """`methods` (default: every registered one) as pytest parameters, those outside `quick` marked slow."""
    import pytest

    return [m if m in quick else pytest.param(m, marks=pytest.mark.slow) for m in (methods or METHOD_NAMES)]
RUN_STEPS = 120  # the longest loop a core-level test runs (test_training_hooks)


def options_for(method: str, **flags) -> dict:
    """`method`'s options among values named as their flags (`singlora_ramp_steps=10`), by field, as a trainer
    reads them: one set of values serves a test over every method, and a method without them gets none. An
    option a core user must give (no default, set by a trainer from the run: AdaLoRA's total_step) takes its
    value for a run of RUN_STEPS steps unless given."""
    cls = METHODS[method]
    given = given_options(cls, flags)
    defaults = {f.name: f.default for f in fields(cls.Options)}
    run = {k: v for k, v in cls.Options.run_defaults(RUN_STEPS).items() if defaults[k] is None}
    return {**run, **given}


def supports(method: str, kind: str) -> bool:
    """Whether `method` adapts the layer kind `kind` of LAYER_KINDS (AdaLoRA refuses embeddings, as PEFT's
    does; its own test checks the refusal)."""
    try:
        attach(OneLayer(LAYER_KINDS[kind][0]()), AdapterConfig(method=method, rank=1, target_modules=["proj"],
                                                                options=options_for(method)))
    except ValueError:
        return False
    return True


class OneLayer(nn.Module):
    """A model holding a single target layer named `proj`, plus a frozen-by-attach neighbour."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer
        self.norm = nn.Identity()

    def forward(self, x):
        return self.proj(self.norm(x))


# layer kind -> (factory, input factory). d_out>d_in and d_out<d_in Linear are both covered.
LAYER_KINDS = {
    "linear_square": (lambda: nn.Linear(12, 12), lambda: torch.randn(3, 5, 12)),
    "linear_wide": (lambda: nn.Linear(8, 20), lambda: torch.randn(3, 5, 8)),  # d_out > d_in
    "linear_narrow": (lambda: nn.Linear(20, 6), lambda: torch.randn(3, 5, 20)),  # d_out < d_in
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=1), lambda: torch.randn(2, 4, 7, 7)),
    "embedding": (lambda: nn.Embedding(30, 10, padding_idx=0), lambda: torch.randint(0, 30, (3, 5))),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded tiny SD pipeline, written once per test session."""
    from pipelines.diffusion import tiny_model as tiny

    return tiny.write(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """The tiny SDXL pipeline (`--preset sdxl`), written once per test session."""
    from pipelines.diffusion import tiny_model as tiny

    return tiny.write(tmp_path_factory.mktemp("tiny-sdxl") / "model", preset="sdxl")


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """The tiny SD 2.x pipeline (`--preset sd2`: v-prediction, OpenCLIP-style encoder), written once per session."""
    from pipelines.diffusion import tiny_model as tiny

    return tiny.write(tmp_path_factory.mktemp("tiny-sd2") / "model", preset="sd2")


def tiny_unet():
    """A two-level SD-architecture UNet (cross-attention + ResNet convs), random init."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8,
    )


def unet_inputs(batch: int = 1):
    return torch.randn(batch, 4, 8, 8), torch.tensor([10] * batch), torch.randn(batch, 5, 32)


def randomize_adapters(model, name: str = "default", std: float = 0.1) -> None:
    """Move every adapter weight off its init (B = 0 would make most checks trivially true)."""
    import dreamlora

    with torch.no_grad():
        for layer in dreamlora.adapter_layers(model, name).values():
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * std)


@pytest.fixture(scope="session")
def source_runs(tmp_path_factory, tiny_model_dir):
    """Two finished app runs, "dog" and "backpack" (10 steps each on the tiny model), to copy into a test's runs
    folder with `app_server.copy_runs`: the sources of the Compose tests."""
    from app_server import train_source_runs

    return train_source_runs(tmp_path_factory.mktemp("source-runs") / "runs", tiny_model_dir)
