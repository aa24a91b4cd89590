"""The two composition rules of `dreamlora.compose` against their formulas, on Linear and Conv2d, for every method
composition takes; the refusals; and the base fingerprint that tells adapters of different bases apart."""

from __future__ import annotations

import pytest
import torch
from conftest import LAYER_KINDS, METHOD_NAMES, OneLayer, options_for, randomize_adapters, supports
from torch import nn

import dreamlora
from dreamlora import compose, fingerprint
from dreamlora.methods import METHODS

COMPOSABLE = [m for m in METHOD_NAMES if METHODS[m].composition is not None]
FACTOR_RULE = [m for m in COMPOSABLE if METHODS[m].composition == "factors"]


def library(kind: str, methods: list[str], rank: int = 2) -> tuple[nn.Module, dict]:
    """A one-layer model with one trained-looking adapter per method, and their factors by name."""
    model = OneLayer(LAYER_KINDS[kind][0]())
    for i, method in enumerate(methods):
        dreamlora.attach(model, dreamlora.AdapterConfig(method=method, rank=rank, target_modules=["proj"],
                                                        options=options_for(method)), f"a{i}")
        randomize_adapters(model, f"a{i}", std=0.3)
        for layer in dreamlora.adapter_layers(model, f"a{i}").values():
            layer.step = 50  # past SingLoRA's ramp and AdaLoRA's warm-up: the update is the trained one
    return model, {f"a{i}": compose.adapter_factors(model, f"a{i}") for i in range(len(methods))}


def deltas(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    return [dreamlora.adapter_layers(model, n)["proj"].delta_weight().double() for n in names]


@pytest.mark.parametrize("kind", ["linear_wide", "linear_narrow", "conv2d"])
def test_update_rule_is_the_weighted_sum_of_the_updates(kind):
    methods = [m for m in COMPOSABLE if supports(m, kind)]
    model, lib = library(kind, methods)
    weights = torch.linspace(-1.2, 1.4, len(methods)).tolist()
    expected = sum(w * d for w, d in zip(weights, deltas(model, list(lib)), strict=True))
    mixed = compose.Composition(model, lib, "updates")
    assert mixed.set_weights(weights) == {}  # exact: Σrᵢ is within the layer's own limit or re-factored exactly
    got = dreamlora.adapter_layers(model, "composed")["proj"].delta_weight().double()
    assert (got - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max())
    # and the composed adapter's forward is the model with the library adapters scaled live by the same weights
    x = LAYER_KINDS[kind][1]()
    dreamlora.disable(model, "composed")
    for name, w in zip(lib, weights, strict=True):
        dreamlora.set_scale(model, name, w)
    live = model(x)
    for name in lib:
        dreamlora.disable(model, name)
    dreamlora.enable(model, "composed")
    assert torch.allclose(model(x), live, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear_square", "conv2d"])
@pytest.mark.parametrize("method", FACTOR_RULE)
def test_factor_rule_is_lorahubs_formula(method, kind):
    if not supports(method, kind):
        pytest.skip(f"{method} does not adapt {kind}")
    model, lib = library(kind, [method] * 3)
    weights = [0.7, -0.4, 1.1]
    mixed = compose.Composition(model, lib, "factors")
    mixed.set_weights(weights)
    a = sum(w * f["proj"][0] for w, f in zip(weights, lib.values(), strict=True))
    b = sum(w * f["proj"][1] for w, f in zip(weights, lib.values(), strict=True))
    layer = dreamlora.adapter_layers(model, "composed")["proj"]
    kind_ = layer.kind
    expected = kind_.up_matrix(b).double() @ kind_.down_matrix(a).double()
    got = layer.delta_weight().double()
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())
    # the cross terms are really there: it is not the sum of the updates
    summed = sum(w * d for w, d in zip(weights, deltas(model, list(lib)), strict=True))
    assert (got - summed).abs().max() > 1e-3


@pytest.mark.parametrize("rule", list(compose.RULES))
@pytest.mark.parametrize("method", COMPOSABLE)
def test_one_adapter_at_weight_one_is_that_adapter(method, rule):
    if rule == "factors" and method not in FACTOR_RULE:
        pytest.skip(f"{method} is refused by the factor rule (tested below)")
    model, lib = library("linear_wide", [method])
    compose.Composition(model, lib, rule).set_weights([1.0])
    got = dreamlora.adapter_layers(model, "composed")["proj"].delta_weight()
    assert torch.allclose(got, deltas(model, ["a0"])[0].float(), atol=1e-6)


def test_refusals_name_the_adapter_and_the_reason():
    with pytest.raises(compose.CompositionError, match=r"dog/: dora adapters cannot be composed: DoRA"):
        compose.check_method("dora", "updates", "dog/")
    with pytest.raises(compose.CompositionError, match=r"cat/: the 'factors' rule .* 'updates' rule"):
        compose.check_method("relora", "factors", "cat/")
    assert "exact accumulated update" in compose.check_method("relora", "updates", "cat/")
    assert compose.check_method("lora", "factors", "x") is None


def test_factor_rule_needs_equal_ranks_and_layers():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(10, 10))
    model.add_module("other", nn.Linear(10, 10))
    dreamlora.attach(model, dreamlora.AdapterConfig(rank=2, target_modules=["proj"]), "small")
    dreamlora.attach(model, dreamlora.AdapterConfig(rank=3, target_modules=["proj"]), "big")
    dreamlora.attach(model, dreamlora.AdapterConfig(rank=2, target_modules=["proj", "other"]), "wide")
    for n in ("small", "big", "wide"):
        randomize_adapters(model, n)
    lib = {n: compose.adapter_factors(model, n) for n in ("small", "big", "wide")}
    with pytest.raises(compose.CompositionError, match=r"'proj' has rank 3 in big but 2 in small"):
        compose.Composition(model, {"small": lib["small"], "big": lib["big"]}, "factors")
    with pytest.raises(compose.CompositionError, match=r"wide and small differ on 1 layers"):
        compose.Composition(model, {"small": lib["small"], "wide": lib["wide"]}, "factors")
    assert "composed" not in dreamlora.adapter_names(model)  # nothing attached on refusal
    # the update rule takes both: ranks 2 + 3 + 2 on proj, 2 on other (zero-padded to the adapter's rank 7)
    mixed = compose.Composition(model, lib, "updates")
    assert mixed.rank == 7 and mixed.set_weights([1.0, -1.0, 0.5]) == {}


def test_update_rule_refactors_exactly_above_the_layer_limit():
    model = OneLayer(nn.Linear(6, 5))  # min(d_in, d_out) = 5 < 3 adapters × rank 2
    for i in range(3):
        dreamlora.attach(model, dreamlora.AdapterConfig(rank=2, target_modules=["proj"]), f"a{i}")
        randomize_adapters(model, f"a{i}")
    lib = {f"a{i}": compose.adapter_factors(model, f"a{i}") for i in range(3)}
    mixed = compose.Composition(model, lib, "updates")
    assert mixed.rank == 5
    assert mixed.set_weights([0.3, 0.9, -0.6]) == {}
    expected = sum(w * d for w, d in zip([0.3, 0.9, -0.6], deltas(model, list(lib)), strict=True))
    got = dreamlora.adapter_layers(model, "composed")["proj"].delta_weight().double()
    assert (got - expected).abs().max() <= 1e-5


def test_fingerprint_tells_bases_apart_but_not_dtypes():
    torch.manual_seed(1)
    base = nn.Linear(64, 64)
    same_in_half = nn.Linear(64, 64).half()
    same_in_half.load_state_dict({k: v.half() for k, v in base.state_dict().items()})
    fine_tuned = nn.Linear(64, 64)
    fine_tuned.load_state_dict({k: v + 0.01 * v.std() * torch.randn_like(v) for k, v in base.state_dict().items()})
    recorded = fingerprint.fingerprint({"proj": base})
    assert fingerprint.mismatch(recorded, {"proj": same_in_half}) is None
    assert fingerprint.mismatch(recorded, {"proj": fine_tuned}) is None
    assert "other weights" in fingerprint.mismatch(recorded, {"proj": nn.Linear(64, 64)})
    assert "is (32, 64) here" in fingerprint.mismatch(recorded, {"proj": nn.Linear(64, 32)})


def test_saved_files_carry_the_fingerprint(tmp_path):
    model = OneLayer(nn.Linear(16, 16))
    dreamlora.attach(model, dreamlora.AdapterConfig(rank=2, target_modules=["proj"]))
    dreamlora.save(model, tmp_path / "a.safetensors")
    meta = dreamlora.io.read_metadata(tmp_path / "a.safetensors")
    other = OneLayer(nn.Linear(16, 16))
    dreamlora.load(other, tmp_path / "a.safetensors")
    assert "other weights" in dreamlora.io.base_mismatch(other, "default", meta)
    assert dreamlora.io.base_mismatch(model, "default", meta) is None


def test_a_method_without_lora_factors_is_refused(monkeypatch):
    from dreamlora.methods import AdapterLayer

    class NoLoRA(AdapterLayer):  # a plugin that defines no lora_factors(): its update has no LoRA form to mix
        method = "nolora_for_test"
        file_keys, roles = {}, {}

    monkeypatch.setitem(METHODS, "nolora_for_test", NoLoRA)
    with pytest.raises(compose.CompositionError, match=r"x/: a nolora_for_test adapter has no exact LoRA factors"):
        compose.check_method("nolora_for_test", "updates", "x/")
