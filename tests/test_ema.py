"""`--use_ema`: the average of the trained weights, its schedule, its output folder, validation, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import METHOD_NAMES
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from train_helpers import PROMPT, kill_after_checkpoint, run_train, train_cmd, train_in_process

import dreamlora
from dreamlora import AdapterConfig, attach
from dreamlora.errors import ArgError
from dreamlora.methods import METHODS
from dreamlora.train_args import parse_args
from pipelines.trainer import loop
from pipelines.trainer.ema import CHECKPOINT_FILE, EMA_DIR, AdapterEMA, decay_at

DECAY = 0.2  # small enough that the cap binds at the third update (min(0.2, 3/12)), so both branches are used
STEPS = 3
COMPONENTS = ("unet", "text_encoder")
VALIDATION = ("--validation_prompt", "a dog", "--num_validation_images", 1, "--validation_inference_steps", 3,
              "--validation_steps", 100)  # drawn once, at the last step


@pytest.fixture(scope="module")
def ema_run(tiny_model_dir, tmp_path_factory):
    """3 optimizer steps of 2 micro-batches each, UNet and text encoder trained, a checkpoint after every step
    (it holds the raw weights after that step) and a validation image at the last step."""
    out = tmp_path_factory.mktemp("ema-run")
    assert train_in_process(tiny_model_dir, out, "--use_ema", "--ema_decay", DECAY, "--max_train_steps", STEPS,
                            "--gradient_accumulation_steps", 2, "--checkpointing_steps", 1, "--train_text_encoder",
                            "--learning_rate", 5e-2, "--text_encoder_lr", 5e-2, *VALIDATION) == 0
    return out


def updates_in(checkpoint) -> int:
    with safe_open(str(checkpoint / CHECKPOINT_FILE), framework="pt") as f:
        return int(f.metadata()["updates"])


def test_the_schedule_is_diffusers_emamodel_with_its_defaults():
    """d_1 = 0, then min(decay, (1+s)/(10+s)) with s = k-1, as diffusers' EMAModel.get_decay."""
    assert [decay_at(k, 0.999) for k in (1, 2, 3)] == [0.0, 2 / 11, 3 / 12]
    assert decay_at(3, DECAY) == DECAY and decay_at(10_000, 0.999) == 0.999


def test_ema_equals_the_hand_computed_average_updated_once_per_optimizer_step(ema_run):
    """checkpoint-k holds the raw weights after optimizer step k; the average over them by hand, in float64, is the
    ema/ output. With 2 micro-batches per step an update per micro-batch would count 6 and average the same
    weights twice: the update count in each checkpoint and the values both rule that out."""
    assert [updates_in(ema_run / f"checkpoint-{k}") for k in range(1, STEPS + 1)] == [1, 2, 3]
    for component in COMPONENTS:
        raw = [load_file(ema_run / f"checkpoint-{k}" / f"{component}_adapter.safetensors") for k in (1, 2, 3)]
        ema = load_file(ema_run / EMA_DIR / f"{component}_adapter.safetensors")
        assert ema.keys() == raw[0].keys()
        for key in ema:
            expected = raw[0][key].double()
            for k, weights in enumerate(raw[1:], start=2):
                d = min(DECAY, (1 + (k - 1)) / (10 + (k - 1)))
                expected = d * expected + (1 - d) * weights[key].double()
            torch.testing.assert_close(ema[key].double(), expected, rtol=0, atol=1e-6)
        final = load_file(ema_run / f"{component}_adapter.safetensors")
        moved = max((ema[k] - final[k]).abs().max().item() for k in ema)
        assert moved > 1e-3  # the average is not the final weights: the comparison above has something to find


def test_the_ema_folder_holds_the_output_files_of_the_averaged_weights(ema_run, tiny_model_dir):
    """ema/ has the same adapter and tool files as the run's own output; run.json records the average; the files
    load in dreamlora and in diffusers and give the same image, which is not the raw weights' image."""
    from pipelines.diffusion.sample import load_pipeline

    files = {p.name for p in ema_run.glob("*.safetensors")}
    assert files >= {"unet_adapter.safetensors", "text_encoder_adapter.safetensors",
                     "pytorch_lora_weights.safetensors", "kohya_lora.safetensors"}
    assert {p.name for p in (ema_run / EMA_DIR).glob("*.safetensors")} == files
    record = json.loads((ema_run / "run.json").read_text())["ema"]
    assert record["dir"] == EMA_DIR and record["decay"] == DECAY and record["updates"] == STEPS

    def image(load) -> np.ndarray:
        pipe = load_pipeline(str(tiny_model_dir), device="cpu")
        load(pipe)
        out = pipe(PROMPT, num_inference_steps=4, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]
        return np.round(out * 255).astype(np.int16)

    def ours(folder):
        return lambda pipe: [dreamlora.load(getattr(pipe, c), folder / f"{c}_adapter.safetensors") for c in COMPONENTS]

    averaged = image(ours(ema_run / EMA_DIR))
    in_diffusers = image(lambda pipe: pipe.load_lora_weights(ema_run / EMA_DIR,
                                                             weight_name="pytorch_lora_weights.safetensors"))
    raw = image(ours(ema_run))
    assert np.abs(averaged - in_diffusers).max() <= 2
    assert np.abs(averaged - raw).max() > 2


def test_validation_images_are_drawn_with_the_averaged_weights(ema_run, tiny_model_dir):
    """The preview at the last step is what the ema/ weights draw the way `run_validation` draws (seed --seed,
    the model's own scheduler), and not what the raw weights draw."""
    from PIL import Image

    from pipelines.diffusion.sample import load_pipeline

    preview = np.asarray(Image.open(ema_run / "validation" / f"step-{STEPS:06d}-0.png")).astype(np.int16)

    def drawn(folder) -> np.ndarray:
        pipe = load_pipeline(str(tiny_model_dir), device="cpu")
        for c in COMPONENTS:
            dreamlora.load(getattr(pipe, c), folder / f"{c}_adapter.safetensors")
        pipe.set_progress_bar_config(disable=True)
        out = pipe(["a dog"], generator=torch.Generator().manual_seed(0), num_inference_steps=3, height=64,
                   width=64).images[0]
        return np.asarray(out).astype(np.int16)

    assert np.abs(preview - drawn(ema_run / EMA_DIR)).max() <= 1
    assert np.abs(preview - drawn(ema_run)).max() > 1


@pytest.mark.slow  # a repeat of the core's check for this feature: `pytest -m slow`
def test_sigkill_after_a_checkpoint_then_resume_gives_the_uninterrupted_runs_ema(tiny_model_dir, tmp_path):
    """The shadow and its update count ride in every checkpoint: a run killed after checkpoint 3 and resumed
    writes the ema/ files of a run never interrupted (a shadow restarted on resume would not)."""
    common = ["--use_ema", "--max_train_steps", 8, "--checkpointing_steps", 3, "--learning_rate", 1e-2,
              "--train_text_encoder", "--text_encoder_lr", 1e-2, "--random_flip"]
    reference = tmp_path / "uninterrupted"
    run_train(tiny_model_dir, reference, *common)

    killed = tmp_path / "killed"
    kill_after_checkpoint(train_cmd(tiny_model_dir, killed, *common), killed, 3)
    assert (killed / "checkpoint-3" / CHECKPOINT_FILE).is_file() and not (killed / EMA_DIR).exists()
    run_train(tiny_model_dir, killed, *common, "--resume_from_checkpoint", "latest")

    for component in COMPONENTS:
        a = load_file(reference / EMA_DIR / f"{component}_adapter.safetensors")
        b = load_file(killed / EMA_DIR / f"{component}_adapter.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert json.loads((killed / "run.json").read_text())["ema"]["updates"] == 8


def test_resuming_a_checkpoint_saved_without_ema_starts_the_average_there(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert train_in_process(tiny_model_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2) == 0
    assert train_in_process(tiny_model_dir, out, "--max_train_steps", 4, "--use_ema",
                            "--resume_from_checkpoint", "latest") == 0
    assert json.loads((out / "run.json").read_text())["ema"]["updates"] == 2


# --- bad input ------------------------------------------------------------------------------------------------
def base_args(tmp_path):
    return ["--pretrained_model_name_or_path", "unused", "--instance_data_dir", "unused", "--instance_prompt",
            PROMPT, "--output_dir", str(tmp_path / "out")]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_use_ema_is_refused_for_methods_that_declare_their_weights_cannot_be_averaged(method, tmp_path):
    """One line at flag-parse time naming --use_ema, the method and why (`AdapterLayer.averaging_note`)."""
    cls = METHODS[method]
    if cls.averageable:
        assert parse_args(base_args(tmp_path) + ["--use_ema", "--adapter", method]).use_ema
        return
    with pytest.raises(ArgError) as e:
        parse_args(base_args(tmp_path) + ["--use_ema", "--adapter", method])
    assert str(e.value).startswith(f"--use_ema: {method} adapters cannot be averaged: ") and cls.averaging_note
    assert "\n" not in str(e.value)


def test_relora_and_adalora_declare_that_they_cannot_be_averaged():
    assert not METHODS["relora"].averageable and not METHODS["adalora"].averageable
    assert METHODS["lora"].averageable and METHODS["dora"].averageable


def test_the_average_refuses_an_attached_adapter_that_cannot_be_averaged():
    """The same refusal when the models are built in code (a plugin method, another trainer)."""
    model = attach(nn.Sequential(nn.Linear(8, 8)), AdapterConfig(method="relora", rank=2, target_modules=["0"],
                                                                 options={"steps": 2}))
    with pytest.raises(ArgError, match="--use_ema: relora adapters cannot be averaged"):
        AdapterEMA({"model": model}, 0.999)


@pytest.mark.parametrize("decay", ["0", "1", "1.5", "-0.1"])
def test_ema_decay_outside_zero_one_is_refused(decay, tmp_path):
    with pytest.raises(ArgError, match=f"--ema_decay must be in \\(0, 1\\), got {float(decay)}"):
        parse_args(base_args(tmp_path) + ["--ema_decay", decay])


# --- the averaging object -----------------------------------------------------------------------------------
def lora_model(dtype=torch.float32):
    model = nn.Sequential(nn.Linear(8, 8)).to(dtype)
    return attach(model, AdapterConfig(method="lora", rank=2, target_modules=["0"]))


def test_the_shadow_is_fp32_and_the_swap_puts_the_live_weights_back_bit_for_bit():
    """fp32 shadow whatever the base's dtype; inside `swapped_in` the model holds the average, after it (even
    after an error) exactly the weights it had."""
    model = lora_model(torch.bfloat16)
    ema = AdapterEMA({"model": model}, 0.999)
    params = dict(ema.params)
    assert params and all(v.dtype == torch.float32 for v in ema.shadow.values())
    assert all(".adapters." in k for k in params)  # the frozen base is not averaged
    for _ in range(3):
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn_like(p))
        ema.update()
    before = {k: p.detach().clone() for k, p in params.items()}
    with pytest.raises(RuntimeError), ema.swapped_in():
        for key, p in params.items():
            assert torch.equal(p, ema.shadow[key]) and not torch.equal(p, before[key])
        raise RuntimeError("a validation that fails")
    assert all(torch.equal(p, before[k]) for k, p in params.items())


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_a_step_the_fp16_scaler_skips_does_not_update_the_average(fresh_accelerate):
    """A GradScaler that finds inf gradients skips the optimizer step: the weights do not move, and the average
    must not count the step (a second average of the same weights would move it). torch's scaler, on CPU."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # what fp16 on a GPU would install
    model = lora_model()
    ema = AdapterEMA({"model": model}, 0.999)
    optimizer = torch.optim.AdamW(dreamlora.param_groups(model, lr=1e-1))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    x = torch.randn(4, 8)
    weights = []
    for poisoned in (False, True, False):
        loss = model(x).square().mean() * (float("inf") if poisoned else 1.0)
        accelerator.backward(loss)
        loop.optimizer_step(accelerator, optimizer, schedule, params, 1.0, [model], hooks=[ema])
        if not accelerator.optimizer_step_was_skipped:
            weights.append({k: p.detach().double().clone() for k, p in ema.params.items()})
    assert ema.updates == 2 and len(weights) == 2
    d = decay_at(2, 0.999)
    for key, shadow in ema.shadow.items():
        torch.testing.assert_close(shadow.double(), d * weights[0][key] + (1 - d) * weights[1][key],
                                   rtol=0, atol=1e-7)
