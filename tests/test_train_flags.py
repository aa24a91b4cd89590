"""Every advertised DreamBooth flag runs on the tiny model and changes what it should, and only that.

Runs are in-process (`dreamlora.train.cli`, two optimizer steps each) against one fp32 baseline; gradient
(UNet and text encoder) and latent equalities are checked on the trainer's own functions."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import INSTANCE_DIR, PROMPT, train_in_process

import dreamlora
from dreamlora import train
from pipelines.diffusion import data as dbdata
from pipelines.diffusion.models import load_components
from pipelines.trainer import launch
from pipelines.trainer.method_options import resolve_method_options

COMMON = ("--max_train_steps", 2, "--learning_rate", 1e-3, "--checkpointing_steps", 100)


def run(model_dir, out, *extra, expect: int = 0):
    assert train_in_process(model_dir, out, *extra) == expect
    return out


def adapters(out) -> dict[str, torch.Tensor]:
    return load_file(out / "unet_adapter.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, tmp_path_factory):
    out = run(tiny_model_dir, tmp_path_factory.mktemp("fp32"), *COMMON, "--adapter", "lora")
    assert json.loads((out / "run.json").read_text())["adapter_config"]["init"] == "gaussian"  # diffusers' default
    return adapters(out)


# --- memory flags: same result ---------------------------------------------------------------------------
def components(model_dir, targets=("to_q", "to_v")):
    sd = load_components(str(model_dir))
    for model in (sd.unet, sd.vae, sd.text_encoder):
        model.requires_grad_(False)
    dreamlora.attach(sd.unet, dreamlora.AdapterConfig(rank=4, target_modules=list(targets), init="gaussian"))
    dreamlora.attach(sd.text_encoder, dreamlora.AdapterConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B = 0 at init would leave most gradients zero: move every factor off its init
        for model in (sd.unet, sd.text_encoder):
            for p in (p for p in model.parameters() if p.requires_grad):
                p.add_(0.05 * torch.randn_like(p))
    return sd


def dataset(resolution=64):
    instances = dbdata.read_examples(INSTANCE_DIR, "--instance_data_dir", PROMPT, resolution, is_class=False)
    return dbdata.DreamBoothDataset(instances, [], resolution, True, False, seed=0)


def gradients(sd, batch, checkpointing: bool) -> dict[str, torch.Tensor]:
    if checkpointing:
        sd.unet.enable_gradient_checkpointing()
        sd.text_encoder.gradient_checkpointing_enable()
    sd.unet.train()
    sd.text_encoder.train()
    generators = train.sample_generators(0, 0, batch["rows"])
    latents = train.LatentEncoder(sd.vae, torch.float32, cache=False)(batch, generators)
    states = train.PromptEncoder(sd.tokenizer, sd.text_encoder, None)(batch["prompts"])
    loss = train.denoising_loss(sd.unet, sd.noise_scheduler, latents, states, batch["is_class"], generators,
                                snr_gamma=5.0)["loss"]
    loss.backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate((sd.unet, sd.text_encoder))
             for n, p in m.named_parameters() if p.requires_grad}
    sd.unet.zero_grad(set_to_none=True)
    sd.text_encoder.zero_grad(set_to_none=True)
    sd.unet.disable_gradient_checkpointing()
    sd.text_encoder.gradient_checkpointing_disable()
    return grads


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    sd = components(tiny_model_dir)
    batch = dbdata.collate([dataset()[i] for i in range(2)])
    plain = gradients(sd, batch, checkpointing=False)
    recomputed = gradients(sd, batch, checkpointing=True)
    assert plain.keys() == recomputed.keys() and any(k.startswith("1.") for k in plain)  # both models train
    assert all(plain[k].abs().max() > 0 for k in plain)
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], rtol=1e-5, atol=1e-7)


def test_cached_latents_equal_encoding_every_step(tiny_model_dir):
    """The cache keeps each image's VAE mean and std; a step samples them with the row's generator, which
    is exactly what encoding the batch and sampling does (`--center_crop`, the same generators)."""
    sd = components(tiny_model_dir)
    data = dataset()
    cached = train.LatentEncoder(sd.vae, torch.float32, cache=True)
    cached.fill_cache(data)
    batch = dbdata.collate([data[i] for i in (3, 1)])
    fresh = train.LatentEncoder(sd.vae, torch.float32, cache=False)(batch, train.sample_generators(0, 2, batch["rows"]))
    from_cache = cached(batch, train.sample_generators(0, 2, batch["rows"]))
    torch.testing.assert_close(from_cache, fresh, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(from_cache, cached(batch, train.sample_generators(0, 3, batch["rows"])))  # a new draw


def test_checkpointing_and_cached_latents_train_as_the_baseline(baseline, tiny_model_dir, tmp_path):
    out = run(tiny_model_dir, tmp_path / "memory", *COMMON, "--adapter", "lora", "--gradient_checkpointing",
              "--cache_latents")
    difference = max_difference(adapters(out), baseline)
    print(f"--gradient_checkpointing --cache_latents vs plain: max |difference| {difference:.1e}")
    assert difference <= 1e-5


# --- precision and optimizer: adapters stay fp32, results stay close ----------------------------------------
def update_error(out, baseline) -> float:
    """‖B − B_fp32‖ / ‖B_fp32‖ over every LoRA up factor: B starts at zero, so B is the whole update (A's
    shared random init would hide differences in a comparison of A)."""
    got = adapters(out)
    ups = [k for k in got if "lora_B" in k]
    diff = sum((got[k] - baseline[k]).float().norm() ** 2 for k in ups) ** 0.5
    return (diff / sum(baseline[k].float().norm() ** 2 for k in ups) ** 0.5).item()


def test_bf16_keeps_adapters_fp32_and_close_to_fp32(baseline, tiny_model_dir, tmp_path):
    out = run(tiny_model_dir, tmp_path / "bf16", *COMMON, "--adapter", "lora", "--mixed_precision", "bf16")
    assert {v.dtype for v in adapters(out).values()} == {torch.float32}
    summary = json.loads((out / "run.json").read_text())
    assert summary["mixed_precision"] == "bf16"
    error = update_error(out, baseline)
    print(f"bf16 vs fp32: relative update difference {error:.3f}")
    # measured 0.12 (early Adam steps follow gradient signs); an unrelated update of equal size gives ~1.4
    assert 0 < error < 0.35


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 trains with a GradScaler on a GPU only; on the CPU "
                    "the trainer refuses it (tested in test_train_numerics)")
def test_fp16_keeps_adapters_fp32_and_close_to_fp32(baseline, tiny_model_dir, tmp_path):
    out = run(tiny_model_dir, tmp_path / "fp16", *COMMON, "--adapter", "lora", "--mixed_precision", "fp16")
    assert {v.dtype for v in adapters(out).values()} == {torch.float32}
    assert update_error(out, baseline) < 0.35


def test_8bit_adam_trains_with_bitsandbytes_state(baseline, tiny_model_dir, tmp_path):
    out = run(tiny_model_dir, tmp_path / "adam8", *COMMON, "--adapter", "lora", "--use_8bit_adam")
    state = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)["state"]
    moments = [s.get("__bnb_optimizer_quant_state__", s) for s in state.values()]
    assert moments and all("state1" in m and "exp_avg" not in m for m in moments)  # bitsandbytes' own moments
    error = update_error(out, baseline)
    print(f"AdamW8bit vs AdamW: relative update difference {error:.2e}")
    assert error < 0.05  # these small factors keep 32-bit moments (bitsandbytes quantizes ≥ 4096 entries)


# --- loss flags on a v-prediction model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def vpred_model_dir(tmp_path_factory):
    from pipelines.diffusion import tiny_model as tiny

    return tiny.write(tmp_path_factory.mktemp("tiny-v") / "model", prediction_type="v_prediction")


def test_snr_gamma_and_noise_offset_on_a_v_prediction_model(vpred_model_dir, tmp_path, monkeypatch):
    """Each training loss is recomputed on the same draws without the flag: --snr_gamma changes the loss
    (weights min(SNR, 5)/(SNR+1) for v), --noise_offset changes the noise, and the target is the velocity."""
    real = train.denoising_loss
    seen = []

    def recording(unet, scheduler, latents, states, is_class, generators, **kw):
        saved = [g.get_state() for g in generators]

        def again(**change):
            gens = [torch.Generator().set_state(s) for s in saved]
            with torch.no_grad():
                return real(unet, scheduler, latents, states, is_class, gens, **{**kw, **change})["loss"].item()

        parts = real(unet, scheduler, latents, states, is_class, generators, **kw)
        if seen:  # the first step is enough, and the recomputations cost three UNet calls
            return parts
        seen.append({"kind": scheduler.config.prediction_type, "gamma": kw["snr_gamma"],
                     "offset": kw["noise_offset"], "loss": parts["loss"].item(), "same": again(),
                     "unweighted": again(snr_gamma=None), "no_offset": again(noise_offset=0.0)})
        return parts

    monkeypatch.setattr(train, "denoising_loss", recording)
    run(vpred_model_dir, tmp_path / "v", *COMMON, "--adapter", "lora", "--snr_gamma", 5, "--noise_offset", 0.1)
    assert len(seen) == 1
    for step in seen:
        assert (step["kind"], step["gamma"], step["offset"]) == ("v_prediction", 5.0, 0.1)
        assert step["same"] == pytest.approx(step["loss"], rel=1e-6)  # the recomputation is faithful
        assert abs(step["unweighted"] - step["loss"]) > 1e-3 * step["loss"]
        assert abs(step["no_offset"] - step["loss"]) > 1e-4 * step["loss"]


# --- SingLoRA's ramp and init as the trainer resolves them -----------------------------------------------------
def stored_config(file) -> dict:
    with safe_open(str(file), framework="pt") as f:
        return json.loads(f.metadata()["config"])


def test_singlora_ramp_is_one_percent_of_the_run_and_survives_a_resume(tiny_model_dir, tmp_path, monkeypatch):
    """No --singlora_ramp_steps: T = 1 % of the optimizer steps, rounded half up (150 steps → 2). A resume
    with --max_train_steps 250 (which alone would give 3) keeps the checkpoint's T."""
    monkeypatch.setattr(launch, "install_stop_signal", lambda: lambda: True)  # stop after one step
    out = tmp_path / "ramp"
    flags = ("--adapter", "singlora", "--checkpointing_steps", 1000, "--learning_rate", 1e-3)
    run(tiny_model_dir, out, *flags, "--max_train_steps", 150)
    first = json.loads((out / "run.json").read_text())
    assert first["steps"] == 1 and not first["finished"]
    assert first["args"]["singlora_ramp_steps"] == first["adapter_config"]["options"]["ramp_steps"] == 2
    assert first["adapter_config"]["init"] == "scaled"  # SingLoRA's own init, not train.py's gaussian
    assert stored_config(out / "checkpoint-1" / "unet_adapter.safetensors")["options"]["ramp_steps"] == 2

    run(tiny_model_dir, out, *flags, "--max_train_steps", 250, "--resume_from_checkpoint", "latest")
    resumed = json.loads((out / "run.json").read_text())
    assert resumed["steps"] == 2 and resumed["adapter_config"]["options"]["ramp_steps"] == 2
    assert stored_config(out / "unet_adapter.safetensors")["options"]["ramp_steps"] == 2
    run(tiny_model_dir, out, *flags, "--max_train_steps", 250, "--resume_from_checkpoint", "latest",
        "--singlora_ramp_steps", 7, expect=2)


def test_resolve_ramp_steps_rule(tmp_path):
    def resolved(given, steps):
        args = argparse.Namespace(adapter="singlora", singlora_ramp_steps=given, loraplus_ratio=None,
                                  rank=4, alpha=4.0)
        options = resolve_method_options(args, steps, None)
        assert args.singlora_ramp_steps == options["ramp_steps"]  # run.json's args show the value used
        return options["ramp_steps"]

    assert [resolved(None, n) for n in (1, 49, 50, 150, 1000, 20000)] == [1, 1, 1, 2, 10, 200]
    assert resolved(0, 1000) == 0  # an explicit value, even "no ramp", wins
    lora = argparse.Namespace(adapter="lora", singlora_ramp_steps=None, loraplus_ratio=None, rank=4, alpha=4.0)
    assert resolve_method_options(lora, 1000, None) == {} and lora.singlora_ramp_steps is None


# --- class images ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_sdxl_dir"])
def test_class_images_come_from_the_components_already_loaded(model, request, tmp_path, monkeypatch):
    """No second copy of the model: the class-image pipeline wraps the trainer's UNet, VAE and text encoder(s)."""
    import diffusers

    def refuse(*a, **k):
        raise AssertionError("a second pipeline was loaded from disk")

    model_dir = request.getfixturevalue(model)
    for cls in (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    sd = load_components(str(model_dir))
    args = argparse.Namespace(pretrained_model_name_or_path=str(model_dir), revision=None, variant=None)
    pipe = train.inference_pipeline(args, sd)
    assert pipe.unet is sd.unet and pipe.vae is sd.vae and pipe.text_encoder is sd.text_encoder
    assert getattr(pipe, "text_encoder_2", None) is sd.text_encoder_2
    # the model's own sampler, not the training DDPM
    assert type(pipe.scheduler).__name__ == ("EulerDiscreteScheduler" if sd.is_sdxl else "PNDMScheduler")
    image = pipe("a photo of dog", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
