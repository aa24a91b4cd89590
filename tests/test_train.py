"""DreamBooth training end to end on the embedded tiny model and real photos."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import METHOD_NAMES
from PIL import Image
from safetensors.torch import load_file
from train_helpers import (
    PROMPT,
    ROOT,
    instance_latents,
    kill_after_checkpoint,
    launch_two,
    prompt_states,
    run_train,
    train_cmd,
    train_in_process,
)

import dreamlora
from pipelines.diffusion.loss import fixed_pairs_loss
from pipelines.diffusion.sample import AdapterSpec, apply_adapters, generate, load_pipeline

METHODS = METHOD_NAMES
# AdaLoRA's update starts at third order (E = 0, A and B ~ N(0, 0.02²), as PEFT): six steps at 5e-3 leave the
# image unchanged, so the file-equality check below would prove nothing
STRONG_LR = {"adalora": 5e-2}
LEARN_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2,ff.net.0.proj,ff.net.2"


@pytest.fixture(scope="module")
def trained_runs(tiny_model_dir, tmp_path_factory):
    """One short, strong run per method, with the text encoder trained too."""
    runs = {}
    for method in METHODS:
        out = tmp_path_factory.mktemp(f"run-{method}")
        lr = STRONG_LR.get(method, 5e-3)
        assert train_in_process(tiny_model_dir, out, "--adapter", method, "--rank", 4, "--max_train_steps", 6,
                                "--learning_rate", lr, "--text_encoder_lr", lr, "--train_text_encoder",
                                "--singlora_ramp_steps", 2, "--relora_steps", 3, "--output_kohya_format",
                                "--checkpointing_steps", 100) == 0  # ReLoRA: one merge (the default, 6 // 4, merges
        # every step: each cycle then trains B alone for one step, too weak a change for the image check below)
        runs[method] = out
    return runs


def images(pipe, seed: int = 0) -> np.ndarray:
    out = pipe(PROMPT, num_inference_steps=4, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(seed)).images[0]
    return np.round(out * 255).astype(np.int16)


@pytest.mark.parametrize("method", METHODS)
def test_diffusers_load_lora_weights_gives_the_same_image(method, trained_runs, tiny_model_dir, tmp_path):
    run = trained_runs[method]
    pipe = load_pipeline(str(tiny_model_dir), "cpu")
    pipe.set_progress_bar_config(disable=True)
    base = images(pipe)
    apply_adapters(pipe, [AdapterSpec(run)])
    generate(pipe, [PROMPT], tmp_path, num_inference_steps=4, height=64, width=64)
    ours = np.asarray(Image.open(tmp_path / "0000_0.png")).astype(np.int16)

    reference = load_pipeline(str(tiny_model_dir), "cpu")
    reference.set_progress_bar_config(disable=True)
    # unmodified diffusers reads pytorch_lora_weights.safetensors; offline, diffusers < 0.40 needs its name
    reference.load_lora_weights(run, weight_name="pytorch_lora_weights.safetensors")
    theirs = images(reference)
    # the adapter (UNet + text encoder) visibly changes the image (LoRA: 20 levels at the floors, where the tiny
    # model draws other random weights under transformers 4)
    assert np.abs(ours - base).max() > 10
    assert np.abs(ours - theirs).max() <= 2

    run_json = json.loads((run / "run.json").read_text())
    assert run_json["method"] == method and run_json["steps"] == 6 and run_json["world_size"] == 1
    state = set(dreamlora.METHODS[method].state_keys.values())  # in the file, not trained
    assert run_json["trainable_params"] == sum(
        v.numel() for f in ("unet_adapter", "text_encoder_adapter")
        for k, v in load_file(run / f"{f}.safetensors").items() if k.rsplit(".", 1)[-1] not in state)


@pytest.mark.parametrize("method", ["lora", "singlora"])
def test_kohya_file_loads_through_diffusers_converter(method, trained_runs, tiny_model_dir):
    run = trained_runs[method]
    keys = load_file(run / "kohya_lora.safetensors")
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert not any("lora_A" in k or "lora.down" in k for k in keys)
    via_peft, via_kohya = (load_pipeline(str(tiny_model_dir), "cpu") for _ in range(2))
    via_peft.load_lora_weights(run, weight_name="pytorch_lora_weights.safetensors")
    via_kohya.load_lora_weights(run, weight_name="kohya_lora.safetensors")
    for p in (via_peft, via_kohya):
        p.set_progress_bar_config(disable=True)
    assert np.abs(images(via_peft) - images(via_kohya)).max() <= 2


def test_dora_kohya_file_keeps_magnitudes_as_dora_scale(trained_runs):
    keys = load_file(trained_runs["dora"] / "kohya_lora.safetensors")
    scales = {k: v for k, v in keys.items() if k.endswith(".dora_scale")}
    assert scales and all(v.shape[1:] in {(1,), (1, 1, 1)} for v in scales.values())


def init_flag(method: str, init: str) -> list[str]:
    """`--init_lora_weights init` where the method has that init; a method with its own (LoHa) keeps its own."""
    return ["--init_lora_weights", init] if init in dreamlora.METHODS[method].inits else []


def learn(tiny_model_dir, out, method, *extra) -> dict:
    assert train_in_process(tiny_model_dir, out, "--adapter", method, "--rank", 8, "--target_modules", LEARN_TARGETS,
                            "--max_train_steps", 200, "--learning_rate", 2e-3, "--checkpointing_steps", 1000,
                            *init_flag(method, "kaiming"), *extra) == 0
    pipe = load_pipeline(str(tiny_model_dir), "cpu")
    latents = instance_latents(pipe)
    states = prompt_states(pipe, PROMPT, latents.shape[0])
    before = fixed_pairs_loss(pipe.unet, ddpm(tiny_model_dir), latents, states)
    dreamlora.load(pipe.unet, out / "unet_adapter.safetensors")
    after = fixed_pairs_loss(pipe.unet, ddpm(tiny_model_dir), latents, states)
    return {"before": before, "after": after, "pipe": pipe}


def ddpm(model_dir):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")


@pytest.mark.parametrize("method", METHODS)
def test_it_learns_the_subject(method, tiny_model_dir, tmp_path):
    result = learn(tiny_model_dir, tmp_path, method)
    print(f"{method}: fixed-pair denoising loss {result['before']:.3f} -> {result['after']:.3f}")
    assert result["after"] <= 0.5 * result["before"]


def class_image_loss(tiny_model_dir, class_dir, run_dir) -> tuple[float, float]:
    """Fixed-pair denoising loss on the class images with the class prompt: base, then with the adapter."""
    from pipelines.diffusion.data import center_crops, read_examples

    pipe = load_pipeline(str(tiny_model_dir), "cpu")
    pixels = center_crops(read_examples(class_dir, "--class_data_dir", "a photo of dog", 64, is_class=True), 64)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    states = prompt_states(pipe, "a photo of dog", latents.shape[0])
    before = fixed_pairs_loss(pipe.unet, ddpm(tiny_model_dir), latents, states)
    dreamlora.load(pipe.unet, run_dir / "unet_adapter.safetensors")
    return before, fixed_pairs_loss(pipe.unet, ddpm(tiny_model_dir), latents, states)


def test_prior_preservation_trains_on_generated_class_images(tiny_model_dir, tmp_path):
    """Class images come from the base model and enter the loss. On the random tiny base every run lowers the
    class-image loss (the base denoises nothing well), so the check is relative: with prior preservation the
    class images are fitted better than by the same run without it."""
    class_dir = tmp_path / "class"
    common = ["--adapter", "lora", "--rank", 8, "--target_modules", LEARN_TARGETS, "--max_train_steps", 100,
              "--learning_rate", 2e-3, "--checkpointing_steps", 1000, "--init_lora_weights", "kaiming"]
    with_pp, without = tmp_path / "pp", tmp_path / "plain"
    assert train_in_process(tiny_model_dir, with_pp, *common, "--with_prior_preservation", "--class_data_dir",
                            class_dir, "--class_prompt", "a photo of dog", "--num_class_images", 8, "--report_to",
                            "tensorboard", "--validation_prompt", PROMPT, "--validation_steps", 50,
                            "--validation_inference_steps", 2, "--num_validation_images", 1) == 0
    assert len(list(class_dir.glob("class-*.png"))) == 8  # generated by the base model, atomically named
    assert train_in_process(tiny_model_dir, without, *common) == 0
    base, kept = class_image_loss(tiny_model_dir, class_dir, with_pp)
    _, drifted = class_image_loss(tiny_model_dir, class_dir, without)
    print(f"class-image loss: base {base:.3f}, with prior preservation {kept:.3f}, without {drifted:.3f}")
    assert kept < drifted
    logged = [json.loads(line) for line in (with_pp / "progress.jsonl").read_text().splitlines()]
    assert logged[-1]["event"] == "done" and any(r.get("event") == "step" for r in logged)
    events = list((with_pp / "logs").rglob("events.out.tfevents.*"))
    assert events, "tensorboard scalars were not written"
    assert sorted(p.name for p in (with_pp / "validation").glob("*.png")) == ["step-000050-0.png",
                                                                           "step-000100-0.png"]


def test_sigkill_then_resume_latest_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    common = ["--adapter", "singlora", "--singlora_ramp_steps", 6, "--train_text_encoder", "--random_flip",
              "--gradient_accumulation_steps", 2, "--max_train_steps", 12, "--checkpointing_steps", 4,
              "--learning_rate", 1e-3, "--lr_scheduler", "cosine", "--lr_warmup_steps", 2]
    reference = tmp_path / "uninterrupted"
    run_train(tiny_model_dir, reference, *common)

    killed = tmp_path / "killed"
    kill_after_checkpoint(train_cmd(tiny_model_dir, killed, *common), killed, 4)
    assert (killed / "checkpoint-4").is_dir() and not (killed / "unet_adapter.safetensors").exists()
    run_train(tiny_model_dir, killed, *common, "--resume_from_checkpoint", "latest")

    for component in ("unet", "text_encoder"):
        a = load_file(reference / f"{component}_adapter.safetensors")
        b = load_file(killed / f"{component}_adapter.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    resumed = json.loads((killed / "run.json").read_text())
    assert resumed["resumed_from"] and resumed["steps"] == 12


def test_two_processes_over_gloo_train_what_one_process_with_their_global_batch_trains(tiny_model_dir, tmp_path):
    """Two gloo processes with batch 1 and one process with batch 2 see the same samples per step (accelerate
    deals batch i to process i mod 2), draw the same noise (seeded per sample) and average the same
    gradients: their adapters agree to float32 reduction-order noise. Tolerance: 1e-6 absolute on every
    DoRA tensor after 4 steps at lr 1e-4, where the adapters move ~4e-4 from their init."""
    flags = ("--adapter", "dora", "--max_train_steps", 4, "--checkpointing_steps", 2)
    out = tmp_path / "ddp"
    cmd = [*launch_two(),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd(tiny_model_dir, out, *flags)[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["steps"] == 4
    single = run_train(tiny_model_dir, tmp_path / "one", *flags, "--train_batch_size", 2)
    assert json.loads((tmp_path / "one" / "run.json").read_text())["world_size"] == 1 and single.returncode == 0

    two, one = (load_file(d / "unet_adapter.safetensors") for d in (out, tmp_path / "one"))
    assert two.keys() == one.keys()
    difference = max((two[k] - one[k]).abs().max().item() for k in two)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    dreamlora.load(unet, out / "unet_adapter.safetensors")
    assert dreamlora.adapter_config(unet, "default").method == "dora"
    moved = max(v.abs().max().item() for k, v in two.items() if "lora_B" in k)  # B starts at 0
    print(f"two processes vs one: max |difference| {difference:.1e}, largest B entry {moved:.1e}")
    assert moved > 1e-4 and difference <= 1e-6  # measured: 1e-7


def test_sigusr1_checkpoints_and_stops_cleanly(tiny_model_dir, tmp_path):
    out = tmp_path / "stopped"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(train_cmd(tiny_model_dir, out, "--max_train_steps", 100000, "--checkpointing_steps",
                                      100000), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "progress.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (progress.is_file() and '"step": 3,' in progress.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0
    run = json.loads((out / "run.json").read_text())
    assert not run["finished"] and 3 <= run["steps"] < 100000
    assert (out / f"checkpoint-{run['steps']}").is_dir()
    assert json.loads(progress.read_text().splitlines()[-1])["event"] == "stopped"


def test_sample_cli_two_adapters_with_scales_and_merge(trained_runs, tiny_model_dir, tmp_path):
    from pipelines.diffusion.sample import main as sample_main

    common = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--adapter", f"{trained_runs['lora']}:0.5",
              "--adapter", f"{trained_runs['singlora']}:1.0", "--prompt", PROMPT, "--prompt", "a dog on the beach",
              "--num_images_per_prompt", 2, "--num_inference_steps", 3, "--height", 64, "--width", 64]
    assert sample_main([*map(str, common), "--output_dir", str(tmp_path / "live")]) == 0
    assert sample_main([*map(str, common), "--merge", "--output_dir", str(tmp_path / "merged")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "live" / "metadata.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["seed"]) for r in rows] == [("0000_0.png", 0), ("0000_1.png", 1), ("0001_0.png", 0),
                                                          ("0001_1.png", 1)]
    assert [a["scale"] for a in rows[0]["adapters"]] == [0.5, 1.0]
    for row in rows:
        live = np.asarray(Image.open(tmp_path / "live" / row["file_name"])).astype(np.int16)
        merged = np.asarray(Image.open(tmp_path / "merged" / row["file_name"])).astype(np.int16)
        assert np.abs(live - merged).max() <= 2
    half = tmp_path / "half"  # scale 0 of a LoRA (text encoder included) is the base model exactly
    assert sample_main(["--pretrained_model_name_or_path", str(tiny_model_dir), "--adapter",
                        f"{trained_runs['lora']}:0.0", "--prompt", PROMPT, "--num_inference_steps", "3",
                        "--height", "64", "--width", "64", "--output_dir", str(half)]) == 0
    base = load_pipeline(str(tiny_model_dir), "cpu")
    generate(base, [PROMPT], tmp_path / "base", num_inference_steps=3, height=64, width=64)
    zero = np.asarray(Image.open(half / "0000_0.png")).astype(np.int16)
    assert np.abs(zero - np.asarray(Image.open(tmp_path / "base" / "0000_0.png")).astype(np.int16)).max() == 0
