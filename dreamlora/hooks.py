"""What a training loop calls. It never needs to know which method it trains:

    optimizer = torch.optim.AdamW(dreamlora.param_groups(model, lr=1e-4))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for batch in loader:
        loss = task_loss(model, batch) + dreamlora.regularization_loss(model)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        dreamlora.on_optimizer_step(model, optimizer, lr_scheduler)   # after step(), before zero_grad()
        optimizer.zero_grad()

With gradient accumulation call `on_optimizer_step` only when the optimizer really stepped
(accelerate: `if accelerator.sync_gradients`). The optimizer, the LR scheduler and the run's length reach
each method's `after_optimizer_step` in a `StepContext`: ReLoRA resets optimizer state and restarts the
schedule there. All three are optional, so `on_optimizer_step(model)` still advances the step counters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dreamlora.inject import adapter_layers, adapter_names
from dreamlora.methods import METHODS


def _roles(path: str, layer) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, role); factors of adapters on embedding layers get the role "embedding"."""
    def role_of(role: str) -> str:
        return "embedding" if layer.kind.is_embedding and role != "magnitude" else role

    roles = type(layer).roles
    return [(f"{path}.{attr}", getattr(layer, attr), role_of(roles[attr])) for attr in layer.present(roles)]


def _adapters(model: nn.Module, names: list[str] | None = None):
    """(name, method class, {path: layer}) for each adapter: what every hook below walks."""
    for name in names or adapter_names(model):
        layers = adapter_layers(model, name)
        yield name, METHODS[next(iter(layers.values())).config.method], layers


@dataclass(frozen=True)
class StepContext:
    """What a method's per-optimizer-step hook can reach (`AdapterLayer.after_optimizer_step`)."""

    step: int
    """Optimizer steps this adapter has taken, the one just taken included (1 after the first step)."""
    total_steps: int | None = None
    """The run's planned number of optimizer steps, when the caller knows it (the trainers do)."""
    optimizer: torch.optim.Optimizer | None = None
    """The optimizer that just stepped: a method may reset the state of its own parameters (ReLoRA)."""
    lr_scheduler: Any = None
    """The LR scheduler, already stepped for this step: a method may read or restart it (ReLoRA's jagged
    schedule). With accelerate it is accelerate's wrapper around the scheduler."""


def param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, names: list[str] | None = None
) -> list[dict]:
    """Optimizer parameter groups for the trainable adapters (default: all attached), each method's own
    grouping (LoRA+ gives B its λ·lr). Every group carries `adapter` and `role` keys for logging."""
    groups: list[dict] = []
    for name, method, layers in _adapters(model, names):
        config = next(iter(layers.values())).config
        params = [t for path, layer in layers.items() for t in _roles(path, layer) if t[1].requires_grad]
        if not params:
            continue
        for group in method.param_groups(params, lr, weight_decay, config):
            groups.append({**group, "adapter": name})
    if not groups:
        raise ValueError("no trainable adapter parameters: attach an adapter first")
    return groups


def on_optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
                      total_steps: int | None = None) -> int:
    """Advance the step counter of every adapter that is training (has trainable parameters) and run its
    method's step hook with a `StepContext`. Frozen adapters loaded for composition keep their step.
    Returns the new step."""
    context = StepContext(step=0, total_steps=total_steps, optimizer=optimizer, lr_scheduler=lr_scheduler)
    new_step = None
    for _, method, layers in _adapters(model):
        first = next(iter(layers.values()))
        if not any(p.requires_grad for p in first.parameters()):
            continue
        step = first.step + 1  # per adapter: one loaded from an earlier run continues its own count
        method.after_optimizer_step(list(layers.values()), dataclasses.replace(context, step=step))
        new_step = step if new_step is None else new_step
    return 0 if new_step is None else new_step


def regularization_loss(model: nn.Module) -> torch.Tensor | float:
    """Sum of the methods' extra loss terms (0.0 when no attached method has one)."""
    total: torch.Tensor | float = 0.0
    for _, method, layers in _adapters(model):
        term = method.regularization(list(layers.values()))
        if term is not None:
            total = total + term
    return total


def trainable_parameter_count(model: nn.Module, name: str | None = None) -> int:
    """Adapter parameters of `name` (default: all adapters)."""
    return sum(p.numel() for _, _, layers in _adapters(model, None if name is None else [name])
               for layer in layers.values() for p in layer.parameters())
