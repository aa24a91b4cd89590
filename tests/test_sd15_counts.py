"""Exact trainable-parameter counts on the SD 1.5 UNet (built on the meta device: shapes only)."""

import copy

import pytest

import dreamlora
from dreamlora import AdapterConfig, attach
from pipelines.diffusion.sd_configs import build_sd15_unet


@pytest.fixture(scope="module")
def unet():
    return build_sd15_unet("meta")


def count(unet, method, rank=4):
    model = attach(copy.deepcopy(unet), AdapterConfig(method=method, rank=rank))
    return dreamlora.trainable_parameter_count(model), dreamlora.adapter_layers(model, "default")


def test_attention_targets_are_the_128_projections(unet):
    _, layers = count(unet, "lora")
    assert len(layers) == 128
    assert all(path.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for path in layers)


@pytest.mark.parametrize(("method", "rank", "expected"), [
    ("lora", 4, 797_184), ("lora", 8, 1_594_368), ("lora", 16, 3_188_736),
    ("loraplus", 4, 797_184), ("singlora", 4, 422_400), ("singlora", 16, 1_689_600),
])
def test_published_counts(unet, method, rank, expected):
    assert count(unet, method, rank)[0] == expected


def test_dora_adds_one_magnitude_per_output_unit(unet):
    lora, layers = count(unet, "lora")
    dora, _ = count(unet, "dora")
    sum_d_out = sum(layer.kind.d_out for layer in layers.values())
    assert sum_d_out == 99_840
    assert dora == lora + sum_d_out
