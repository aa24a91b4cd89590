"""The optimizer of a run, built from the core's parameter groups (`dreamlora.param_groups`): AdamW (torch's, or
bitsandbytes' 8-bit AdamW with --use_8bit_adam) or Prodigy (Mishchenko & Defazio 2023, `prodigyopt` on PyPI,
flags as diffusers' advanced DreamBooth scripts).

Prodigy estimates one step size d for the whole model and moves every parameter by d·lr. prodigyopt refuses
groups whose lr differ (other than 0), so on its own it cannot train LoRA+ (B at λ·lr) or any method that groups
its parameters by learning rate. `keep_group_ratios` keeps the core's groups and their ratios: each step runs
at the largest group lr, and each other group's update is then scaled by its lr / that largest lr. With equal
lrs nothing is rescaled, and the step is prodigyopt's own, bit for bit.
"""

from __future__ import annotations

import logging

import torch

from dreamlora.errors import ArgError

log = logging.getLogger(__name__)
PRODIGY_INSTALL = "pip install prodigyopt (or pip install 'dreamlora[prodigy]')"


def is_prodigy(args) -> bool:
    return str(getattr(args, "optimizer", "AdamW")).lower() == "prodigy"


def make_optimizer(args, param_groups: list[dict]) -> torch.optim.Optimizer:
    """`--optimizer`'s optimizer over `param_groups` (each group keeps its own lr and weight decay). `args` gives
    --optimizer, --use_8bit_adam, --adam_beta1/2, --adam_epsilon, --learning_rate and the --prodigy_* flags."""
    betas = (args.adam_beta1, args.adam_beta2)
    if is_prodigy(args):
        if getattr(args, "use_8bit_adam", False):
            raise ArgError("--use_8bit_adam is bitsandbytes' 8-bit AdamW: it does not apply to --optimizer prodigy")
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ArgError(f"--optimizer prodigy needs prodigyopt: {PRODIGY_INSTALL}") from None
        optimizer = Prodigy(param_groups, lr=args.learning_rate, betas=betas, beta3=args.prodigy_beta3,
                            eps=args.adam_epsilon, decouple=args.prodigy_decouple,
                            use_bias_correction=args.prodigy_use_bias_correction,
                            safeguard_warmup=args.prodigy_safeguard_warmup)
        keep_group_ratios(optimizer)
        return optimizer
    if getattr(args, "use_8bit_adam", False):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ArgError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(param_groups, betas=betas, eps=args.adam_epsilon)


def text_encoder_lr(args) -> float:
    """The text encoder's lr: --text_encoder_lr, except with Prodigy, where --learning_rate is a multiplier of the
    step size Prodigy estimates and both models take it (diffusers' advanced scripts do the same)."""
    return args.learning_rate if is_prodigy(args) else args.text_encoder_lr


def step_size_logs(optimizer) -> dict[str, torch.Tensor]:
    """What to log beside the lr: Prodigy's step size d·lr (its lr is only a multiplier), as kohya's `d*lr`; nothing
    for AdamW."""
    group = optimizer.param_groups[0]
    if "d" not in group:
        return {}
    return {"d*lr": torch.tensor(group["d"] * group["lr"])}


class GroupRatios:
    """Optimizer step hooks that let Prodigy train groups with different lrs (see the module docstring).

    Before the step: every group with lr > 0 is set to the largest lr, and the parameters of the groups that were
    below it are copied (adapter weights: a few MB). After it: those parameters become old + (lr / largest)·(new −
    old), and every group gets its own lr back, so the LR scheduler, the checkpoint and the logs see the lrs the
    core and the schedule set. Prodigy's d is estimated from the steps actually taken."""

    def __init__(self):
        self.lrs: list[float] = []
        self.saved: dict[int, list[torch.Tensor]] = {}

    def before(self, optimizer, args, kwargs) -> None:
        self.lrs = [group["lr"] for group in optimizer.param_groups]
        top = max(self.lrs)
        self.saved = {}
        for i, (group, lr) in enumerate(zip(optimizer.param_groups, self.lrs, strict=True)):
            if 0 < lr < top:
                self.saved[i] = [p.detach().clone() for p in group["params"]]
                group["lr"] = top

    @torch.no_grad()
    def after(self, optimizer, args, kwargs) -> None:
        top = max(self.lrs)
        for i, old_values in self.saved.items():
            scale = self.lrs[i] / top
            for p, old in zip(optimizer.param_groups[i]["params"], old_values, strict=True):
                p.sub_(old).mul_(scale).add_(old)
        for group, lr in zip(optimizer.param_groups, self.lrs, strict=True):
            group["lr"] = lr
        self.saved = {}


def keep_group_ratios(optimizer: torch.optim.Optimizer) -> GroupRatios:
    """Install `GroupRatios` on `optimizer` (torch's step hooks run on every call of `step`, also through
    accelerate's wrapper and the fp16 GradScaler, which skips both the step and the hooks on inf gradients)."""
    ratios = GroupRatios()
    optimizer.register_step_pre_hook(ratios.before)
    optimizer.register_step_post_hook(ratios.after)
    return ratios
