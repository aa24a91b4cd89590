"""One method-agnostic loop trains every method, and the hooks leave room for ReLoRA and AdaLoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import METHOD_NAMES, options_for
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach
from dreamlora.methods import METHODS
from dreamlora.methods.lora import LoRA


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


def regression_data():
    """Targets from a perturbed copy of the base, so a low-rank update can fit them."""
    torch.manual_seed(0)
    base = mlp()
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            layer.weight.add_(0.3 * torch.randn(layer.weight.shape[0], 2) @ torch.randn(2, layer.weight.shape[1]))
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = teacher(x)
    return base, x, y


def train(model, x, y, steps: int, accumulation: int = 2, lr: float = 1e-2) -> list[float]:
    """The loop a trainer runs; note it has no method name in it."""
    optimizer = torch.optim.AdamW(dreamlora.param_groups(model, lr=lr))
    losses = []
    for _ in range(steps):
        for chunk_x, chunk_y in zip(x.chunk(accumulation), y.chunk(accumulation), strict=True):
            loss = nn.functional.mse_loss(model(chunk_x), chunk_y) + dreamlora.regularization_loss(model)
            (loss / accumulation).backward()
        losses.append(loss.item())
        optimizer.step()
        dreamlora.on_optimizer_step(model, optimizer)
        optimizer.zero_grad()
    return losses


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_the_same_loop_trains_every_method(method):
    base, x, y = regression_data()
    model = attach(copy.deepcopy(base), AdapterConfig(method=method, rank=4, target_modules=["0", "2"],
                                                      options=options_for(method, singlora_ramp_steps=10,
                                                                          loraplus_ratio=4.0)))
    # 120 steps: LoKr's Kronecker-structured update fits this generic rank-2 target more slowly than a LoRA
    # does (0.64 of the first loss after 60 steps, 0.45 after 120, a plateau near 0.3), yet it trains
    losses = train(model, x, y, steps=120)
    assert losses[-1] < 0.5 * losses[0], (method, losses[0], losses[-1])
    assert dreamlora.adapter_layers(model, "default")["0"].step == 120


class MergeAndRestart(LoRA):
    """A ReLoRA-shaped method built only from the public hooks: every 3 optimizer steps fold B·A into W0,
    re-draw A, zero B and reset their optimizer state; plus an AdaLoRA-shaped penalty on A."""

    method = "test-merge-and-restart"

    @classmethod
    def after_optimizer_step(cls, layers, ctx):
        super().after_optimizer_step(layers, ctx)
        if ctx.step % 3:
            return
        with torch.no_grad():
            for layer in layers:
                layer.kind.base.weight.copy_(layer.merged_weight())
                nn.init.kaiming_uniform_(layer.lora_A, a=5**0.5)
                layer.lora_B.zero_()
                for p in (layer.lora_A, layer.lora_B):
                    ctx.optimizer.state.pop(p, None)

    @classmethod
    def regularization(cls, layers):
        return 1e-4 * sum(layer.lora_A.square().sum() for layer in layers)


@pytest.fixture
def merge_and_restart():
    METHODS[MergeAndRestart.method] = MergeAndRestart
    yield MergeAndRestart.method
    del METHODS[MergeAndRestart.method]


def test_hooks_carry_a_merge_and_restart_method(merge_and_restart):
    base, x, y = regression_data()
    model = attach(copy.deepcopy(base), AdapterConfig(method=merge_and_restart, rank=4, target_modules=["0", "2"]))
    layers = dreamlora.adapter_layers(model, "default")
    penalty = dreamlora.regularization_loss(model)
    assert penalty.item() == pytest.approx(1e-4 * sum(la.lora_A.square().sum().item() for la in layers.values()))

    train(model, x, y, steps=2)  # two steps: B is non-zero, nothing merged yet
    assert layers["0"].lora_B.abs().sum() > 0
    w0 = base[0].weight.clone()
    assert torch.equal(model[0].base_layer.weight, w0)
    optimizer = torch.optim.AdamW(dreamlora.param_groups(model, lr=1e-2))
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    with torch.no_grad():
        before = model(x)
    dreamlora.on_optimizer_step(model, optimizer)  # step 3: merge, re-init, reset
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)  # the function survives the restart
    assert not torch.equal(model[0].base_layer.weight, w0)
    assert torch.count_nonzero(layers["0"].lora_B) == 0
    assert layers["0"].lora_A not in optimizer.state
