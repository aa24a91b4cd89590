"""Several named adapters on one model: scales, enable/disable, partial merge, detach, steps, groups."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import options_for
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 12)
        self.b = nn.Linear(12, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def two_adapters():
    torch.manual_seed(0)
    base = TwoLayers()
    model = attach(copy.deepcopy(base), AdapterConfig(method="lora", rank=2, target_modules=["a", "b"]), "style")
    attach(model, AdapterConfig(method="singlora", rank=3, alpha=2.0, target_modules=["b"],
                                options={"ramp_steps": 0}), "subject")
    for name in ("style", "subject"):
        with torch.no_grad():
            for layer in dreamlora.adapter_layers(model, name).values():
                for p in layer.parameters():
                    p.add_(torch.randn_like(p) * 0.3)
    return base, model


def hand_output(model, x, scale_style=1.0, scale_subject=1.0, use_subject=True):
    """Both adapters written out by hand: W_a + s·B·A on `a`; W_b + s·B·A + s'·A'[:6]·A'[:12]ᵀ on `b`."""
    style = dreamlora.adapter_layers(model, "style")
    sub = dreamlora.adapter_layers(model, "subject")["b"].singlora_A
    wa = model.a.base_layer.weight + scale_style * style["a"].lora_B @ style["a"].lora_A
    wb = model.b.base_layer.weight + scale_style * style["b"].lora_B @ style["b"].lora_A
    if use_subject:
        wb = wb + scale_subject * (2.0 / 3) * sub[:6] @ sub[:12].T
    h = torch.tanh(nn.functional.linear(x, wa, model.a.base_layer.bias))
    return nn.functional.linear(h, wb, model.b.base_layer.bias)


def test_scales_and_enable_disable_follow_the_formula():
    _, model = two_adapters()
    x = torch.randn(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hand_output(model, x))
        dreamlora.set_scale(model, "style", 0.5)
        dreamlora.set_scale(model, "subject", -1.5)
        torch.testing.assert_close(model(x), hand_output(model, x, 0.5, -1.5))
        dreamlora.disable(model, "subject")
        torch.testing.assert_close(model(x), hand_output(model, x, 0.5, use_subject=False))
        dreamlora.enable(model, "subject")
        torch.testing.assert_close(model(x), hand_output(model, x, 0.5, -1.5))


def test_partial_merge_keeps_the_other_adapter_live():
    base, model = two_adapters()
    x = torch.randn(4, 10)
    with torch.no_grad():
        expected = model(x)
        dreamlora.merge(model, ["style"])
        assert dreamlora.adapter_names(model) == ["subject"]
        assert isinstance(model.a, nn.Linear)  # `a` held only `style`: its original module is back
        assert not torch.equal(model.a.weight, base.a.weight)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        dreamlora.merge(model)
        assert dreamlora.adapter_names(model) == [] and isinstance(model.b, nn.Linear)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match=r"cannot merge unknown adapters \['style'\]"):
        dreamlora.merge(model, ["style"])


def test_detach_restores_the_original_modules():
    base, model = two_adapters()
    dreamlora.detach(model, "subject")
    dreamlora.detach(model, "style")
    assert [n for n, _ in model.named_modules()] == [n for n, _ in base.named_modules()]
    x = torch.randn(2, 10)
    assert torch.equal(model(x), base(x))


def test_only_training_adapters_step_and_get_groups():
    _, model = two_adapters()
    for layer in dreamlora.adapter_layers(model, "style").values():
        for p in layer.parameters():
            p.requires_grad_(False)  # `style` is a frozen, loaded adapter used for composition
    groups = dreamlora.param_groups(model, lr=1e-3)
    assert {g["adapter"] for g in groups} == {"subject"}
    assert dreamlora.on_optimizer_step(model) == 1
    assert dreamlora.adapter_layers(model, "subject")["b"].step == 1
    assert all(layer.step == 0 for layer in dreamlora.adapter_layers(model, "style").values())


def test_wrapped_layer_still_looks_like_its_base():
    _, model = two_adapters()
    assert model.a.in_features == 10 and model.a.weight is model.a.base_layer.weight
    assert dreamlora.regularization_loss(model) == 0.0


@pytest.mark.parametrize("second", ["lora", "dora", "singlora"])
def test_merging_two_adapters_on_a_half_precision_layer_rounds_once(second):
    """The docs promise an fp32 sum rounded once: merging on fp16 must equal merging the same model in fp32 and
    rounding the result, bit for bit (rounding after each adapter differs in many entries)."""
    torch.manual_seed(0)
    model = attach(nn.Sequential(nn.Linear(64, 48)).half(), AdapterConfig(rank=4, target_modules=["0"]), "first")
    attach(model, AdapterConfig(method=second, rank=4, target_modules=["0"],
                                options=options_for(second, singlora_ramp_steps=0)), "second")
    with torch.no_grad():
        for name in ("first", "second"):
            for p in dreamlora.adapter_layers(model, name)["0"].parameters():
                p.add_(torch.randn_like(p) * 0.3)
    in_fp32 = copy.deepcopy(model)
    in_fp32[0].base_layer.float()
    expected = dreamlora.merge(in_fp32)[0].weight.half()
    merged = dreamlora.merge(model)[0].weight
    assert merged.dtype == torch.float16
    assert torch.equal(merged, expected), f"{(merged != expected).sum().item()} of {merged.numel()} entries differ"


@pytest.mark.parametrize("name", ["train", "eval", "forward", "training", "keys"])
def test_names_taken_by_module_attributes_are_refused_before_anything_changes(name):
    """Adapters live in an nn.ModuleDict, which cannot hold a key named like one of its own attributes."""
    model = TwoLayers()
    with pytest.raises(ValueError, match=rf"adapter name '{name}' is the name of an nn.ModuleDict attribute"):
        attach(model, AdapterConfig(rank=2, target_modules=["a"]), name)
    assert isinstance(model.a, nn.Linear) and all(p.requires_grad for p in model.parameters())
