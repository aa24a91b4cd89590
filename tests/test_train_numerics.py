"""The trainers' numerics and plumbing, checked on internal functions (no training run): seeds, the loss per
prediction type, min-SNR weights, skipped fp16 steps, checkpointed progress, device choice, exit codes."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle

import pytest
import torch
from torch import nn

import dreamlora
from dreamlora import AdapterConfig, attach
from dreamlora.errors import ArgError, DataError
from pipelines.diffusion.loss import denoising_loss, snr_weights
from pipelines.trainer import checkpoints, launch, loop, order
from pipelines.trainer.state import batch_seed


# --- seeds ---------------------------------------------------------------------------------------------
def blake2b_seed(*values: int) -> int:
    """The stated formula: BLAKE2b (8-byte digest) of the values as 8-byte little-endian signed integers,
    read as a little-endian integer, top bit cleared."""
    data = b"".join(v.to_bytes(8, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)


def test_resume_seeds_are_a_version_stable_hash():
    # the value the formula above gives, written down once: Python's hash() may change between versions
    assert blake2b_seed(1, 2, 3, 4) == 5971943691875951595
    assert batch_seed(1, 2, 3, 4) == order.stable_seed(1, 2, 3, 4) == 5971943691875951595
    assert order.stable_seed(0, 0, 0, 1) != order.stable_seed(0, 0, 1, 0)  # positions are not interchangeable
    assert order.stable_seed(-1, 7) == blake2b_seed(-1, 7)


# --- the loss per prediction type ------------------------------------------------------------------------
def scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    from pipelines.diffusion.tiny_model import SD_SCHEDULE

    return DDPMScheduler.from_config({**SD_SCHEDULE, "prediction_type": prediction_type})


class Oracle(nn.Module):
    """A 'UNet' that predicts exactly `answer(noisy, t)`, so the loss says which target the trainer used."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def forward(self, noisy, timesteps, states):
        return argparse.Namespace(sample=self.answer(noisy, timesteps))


def test_each_prediction_type_trains_against_its_own_target():
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])
    is_class, states = torch.zeros(3, dtype=torch.bool), torch.zeros(3, 5, 32)
    for kind, target in (("epsilon", noise), ("sample", latents),
                         ("v_prediction", scheduler("v_prediction").get_velocity(latents, noise, timesteps))):
        parts = denoising_loss(Oracle(lambda x, t, target=target: target), scheduler(kind), latents, states, is_class,
                               None, timesteps=timesteps, noise=noise)
        assert parts["loss"].item() == pytest.approx(0.0, abs=1e-10), kind  # the oracle of the right target
        other = noise if kind != "epsilon" else latents
        wrong = denoising_loss(Oracle(lambda x, t, other=other: other), scheduler(kind),
                               latents, states, is_class, None, timesteps=timesteps, noise=noise)
        assert wrong["loss"].item() > 0.1, kind


def test_an_unknown_prediction_type_is_refused_by_name():
    sched = scheduler()
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        denoising_loss(Oracle(lambda x, t: x), sched, torch.randn(1, 4, 8, 8), torch.zeros(1, 5, 32),
                       torch.zeros(1, dtype=torch.bool), None, timesteps=torch.tensor([3]),
                       noise=torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize(("kind", "weight"), [
    ("epsilon", lambda snr, g: torch.clamp(snr, max=g) / snr),  # min-SNR-γ, Hang et al. 2023, eq. for ε
    ("v_prediction", lambda snr, g: torch.clamp(snr, max=g) / (snr + 1)),
    ("sample", lambda snr, g: torch.clamp(snr, max=g)),  # x0-prediction: the paper's min(SNR, γ)
])
def test_min_snr_weights_per_prediction_type(kind, weight):
    sched = scheduler(kind)
    timesteps = torch.tensor([0, 100, 400, 999])
    abar = sched.alphas_cumprod[timesteps]
    snr = abar / (1 - abar)
    torch.testing.assert_close(snr_weights(sched, timesteps, 5.0), weight(snr, 5.0))


def test_min_snr_weights_every_sample_including_the_prior_term():
    """Decision (as kohya's scripts; diffusers' SDXL DreamBooth script weights only the instance half): the
    min-SNR weight multiplies each sample's MSE, class (prior) images included, before the two means."""
    torch.manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([5, 300, 700, 20])
    is_class = torch.tensor([False, False, True, True])
    guess = torch.randn(4, 4, 8, 8)
    sched, unet = scheduler(), Oracle(lambda x, t: guess)
    mse = (guess - noise).square().mean(dim=(1, 2, 3))
    plain = denoising_loss(unet, sched, latents, None, is_class, None, timesteps=timesteps, noise=noise,
                           prior_loss_weight=0.5)
    weighted = denoising_loss(unet, sched, latents, None, is_class, None, timesteps=timesteps, noise=noise,
                              prior_loss_weight=0.5, snr_gamma=5.0)
    w = snr_weights(sched, timesteps, 5.0)
    torch.testing.assert_close(plain["loss"], mse[:2].mean() + 0.5 * mse[2:].mean())
    torch.testing.assert_close(weighted["instance_loss"], (w * mse)[:2].mean())
    torch.testing.assert_close(weighted["prior_loss"], (w * mse)[2:].mean())
    torch.testing.assert_close(weighted["loss"], (w * mse)[:2].mean() + 0.5 * (w * mse)[2:].mean())
    assert not torch.allclose(weighted["prior_loss"], plain["prior_loss"])  # the prior term is weighted too


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_noise_offset_shifts_each_channel_by_one_constant():
    """--noise_offset adds offset·N(0,1) per (sample, channel), constant over the image: the noise's mean
    brightness varies, which is what lets the model learn very dark or bright images."""
    from pipelines.diffusion.loss import draw_noise

    shape = (2, 4, 8, 8)
    plain = draw_noise(shape, generators(1, 2), 0.0)
    offset = draw_noise(shape, generators(1, 2), 0.1)
    shift = offset - plain
    assert shift.abs().min() > 0  # every value moved
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand(shape))  # one constant per (sample, channel)
    assert shift[:, :, 0, 0].abs().max() < 0.5 and shift[0, :, 0, 0].std() > 0


def test_a_sample_draws_the_same_noise_whatever_batch_it_is_in():
    """Noise and timesteps come from each sample's own generator, so one process with batch 2 and two
    processes with batch 1 train on identical draws."""
    from pipelines.diffusion.loss import draw_noise, draw_timesteps

    together = draw_noise((2, 4, 8, 8), generators(7, 9), 0.1)
    alone = torch.cat([draw_noise((1, 4, 8, 8), generators(s), 0.1) for s in (7, 9)])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)
    assert draw_timesteps(1000, generators(7, 9)).tolist() == [draw_timesteps(1000, generators(s)).item()
                                                                for s in (7, 9)]


# --- the optimizer step -------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_a_step_the_fp16_scaler_skips_advances_neither_the_ramp_nor_the_lr(fresh_accelerate):
    """A GradScaler that finds inf/NaN gradients skips the update; SingLoRA's ramp and the LR schedule must
    not move either (accelerate's `optimizer_step_was_skipped`). The scaler is torch's own, on CPU."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # what fp16 on a GPU would install
    model = attach(nn.Sequential(nn.Linear(8, 8)), AdapterConfig(method="singlora", rank=2, target_modules=["0"],
                                                                 options={"ramp_steps": 10}))
    optimizer = torch.optim.AdamW(dreamlora.param_groups(model, lr=1e-2))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 10)  # a warm-up
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    layer = dreamlora.adapter_layers(model, "default")["0"]
    x = torch.randn(4, 8)
    skipped = []
    for poisoned in (False, True, False):
        loss = model(x).square().mean() * (float("inf") if poisoned else 1.0)
        accelerator.backward(loss)
        loop.optimizer_step(accelerator, optimizer, schedule, params, 1.0, [model])
        skipped.append(accelerator.optimizer_step_was_skipped)
    assert skipped == [False, True, False]
    assert layer.step == 2  # two real updates
    assert schedule.get_last_lr()[0] == pytest.approx(1e-2 * 3 / 10)  # the warm-up advanced twice, not three times
    assert torch.isfinite(layer.singlora_A).all()


def test_8bit_adam_runs_on_cpu_with_8bit_state_and_tracks_adamw():
    """bitsandbytes ≥ 0.50 runs AdamW8bit on CPU. Tensors of ≥ 4096 entries get 8-bit (uint8) moments; one
    step from the same gradient lands within a few % of torch's AdamW."""
    from dreamlora.train import make_optimizer

    flags = argparse.Namespace(adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    torch.manual_seed(0)
    start, grad = torch.randn(64, 128), torch.randn(64, 128)
    results = {}
    for eight_bit in (True, False):
        p = nn.Parameter(start.clone())
        optimizer = make_optimizer(argparse.Namespace(**vars(flags), use_8bit_adam=eight_bit),
                                   [{"params": [p], "lr": 1e-2, "weight_decay": 1e-2}])
        for _ in range(3):
            p.grad = grad.clone()
            optimizer.step()
        results[eight_bit] = (type(optimizer).__name__, p.detach() - start, optimizer.state[p])
    name, update, state = results[True]
    assert name == "AdamW8bit" and state["state1"].dtype == torch.uint8
    reference = results[False][1]
    assert (update - reference).norm() / reference.norm() < 0.05


# --- checkpointed progress ------------------------------------------------------------------------------
def small_run(accelerator, output_dir):
    model = attach(nn.Sequential(nn.Linear(8, 8)), AdapterConfig(method="lora", rank=2, target_modules=["0"]))
    optimizer = torch.optim.AdamW(dreamlora.param_groups(model, lr=1e-2))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    checkpoints.register_adapter_hooks(accelerator, {"unet": accelerator.unwrap_model(model)})
    return model


class RunsCode:
    """A pickle that creates a folder when unpickled: what a hostile checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_progress_is_checkpointed_as_json_and_an_old_pickle_is_refused_unread(tmp_path, fresh_accelerate):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    small_run(accelerator, tmp_path)
    progress = checkpoints.restore_train_state(accelerator, None)
    progress.global_step, progress.epoch, progress.batch_in_epoch = 7, 1, 3
    checkpoint = checkpoints.save_checkpoint(accelerator, tmp_path, 7, None, progress)
    assert json.loads((checkpoint / "progress.json").read_text()) == {"global_step": 7, "epoch": 1,
                                                                        "batch_in_epoch": 3}
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # nothing of ours is pickled

    def resume():
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        again = Accelerator(cpu=True)
        small_run(again, tmp_path)
        return checkpoints.restore_train_state(again, checkpoints.resolve_resume(tmp_path, "latest"))

    assert resume().state_dict() == progress.state_dict()

    # a checkpoint from before this format kept the position in a pickle, which accelerate can only load by
    # unpickling: refused with a clear line, and nothing in it runs
    (checkpoint / "progress.json").unlink()
    marker = tmp_path / "pwned"
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ArgError, match="--resume_from_checkpoint .* older dreamlora that pickled its progress"):
        resume()
    assert not marker.exists()


# --- device, exit codes ---------------------------------------------------------------------------------
def test_device_choice_is_cuda_then_mps_then_cpu(monkeypatch):
    import accelerate

    seen = {}

    class Recorder:
        def __init__(self, **kw):
            seen.update(kw)
            self.device = torch.device("cpu" if kw["cpu"] else "mps")

    monkeypatch.setattr(accelerate, "Accelerator", Recorder)
    args = argparse.Namespace(output_dir="out", logging_dir="logs", gradient_accumulation_steps=1,
                              mixed_precision="no", report_to=None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert launch.device_type() == "mps"
    launch.make_accelerator(args)
    assert seen["cpu"] is False  # Apple GPUs are used, not ignored
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert launch.device_type() == "cpu"
    launch.make_accelerator(args)
    assert seen["cpu"] is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launch.device_type() == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_fp16_without_a_gpu_is_refused_by_name(tmp_path, fresh_accelerate):
    args = argparse.Namespace(output_dir=str(tmp_path), logging_dir="logs", gradient_accumulation_steps=1,
                              mixed_precision="fp16", report_to=None)
    with pytest.raises(ArgError, match="--mixed_precision fp16 needs a CUDA or Apple MPS device"):
        launch.make_accelerator(args)


def raising(error: Exception):
    def main(argv):
        raise error

    return main


def test_exit_codes_follow_exception_types_not_message_text(capsys):
    assert launch.run_cli(raising(ArgError("--rank must be > 0")), []) == 2
    assert launch.run_cli(raising(DataError("--train_file x: no such file")), []) == 2
    assert launch.run_cli(raising(launch.TrainingDiverged("loss became nan")), []) == 1
    assert capsys.readouterr().err.splitlines() == ["error: --rank must be > 0", "error: --train_file x: no such file",
                                                    "error: loss became nan"]
    # a bug whose message happens to mention an adapter word is a bug: it keeps its traceback
    with pytest.raises(ValueError, match="target_modules"):
        launch.run_cli(raising(ValueError("internal: target_modules got lost")), [])
    with pytest.raises(TypeError):
        launch.run_cli(raising(TypeError("AdapterConfig.__init__() got an unexpected keyword")), [])


def test_adapter_errors_become_input_errors_that_name_the_field():
    with pytest.raises(ArgError, match="AdapterConfig.rank=40 exceeds what"), launch.adapter_input():
        attach(nn.Sequential(nn.Linear(32, 8)), AdapterConfig(rank=40, target_modules=["0"]))
