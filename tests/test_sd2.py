"""SD 2.x end to end on the tiny SD 2.x preset (`python -m dreamlora.tiny OUT --preset sd2`): SD 2.1's traits as its
diffusers folder ships them; train -> unmodified diffusers loads the same image, for every method with and without
the text encoder; the loss is taken against the velocity; the kohya file says SD 2.x; exact resume; two processes.
Beside them, what SD 1.x and 2.x share and was found broken: two processes training the text encoder, and the
merged folder of a bf16 run loading with a plain `from_pretrained`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from importlib.metadata import version

import numpy as np
import pytest
import torch
from conftest import method_params
from packaging.version import Version
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import (
    PROMPT,
    ROOT,
    image_of,
    launch_two,
    run_train,
    train_cmd,
    train_in_process,
    trained_on_first_use,
)

from pipelines.diffusion import tiny_model as tiny
from pipelines.diffusion.sample import main as sample_main

LEARN_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2,ff.net.0.proj,ff.net.2"
# offline, diffusers < 0.40 cannot find the file without its name
WEIGHT = {"weight_name": "pytorch_lora_weights.safetensors"} if Version(version("diffusers")) < Version("0.40") else {}


def digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_sd2_preset_has_sd21s_traits(tiny_sd2_dir, tmp_path):
    """What stabilityai/stable-diffusion-2-1 (768-v) ships in diffusers format, at tiny widths: a DDIM v-prediction
    scheduler with SD's betas, a CLIPTextModel with plain gelu and SD 2.1's token ids (0/2/1), a tokenizer padding
    with "!" (id 0), a UNet with head counts per level, linear projections and upcast attention."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2_dir)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    schedule = pipe.scheduler.config
    assert (schedule.prediction_type, schedule.beta_schedule, schedule.beta_start, schedule.beta_end,
            schedule.steps_offset, schedule.clip_sample, schedule.set_alpha_to_one) == (
        "v_prediction", "scaled_linear", 0.00085, 0.012, 1, False, False)
    text = pipe.text_encoder.config
    assert (text.hidden_act, text.bos_token_id, text.eos_token_id, text.pad_token_id) == ("gelu", 0, 2, 1)
    unet = pipe.unet.config
    assert unet.use_linear_projection and unet.upcast_attention and list(unet.attention_head_dim) == [4, 8]
    assert unet.cross_attention_dim == text.hidden_size == 48  # not the tiny SD 1.x model's 32
    assert pipe.tokenizer("a photo of sks dog", padding="max_length", max_length=9).input_ids == [
        49406, 320, 1125, 539, 48136, 1929, 49407, 0, 0]
    image = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and image.std() > 0.01
    again = tiny.write(tmp_path / "again", preset="sd2")  # seeded: the same weights
    assert digest(again) == digest(tiny_sd2_dir) and len(digest(again)) == 3
    eps = tiny.write(tmp_path / "eps", preset="sd2", prediction_type="epsilon")  # SD 2.x-base-like
    assert json.loads((eps / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"


def test_sd2_full_preset_has_sd21s_parameter_counts():
    """Built on the meta device: SD 2.1's UNet (865,910,724 parameters) and its 23-layer OpenCLIP ViT-H text
    encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from pipelines.diffusion.sd_configs import build_sd21_unet

    unet, vae, text = tiny.PRESETS["sd2_full"]
    with torch.device("meta"):
        counts = [sum(p.numel() for p in m.parameters()) for m in (
            UNet2DConditionModel(**unet), CLIPTextModel(tiny.clip_text_config(text)))]
    assert counts == [865_910_724, 340_387_840]
    assert sum(p.numel() for p in build_sd21_unet("meta").parameters()) == 865_910_724
    assert vae["sample_size"] == 768 and text["num_hidden_layers"] == 23


@pytest.fixture(scope="module")
def sd2_runs(tiny_sd2_dir, tmp_path_factory):
    """Short, strong runs on the tiny SD 2.x model, trained on first use."""
    return trained_on_first_use(tiny_sd2_dir, tmp_path_factory, "sd2")


@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet+text_encoder"])
@pytest.mark.parametrize("method", method_params())
def test_diffusers_load_lora_weights_gives_the_image_of_pipelines_sample(method, text_encoder, sd2_runs,
                                                                          tiny_sd2_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = sd2_runs(method, text_encoder)
    assert (run / "text_encoder_adapter.safetensors").is_file() == text_encoder
    assert sample_main(["--pretrained_model_name_or_path", str(tiny_sd2_dir), "--adapter", str(run), "--prompt",
                        PROMPT, "--num_inference_steps", "4", "--height", "64", "--width", "64", "--device", "cpu",
                        "--output_dir", str(tmp_path)]) == 0
    ours = np.asarray(Image.open(tmp_path / "0000_0.png")).astype(np.int16)

    reference = StableDiffusionPipeline.from_pretrained(tiny_sd2_dir)  # the DDIM v-prediction sampler it ships
    base = image_of(reference)
    reference.load_lora_weights(run, **WEIGHT)
    theirs = image_of(reference)
    prefixes = {k.split(".")[0] for k in load_file(run / "pytorch_lora_weights.safetensors")}
    assert prefixes == ({"unet", "text_encoder"} if text_encoder else {"unet"})
    assert np.abs(ours - base).max() > 10  # the adapter visibly changes the image
    assert np.abs(ours - theirs).max() <= 2
    if text_encoder:
        assert reference.text_encoder.peft_config, "diffusers did not load the text encoder's adapter"


@pytest.mark.parametrize("method", ["lora", "loha"])
def test_kohya_file_says_sd2_and_loads_through_diffusers_converter(method, sd2_runs, tiny_sd2_dir, tmp_path):
    """The kohya header carries `ss_v2: "True"` (without it A1111 files the LoRA under SD 1.x and hides it from SD 2.x
    checkpoints) and kohya's version string for a v-prediction SD 2.x base; LoRA's file reads through diffusers'
    kohya converter to the image of the diffusers file (linear proj_in/proj_out included)."""
    from diffusers import StableDiffusionPipeline

    if method == "lora":  # every kind of layer: the linear proj_in/proj_out, feed-forwards, resnet convolutions
        run = tmp_path / "run"
        assert train_in_process(tiny_sd2_dir, run, "--rank", 4, "--max_train_steps", 6, "--learning_rate", 5e-3,
                                "--text_encoder_lr", 5e-3, "--train_text_encoder", "--checkpointing_steps", 100,
                                "--target_modules", f"{LEARN_TARGETS},proj_in,proj_out") == 0
    else:
        run = sd2_runs(method, True)
    with safe_open(str(run / "kohya_lora.safetensors"), framework="pt") as f:
        header, keys = f.metadata(), list(f.keys())
    assert header["ss_v2"] == "True" and header["ss_base_model_version"] == "sd_v2_v"
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    if method != "lora":  # LoHa's native LyCORIS keys: diffusers' converter reads LoRA keys only
        return
    assert {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            "lora_unet_up_blocks_1_attentions_0_proj_out.lora_down.weight"} <= set(keys)
    via_peft, via_kohya = (StableDiffusionPipeline.from_pretrained(tiny_sd2_dir) for _ in range(2))
    via_peft.load_lora_weights(run, **WEIGHT)
    via_kohya.load_lora_weights(run, weight_name="kohya_lora.safetensors")
    assert np.abs(image_of(via_peft) - image_of(via_kohya)).max() <= 2


def test_sd1_kohya_header_is_unchanged(tiny_model_dir, tmp_path):
    """SD 1.x files keep the header A1111 reads as SD 1.x (no ss_v2)."""
    assert train_in_process(tiny_model_dir, tmp_path, "--max_train_steps", 1, "--checkpointing_steps", 100) == 0
    with safe_open(str(tmp_path / "kohya_lora.safetensors"), framework="pt") as f:
        assert "ss_v2" not in f.metadata() and "ss_base_model_version" not in f.metadata()


def test_the_loss_is_taken_against_the_velocity(tiny_sd2_dir, tmp_path, monkeypatch):
    """On a v-prediction base every training step's target is v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (Salimans & Ho 2022, §4),
    computed here by hand from what was noised: an ε target fails this."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    noised, targets = [], []
    add_noise, mse = DDPMScheduler.add_noise, F.mse_loss

    def spy_add_noise(self, original, noise, timesteps):
        noised.append((original.detach().float().clone(), noise.detach().float().clone(), timesteps.clone(),
                       self.alphas_cumprod.clone()))
        return add_noise(self, original, noise, timesteps)

    def spy_mse(prediction, target, *args, **kw):
        targets.append(target.detach().float().clone())
        return mse(prediction, target, *args, **kw)

    monkeypatch.setattr(DDPMScheduler, "add_noise", spy_add_noise)
    monkeypatch.setattr(F, "mse_loss", spy_mse)
    assert train_in_process(tiny_sd2_dir, tmp_path, "--max_train_steps", 3, "--train_batch_size", 2,
                            "--checkpointing_steps", 100, "--no_kohya_format") == 0
    assert len(noised) == len(targets) == 3
    for (x0, noise, t, alphas_cumprod), target in zip(noised, targets, strict=True):
        a = alphas_cumprod[t].float().view(-1, 1, 1, 1)
        velocity = a.sqrt() * noise - (1 - a).sqrt() * x0
        torch.testing.assert_close(target, velocity)
        assert (target - noise).abs().max() > 0.1


@pytest.mark.slow  # a repeat of the core's check for this feature: `pytest -m slow`
def test_sd2_sigkill_then_resume_latest_matches_an_uninterrupted_run(tiny_sd2_dir, tmp_path):
    common = ["--adapter", "lora", "--train_text_encoder", "--random_flip", "--gradient_accumulation_steps", 2,
              "--max_train_steps", 8, "--checkpointing_steps", 3, "--learning_rate", 1e-3, "--text_encoder_lr", 1e-3,
              "--lr_scheduler", "cosine", "--lr_warmup_steps", 2, "--no_kohya_format"]
    reference = tmp_path / "uninterrupted"
    run_train(tiny_sd2_dir, reference, *common)

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(train_cmd(tiny_sd2_dir, killed, *common), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    progress = killed / "progress.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if progress.is_file() and '"event": "checkpoint", "step": 3' in progress.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint-3").is_dir() and not (killed / "unet_adapter.safetensors").exists()
    run_train(tiny_sd2_dir, killed, *common, "--resume_from_checkpoint", "latest")

    for component in ("unet", "text_encoder"):
        a = load_file(reference / f"{component}_adapter.safetensors")
        b = load_file(killed / f"{component}_adapter.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
        assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # it trained
    resumed = json.loads((killed / "run.json").read_text())
    assert resumed["resumed_from"] and resumed["steps"] == 8


@pytest.mark.slow  # a repeat of the core's check for this feature: `pytest -m slow`
@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_two_processes_training_the_text_encoder_train_what_one_process_trains(model, tiny_model_dir, tiny_sd2_dir,
                                                                               tmp_path):
    """Two gloo processes with batch 1 against one with batch 2, UNet and text encoder trained. The prompts go
    through the DDP-wrapped text encoder (`encode_prompts` asks the weights for their device, not the wrapper, which
    needs no `.device`). Tolerance 2e-6 absolute at lr 1e-4, where the adapters move 3e-4: Adam turns float32
    reduction-order noise into differences that scale with the lr (measured: SD 1.x 1.2e-7, SD 2.x 1.3e-6 on its
    UNet)."""
    model_dir = tiny_model_dir if model == "sd1" else tiny_sd2_dir
    flags = ("--adapter", "lora", "--max_train_steps", 3, "--checkpointing_steps", 100, "--train_text_encoder",
             "--learning_rate", 1e-4, "--text_encoder_lr", 1e-4, "--no_kohya_format")
    out = tmp_path / "ddp"
    cmd = [*launch_two(), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd(model_dir, out, *flags)[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert train_in_process(model_dir, tmp_path / "one", *flags, "--train_batch_size", 2) == 0
    for component in ("unet", "text_encoder"):
        two, one = (load_file(d / f"{component}_adapter.safetensors") for d in (out, tmp_path / "one"))
        assert two.keys() == one.keys()
        difference = max((two[k] - one[k]).abs().max().item() for k in two)
        moved = max(v.abs().max().item() for k, v in two.items() if "lora_B" in k)
        print(f"{model} {component}: two processes vs one: max |difference| {difference:.1e}, largest B {moved:.1e}")
        assert moved > 1e-4 and difference <= 2e-6


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_a_bf16_runs_merged_folder_loads_with_a_plain_from_pretrained(model, tiny_model_dir, tiny_sd2_dir, tmp_path):
    """`--save_merged` under bf16 writes fp32 weights, as diffusers' fine-tuning scripts save pipelines: a folder of
    bf16 encoders beside an fp32-loading UNet fails at the first cross-attention ("mat1 and mat2 must have the same
    dtype") without a dtype argument."""
    from diffusers import StableDiffusionPipeline

    model_dir = tiny_model_dir if model == "sd1" else tiny_sd2_dir
    out = tmp_path / "out"
    assert train_in_process(model_dir, out, "--mixed_precision", "bf16", "--max_train_steps", 2,
                            "--train_text_encoder", "--learning_rate", 5e-3, "--text_encoder_lr", 5e-3,
                            "--save_merged", "--checkpointing_steps", 100, "--no_kohya_format") == 0
    merged = StableDiffusionPipeline.from_pretrained(out / "merged")
    assert np.isfinite(image_of(merged)).all()
    files = [*(out / "merged").glob("*/diffusion_pytorch_model.safetensors"), *(out / "merged").glob(
        "*/model.safetensors")]
    assert len(files) == 3  # unet, vae, text_encoder
    assert {t.dtype for f in files for t in load_file(f).values()} == {torch.float32}
    # the adapters are folded in: against the base rounded to bf16 (the run's dtype), exactly the adapted layers changed
    base = StableDiffusionPipeline.from_pretrained(model_dir)
    merged_unet = merged.unet.state_dict()
    changed = {name.rsplit(".", 2)[-2] for name, weight in base.unet.state_dict().items()
               if not torch.equal(weight.to(torch.bfloat16).float(), merged_unet[name])}
    assert changed == {"to_q", "to_k", "to_v", "0"}  # the default targets (to_out.0)


def test_dreambench_on_sd2_with_an_adapter(sd2_runs, tiny_sd2_dir, tmp_path):
    from pipelines.diffusion.dreambench import main as dreambench_main

    run = sd2_runs("lora", True)
    assert dreambench_main(["--pretrained_model_name_or_path", str(tiny_sd2_dir), "--subject", "dog",
                            "--adapter", str(run), "--num_images_per_prompt", "1", "--max_prompts", "2",
                            "--num_inference_steps", "2", "--height", "64", "--width", "64",
                            "--output_dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["method"] == "lora"


def test_an_sd1_adapter_on_the_sd2_model_is_refused(tiny_model_dir, tiny_sd2_dir, tmp_path, capsys):
    assert train_in_process(tiny_model_dir, tmp_path / "sd1", "--max_train_steps", 1, "--checkpointing_steps", 100,
                            "--no_kohya_format") == 0
    code = sample_main(["--pretrained_model_name_or_path", str(tiny_sd2_dir), "--adapter", str(tmp_path / "sd1"),
                        "--prompt", PROMPT, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "unet_adapter" in err, err
    assert not (tmp_path / "out" / "0000_0.png").exists()
