"""SingLoRA's init keeps ΔW at the scale of a learned update, whatever the layer's width (issue #10, item 2).

With the third-party init (Kaiming on the (n, r) tensor, fan_in = r) the full-ramp update grows linearly with
the width and is larger than the pretrained weight it adapts; the `scaled` default keeps ‖ΔW‖_F ≈ √r/3 at α = r.
"""

import math

import pytest
import torch
from torch import nn

import dreamlora
from dreamlora import AdapterConfig
from dreamlora.inject import adapter_layers
from dreamlora.train_args import resolve_init


def _full_ramp_delta(base: nn.Module, rank: int = 8, init: str | None = None) -> torch.Tensor:
    model = nn.Sequential(base)
    dreamlora.attach(model, AdapterConfig(method="singlora", rank=rank, alpha=rank, target_modules=["0"],
                                          init=init, options={"ramp_steps": 10}))
    (layer,) = adapter_layers(model, "default").values()
    layer.step = layer.ramp_steps  # u(t) = 1: the update at the end of the ramp
    return layer.delta_weight()


@pytest.mark.parametrize("shape", [(256, 256), (1024, 1024), (4096, 4096), (384, 1536), (1536, 384), (320, 2560)])
def test_delta_norm_is_width_independent(shape):
    torch.manual_seed(0)
    d_in, d_out = shape
    norm = _full_ramp_delta(nn.Linear(d_in, d_out, bias=False)).norm().item()
    expected = math.sqrt(8) / 3  # √r/3 at α = r, see the singlora docstring
    assert 0.75 * expected < norm < 1.25 * expected, (shape, norm)


def test_conv2d_uses_the_flattened_fan():
    torch.manual_seed(0)
    norm = _full_ramp_delta(nn.Conv2d(320, 640, 3, padding=1)).norm().item()  # d_in = 320·3·3
    assert 0.75 * math.sqrt(8) / 3 < norm < 1.25 * math.sqrt(8) / 3, norm


def test_reference_init_stays_reachable_and_grows_with_width():
    torch.manual_seed(0)
    small = _full_ramp_delta(nn.Linear(256, 256, bias=False), init="kaiming").norm().item()
    large = _full_ramp_delta(nn.Linear(2048, 2048, bias=False), init="kaiming").norm().item()
    assert large / small > 6  # ≈ d/(3√r): linear in the width (8× here)


def test_minilm_query_value_update_is_small_against_the_pretrained_weight():
    from pipelines.text import models as text_models

    path = text_models.resolve_model_path("minilm")
    model, _ = text_models.load_classifier(path, ["neg", "pos"], False)
    torch.manual_seed(0)
    dreamlora.attach(model, AdapterConfig(method="singlora", rank=8, alpha=8, target_modules=["query", "value"],
                                          options={"ramp_steps": 10}))
    layers = adapter_layers(model, "default")
    assert len(layers) == 12  # 6 blocks × (query, value)
    for name, layer in layers.items():
        layer.step = layer.ramp_steps
        ratio = (layer.delta_weight().norm() / layer.kind.weight_matrix().float().norm()).item()
        assert ratio < 0.1, (name, ratio)


def test_inits_are_per_method():
    assert AdapterConfig(method="singlora").init == "scaled"
    assert AdapterConfig(method="lora").init == "kaiming"
    with pytest.raises(ValueError, match="init.*singlora.*scaled"):
        AdapterConfig(method="singlora", init="gaussian")
    # train.py prefers diffusers' gaussian, but only for methods that have it
    assert resolve_init("lora", None, "gaussian") == "gaussian"
    assert resolve_init("singlora", None, "gaussian") is None
    assert resolve_init("singlora", "kaiming", "gaussian") == "kaiming"


def test_files_that_recorded_gaussian_for_singlora_still_load():
    old = AdapterConfig(method="lora").to_json().replace('"lora"', '"singlora"').replace('"kaiming"', '"gaussian"')
    assert AdapterConfig.from_json(old).init == "scaled"
