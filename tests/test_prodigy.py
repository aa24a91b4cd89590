"""`--optimizer {AdamW,prodigy}` (issue #14): Prodigy receives the core's parameter groups and keeps their lr ratios
(LoRA+'s B at λ·lr), its steps move the fp32 adapters, its state resumes exactly, and bad combinations fail before
a model loads, naming the flag."""

from __future__ import annotations

import argparse
import shutil
import sys

import prodigyopt
import pytest
import torch
from torch import nn
from train_helpers import train_in_process

import dreamlora
from dreamlora import AdapterConfig
from dreamlora.errors import ArgError
from dreamlora.train_args import parse_args
from pipelines.trainer.optimizers import make_optimizer

RATIO = 16.0


def flags(**kw) -> argparse.Namespace:
    values = dict(optimizer="prodigy", use_8bit_adam=False, learning_rate=1.0, adam_beta1=0.9, adam_beta2=0.999,
                  adam_epsilon=1e-8, prodigy_beta3=None, prodigy_decouple=True, prodigy_use_bias_correction=True,
                  prodigy_safeguard_warmup=True)
    return argparse.Namespace(**{**values, **kw})


def loraplus_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    dreamlora.attach(model, AdapterConfig(method="loraplus", rank=4, target_modules=["0", "2"],
                                          options={"ratio": RATIO}))
    return model


def train_steps(model, optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(12, 16, generator=gen), torch.randn(12, 8, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def by_role(groups: list[dict]) -> dict[str, dict]:
    return {g["role"]: g for g in groups}


def test_prodigy_keeps_the_loraplus_groups_and_their_ratio():
    model = loraplus_model()
    groups = dreamlora.param_groups(model, lr=1.0, weight_decay=1e-2)
    optimizer = make_optimizer(flags(), groups)
    assert isinstance(optimizer, prodigyopt.Prodigy)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, optimizer, 5)
    roles = by_role(optimizer.param_groups)
    assert roles["lora_B"]["lr"] / roles["lora_A"]["lr"] == RATIO  # the lrs the core set, back after each step
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(g["params"]) for g in groups]
    assert roles["lora_A"]["d"] == roles["lora_B"]["d"] > roles["lora_A"]["d0"]  # Prodigy adapted its step size
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and not torch.equal(p, start[name]), name
            assert all(v.dtype == torch.float32 for v in optimizer.state[p].values() if torch.is_tensor(v)
                       and v.is_floating_point())


def test_each_group_moves_by_its_lr_share_of_prodigys_step():
    """Two steps from the same state: plain Prodigy with every group at the largest lr moves A by some δA and B by
    δB; with the core's groups, A moves δA/λ and B moves δB, bit for bit. (B starts at 0, so A has no gradient at
    the first step and both runs enter the second with the same state.) Plain Prodigy refuses the core's groups."""
    from prodigyopt import Prodigy

    plain_model, model = loraplus_model(), loraplus_model()
    groups = dreamlora.param_groups(plain_model, lr=1.0)
    with pytest.raises(RuntimeError, match="different lr values"):
        train_steps(plain_model, Prodigy(groups), 1)
    plain_model = loraplus_model()
    plain = Prodigy([{**g, "lr": RATIO} for g in dreamlora.param_groups(plain_model, lr=1.0)], lr=RATIO,
                    use_bias_correction=True, safeguard_warmup=True)
    ours = make_optimizer(flags(), dreamlora.param_groups(model, lr=1.0))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(plain_model, plain, 2)
    train_steps(model, ours, 2)
    plain_params = dict(plain_model.named_parameters())
    for name, p in model.named_parameters():
        if name in start:
            share = 1 / RATIO if name.endswith("lora_A") else 1.0
            old = start[name]
            assert not torch.equal(p, old), name
            assert torch.equal(p, old + share * (plain_params[name] - old) if share != 1 else plain_params[name]), name


def test_equal_lrs_step_exactly_as_prodigyopt():
    """With one lr for every group the hooks change nothing: bit-identical to prodigyopt's own steps."""
    from prodigyopt import Prodigy

    plain_model, model = loraplus_model(), loraplus_model()
    plain = Prodigy([{**g, "lr": 1.0} for g in dreamlora.param_groups(plain_model, lr=1.0)], lr=1.0,
                    use_bias_correction=True, safeguard_warmup=True)
    ours = make_optimizer(flags(), [{**g, "lr": 1.0} for g in dreamlora.param_groups(model, lr=1.0)])
    train_steps(plain_model, plain, 4)
    train_steps(model, ours, 4)
    for (name, a), (_, b) in zip(plain_model.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_prodigy_flags_reach_the_optimizer():
    optimizer = make_optimizer(flags(prodigy_beta3=0.8, prodigy_decouple=False, prodigy_use_bias_correction=False,
                                     prodigy_safeguard_warmup=False, adam_beta2=0.99, learning_rate=0.5),
                               dreamlora.param_groups(loraplus_model(), lr=0.5))
    group = optimizer.param_groups[0]
    assert (group["beta3"], group["decouple"], group["use_bias_correction"], group["safeguard_warmup"]) == (
        0.8, False, False, False)
    assert group["betas"] == (0.9, 0.99) and optimizer.defaults["lr"] == 0.5


BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p",
        "--output_dir", "o"]


def test_optimizer_names_are_case_insensitive():
    assert parse_args(BASE).optimizer == "AdamW"
    for given, canonical in (("adamw", "AdamW"), ("ADAMW", "AdamW"), ("Prodigy", "prodigy"), ("PRODIGY", "prodigy")):
        assert parse_args(BASE + ["--optimizer", given]).optimizer == canonical
    with pytest.raises(ArgError, match=r"--optimizer must be one of \['AdamW', 'prodigy'\] \(any case\), got 'sgd'"):
        parse_args(BASE + ["--optimizer", "sgd"])


def test_bad_prodigy_combinations_fail_before_a_model_loads(monkeypatch, capsys):
    with pytest.raises(ArgError, match="--use_8bit_adam is bitsandbytes' 8-bit AdamW: it does not apply to "
                                       "--optimizer prodigy"):
        parse_args(BASE + ["--optimizer", "prodigy", "--use_8bit_adam", "--learning_rate", "1.0"])
    with pytest.raises(ArgError, match=r"--prodigy_beta3 must be in \[0, 1\)"):
        parse_args(BASE + ["--optimizer", "prodigy", "--prodigy_beta3", "1.5"])

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(ArgError, match=r"--optimizer prodigy needs prodigyopt: pip install prodigyopt"):
        parse_args(BASE + ["--optimizer", "prodigy", "--learning_rate", "1.0"])
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what `import prodigyopt` sees when it is not installed
    with pytest.raises(ArgError, match=r"--optimizer prodigy needs prodigyopt: pip install prodigyopt"):
        make_optimizer(flags(), dreamlora.param_groups(loraplus_model(), lr=1.0))


def test_a_learning_rate_far_from_one_warns_with_prodigy(capsys):
    parse_args(BASE + ["--optimizer", "prodigy", "--learning_rate", "1.0"])
    assert "warning" not in capsys.readouterr().err
    args = parse_args(BASE + ["--optimizer", "prodigy"])  # the AdamW default, 1e-4
    assert args.learning_rate == 1e-4
    assert "warning: --learning_rate 0.0001 with --optimizer prodigy" in capsys.readouterr().err
    parse_args(BASE + ["--learning_rate", "1e-4"])  # AdamW: no warning
    assert "warning" not in capsys.readouterr().err


def read_optimizer_state(checkpoint) -> dict:
    return torch.load(checkpoint / "optimizer.bin", weights_only=True)


def test_prodigy_trains_loraplus_and_resumes_exactly(tiny_model_dir, tmp_path):
    """LoRA+ on the UNet and the text encoder with Prodigy: the checkpointed optimizer holds the core's groups (B at
    16× A, the text encoder at --learning_rate) and Prodigy's adapted d; a run resumed from step 3 ends on the
    adapters of the uninterrupted one."""
    from safetensors.torch import load_file

    run = ["--optimizer", "prodigy", "--learning_rate", 1.0, "--adapter", "loraplus", "--train_text_encoder",
           "--max_train_steps", 6, "--checkpointing_steps", 3, "--random_flip", "--lr_scheduler", "cosine"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert train_in_process(tiny_model_dir, reference, *run) == 0
    state = read_optimizer_state(reference / "checkpoint-3")
    lrs = sorted({(g["role"], round(g["initial_lr"], 9)) for g in state["param_groups"]})
    assert lrs == [("lora_A", 1.0), ("lora_B", RATIO)]  # UNet and text encoder alike: --text_encoder_lr unused
    assert len(state["param_groups"]) == 4
    assert {"exp_avg", "exp_avg_sq", "s", "p0"} <= set(next(iter(state["state"].values())))

    shutil.copytree(reference / "checkpoint-3", resumed / "checkpoint-3")
    assert train_in_process(tiny_model_dir, resumed, *run, "--resume_from_checkpoint", "latest") == 0
    for component in ("unet", "text_encoder"):
        a = load_file(reference / f"{component}_adapter.safetensors")
        b = load_file(resumed / f"{component}_adapter.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
        assert all(v.dtype == torch.float32 for v in a.values())
    end = read_optimizer_state(resumed / "checkpoint-6")["param_groups"]
    assert [g["d"] for g in end] == [g["d"] for g in read_optimizer_state(reference / "checkpoint-6")["param_groups"]]
    assert all(g["d"] > g["d0"] for g in end)  # Prodigy's step size grew from d0 (measured: 8e-5 from 1e-6)


def test_relora_refuses_prodigy_naming_the_flag(tiny_model_dir, tmp_path, capsys):
    code = train_in_process(tiny_model_dir, tmp_path / "out", "--adapter", "relora", "--optimizer", "prodigy",
                            "--learning_rate", 1.0, "--max_train_steps", 4, "--relora_steps", 2)
    assert code != 0
    assert "--optimizer prodigy: relora resets AdamW's moments" in capsys.readouterr().err


def test_prodigys_step_size_is_logged_as_d_times_lr():
    from pipelines.trainer.optimizers import step_size_logs

    model = loraplus_model()
    optimizer = make_optimizer(flags(learning_rate=0.5), dreamlora.param_groups(model, lr=0.5))
    train_steps(model, optimizer, 6)
    d = optimizer.param_groups[0]["d"]
    assert d > optimizer.param_groups[0]["d0"]
    assert step_size_logs(optimizer)["d*lr"].item() == pytest.approx(d * 0.5)
    assert step_size_logs(torch.optim.AdamW(dreamlora.param_groups(loraplus_model(), lr=1e-3))) == {}


def test_prodigy_through_accelerate_and_the_fp16_scaler_keeps_the_ratio_and_skips_inf_steps():
    """The fp16 path: accelerate's wrapper and torch's GradScaler (on CPU, as fp16 on a GPU installs it) call the
    step that carries the ratio hooks; a step the scaler skips (inf gradients) moves nothing and leaves the lrs as
    the core set them."""
    from accelerate import Accelerator
    from train_helpers import reset_accelerate

    from pipelines.trainer import loop

    reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        model = loraplus_model()
        optimizer = make_optimizer(flags(), dreamlora.param_groups(model, lr=1.0))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        x = torch.randn(12, 16)
        for poisoned in (False, False, True, False):
            before = [p.detach().clone() for p in params]
            loss = model(x).square().mean() * (float("inf") if poisoned else 1.0)
            accelerator.backward(loss)
            loop.optimizer_step(accelerator, optimizer, schedule, params, 1.0, [model])
            assert accelerator.optimizer_step_was_skipped == poisoned
            assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True)) == poisoned
            roles = by_role(optimizer.param_groups)
            assert (roles["lora_A"]["lr"], roles["lora_B"]["lr"]) == (1.0, RATIO)
    finally:
        reset_accelerate()
