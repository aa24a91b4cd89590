"""Parity with the real reference implementations: PEFT (LoRA, DoRA, LoRA+) and peft-singlora 0.2.0."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import OneLayer
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach

REFERENCE_LAYERS = {
    "linear": (lambda: nn.Linear(24, 40), lambda: torch.randn(4, 6, 24)),
    "linear_narrow": (lambda: nn.Linear(40, 16), lambda: torch.randn(4, 6, 40)),
    "conv2d": (lambda: nn.Conv2d(6, 10, 3, padding=1), lambda: torch.randn(2, 6, 9, 9)),
    "conv2d_strided_1x1": (lambda: nn.Conv2d(6, 10, 1, stride=2), lambda: torch.randn(2, 6, 9, 9)),
    "embedding": (lambda: nn.Embedding(50, 12, padding_idx=1), lambda: torch.randint(0, 50, (4, 7))),
}


def peft_factors(ref) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A, B) parameters: `lora_A[...].weight` modules, or ParameterDicts on embeddings."""
    if "default" in ref.lora_embedding_A:
        return ref.lora_embedding_A["default"], ref.lora_embedding_B["default"]
    return ref.lora_A["default"].weight, ref.lora_B["default"].weight


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def twin_models(kind: str, use_dora: bool, rank: int = 4, alpha: float = 8.0, use_rslora: bool = False,
                dropout: float = 0.0):
    """Our adapter and PEFT's on identical base weights, with identical (non-trivial) adapter weights."""
    make_layer, make_input = REFERENCE_LAYERS[kind]
    base = OneLayer(make_layer())
    ours = attach(copy.deepcopy(base), AdapterConfig(method="dora" if use_dora else "lora", rank=rank, alpha=alpha,
                                                     target_modules=["proj"], use_rslora=use_rslora, dropout=dropout))
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"],
                                                          use_dora=use_dora, use_rslora=use_rslora,
                                                          lora_dropout=dropout))
    layer = ours.proj.adapters["default"]
    ref = peft.base_model.model.proj
    ref_a, ref_b = peft_factors(ref)
    with torch.no_grad():
        layer.lora_A.add_(torch.randn_like(layer.lora_A) * 0.2)
        layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.2)
        ref_a.copy_(layer.lora_A)
        ref_b.copy_(layer.lora_B)
        if use_dora:
            layer.lora_magnitude_vector.mul_(torch.rand_like(layer.lora_magnitude_vector) + 0.5)
            magnitude = ref.lora_magnitude_vector["default"].weight
            magnitude.copy_(layer.lora_magnitude_vector.reshape(magnitude.shape))
    return ours, peft, make_input()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", list(REFERENCE_LAYERS))
def test_forward_and_gradients_match_peft(kind, use_dora):
    ours, peft, x = twin_models(kind, use_dora)
    x_ours, x_peft = x.clone(), x.clone()
    if x.is_floating_point():
        x_ours.requires_grad_(), x_peft.requires_grad_()
    y_ours, y_peft = ours(x_ours), peft(x_peft)
    assert rel_err(y_ours, y_peft) <= 1e-5
    target = torch.randn_like(y_ours)
    (y_ours * target).sum().backward()
    (y_peft * target).sum().backward()
    layer, ref = ours.proj.adapters["default"], peft.base_model.model.proj
    pairs = [(layer.lora_A, peft_factors(ref)[0]), (layer.lora_B, peft_factors(ref)[1])]
    if x.is_floating_point():
        pairs.append((x_ours, x_peft))
    if use_dora:
        pairs.append((layer.lora_magnitude_vector, ref.lora_magnitude_vector["default"].weight))
    for mine, theirs in pairs:
        assert rel_err(mine.grad.reshape(theirs.grad.shape), theirs.grad) <= 1e-5


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_training_with_dropout_matches_peft(kind, use_dora):
    """PEFT draws one dropout mask and uses the dropped input in both DoRA terms (W0·x and B·A·x); with the same
    seed our layer must draw the same single mask, so outputs and gradients agree."""
    ours, peft, x = twin_models(kind, use_dora, dropout=0.3)
    ours.train(), peft.train()
    torch.manual_seed(123)
    y_ours = ours(x)
    torch.manual_seed(123)
    y_peft = peft(x)
    assert not torch.equal(y_ours, ours.proj.base_layer(x))  # the adapter is live and dropout acted
    assert rel_err(y_ours, y_peft) <= 1e-5
    target = torch.randn_like(y_ours)
    (y_ours * target).sum().backward()
    (y_peft * target).sum().backward()
    layer, ref = ours.proj.adapters["default"], peft.base_model.model.proj
    pairs = [(layer.lora_A, peft_factors(ref)[0]), (layer.lora_B, peft_factors(ref)[1])]
    if use_dora:
        pairs.append((layer.lora_magnitude_vector, ref.lora_magnitude_vector["default"].weight))
    for mine, theirs in pairs:
        assert rel_err(mine.grad.reshape(theirs.grad.shape), theirs.grad) <= 1e-5


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_rslora_scale_matches_peft(use_dora):
    ours, peft, x = twin_models("linear", use_dora, rank=16, alpha=8.0, use_rslora=True)
    with torch.no_grad():
        assert rel_err(ours(x), peft(x)) <= 1e-5
    assert ours.proj.adapters["default"].scaling == pytest.approx(8.0 / 4.0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_weight_matches_peft_merge(use_dora):
    ours, peft, x = twin_models("conv2d", use_dora)
    with torch.no_grad():
        merged_ours = dreamlora.merge(copy.deepcopy(ours)).proj.weight
        merged_peft = peft.merge_and_unload().proj.weight
    assert rel_err(merged_ours, merged_peft) <= 1e-5


class ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 32)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)


def test_loraplus_groups_match_create_loraplus_optimizer():
    base = ThreeLayers()
    targets = ["embed", "q", "v", "conv"]
    ours = attach(copy.deepcopy(base), AdapterConfig(method="loraplus", rank=4, target_modules=targets,
                                                     options={"ratio": 16.0}))
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    peft_opt = create_loraplus_optimizer(peft, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16.0,
                                         loraplus_weight_decay=0.01)

    def peft_name(p):
        name = next(n for n, q in peft.named_parameters() if q is p)
        name = name.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", "")
        return name.replace("lora_embedding_", "lora_")

    our_names = {id(getattr(layer, attr)): f"{path}.{attr}"
                 for path, layer in dreamlora.adapter_layers(ours, "default").items()
                 for attr in type(layer).roles}

    def summary(groups, name_of):
        return sorted((g["lr"], g["weight_decay"], tuple(sorted(name_of(p) for p in g["params"])))
                      for g in groups if g["params"])

    ours_groups = dreamlora.param_groups(ours, lr=2e-4, weight_decay=0.01)
    embedding_group = next(g for g in ours_groups if g["role"] == "embedding")
    assert embedding_group["lr"] == 1e-6 and len(embedding_group["params"]) == 2
    assert summary(ours_groups, lambda p: our_names[id(p)]) == summary(peft_opt.param_groups, peft_name)
    # and the groups are usable as they are
    torch.optim.AdamW(ours_groups)


def test_loraplus_keeps_dora_style_magnitudes_at_base_lr():
    """Our deliberate choice (see loraplus.py): roles, not ndim, decide; magnitudes train at lr, no decay."""
    base = ThreeLayers()
    ours = attach(copy.deepcopy(base), AdapterConfig(method="dora", rank=4, target_modules=["q", "conv"]))
    groups = dreamlora.param_groups(ours, lr=1e-4, weight_decay=0.1)
    magnitudes = next(g for g in groups if g["role"] == "magnitude")
    assert magnitudes["lr"] == 1e-4 and magnitudes["weight_decay"] == 0.0
    assert {p.ndim for p in magnitudes["params"]} == {1, 4}  # Linear and Conv2d magnitudes together


@pytest.mark.parametrize("shape", [(24, 40), (40, 16)], ids=["d_out>d_in", "d_out<d_in"])
@pytest.mark.parametrize("step", [3, 25])
def test_singlora_matches_peft_singlora(shape, step):
    from peft_singlora import Linear as RefSingLoRA

    d_in, d_out = shape
    base = OneLayer(nn.Linear(d_in, d_out))
    ours = attach(copy.deepcopy(base), AdapterConfig(method="singlora", rank=4, alpha=8.0,
                                                     target_modules=["proj"], options={"ramp_steps": 10}))
    ref = RefSingLoRA(copy.deepcopy(base.proj), "default", r=4, lora_alpha=8.0, ramp_up_steps=10)
    layer = ours.proj.adapters["default"]
    with torch.no_grad():
        ref.lora_A["default"].copy_(layer.singlora_A)
    layer.step = step
    ref.update_global_step(step)
    x = torch.randn(5, d_in)
    y_ours, y_ref = ours(x), ref(x)
    assert rel_err(y_ours, y_ref) <= 1e-5
    assert rel_err(layer.delta_weight(), ref._get_update_weight("default")) <= 1e-6
    target = torch.randn_like(y_ours)
    (y_ours * target).sum().backward()
    (y_ref * target).sum().backward()
    assert rel_err(layer.singlora_A.grad, ref.lora_A["default"].grad) <= 1e-5
