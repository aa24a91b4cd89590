"""SDXL end to end on the tiny SDXL preset: train -> unmodified diffusers loads the same image, for every method
with and without the text encoders; exact resume; two processes; the micro-conditioning and the pooled embedding
reach the UNet."""

from __future__ import annotations

import json
import os
import subprocess
from importlib.metadata import version

import numpy as np
import pytest
import torch
from conftest import method_params
from packaging.version import Version
from PIL import Image
from safetensors.torch import load_file
from train_helpers import (
    PROMPT,
    ROOT,
    image_of,
    kill_after_checkpoint,
    launch_two,
    run_train,
    train_cmd,
    train_in_process,
    trained_on_first_use,
)

import dreamlora
from pipelines.diffusion import data as dbdata
from pipelines.diffusion.sample import main as sample_main

# AdaLoRA's update starts at third order (see tests/test_train.py): a stronger rate for a visible change
ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl_runs(tiny_sdxl_dir, tmp_path_factory):
    """Short, strong runs on the tiny SDXL model, trained on first use."""
    return trained_on_first_use(tiny_sdxl_dir, tmp_path_factory, "sdxl")


@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet+text_encoders"])
@pytest.mark.parametrize("method", method_params())
def test_diffusers_sdxl_load_lora_weights_gives_the_image_of_pipelines_sample(method, text_encoder, sdxl_runs,
                                                                               tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run = sdxl_runs(method, text_encoder)
    assert all((run / f"{c}_adapter.safetensors").is_file() == text_encoder for c in ENCODERS)
    assert sample_main(["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--adapter", str(run), "--prompt",
                        PROMPT, "--num_inference_steps", "4", "--height", "64", "--width", "64", "--device", "cpu",
                        "--output_dir", str(tmp_path)]) == 0
    ours = np.asarray(Image.open(tmp_path / "0000_0.png")).astype(np.int16)

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base = image_of(reference)
    # the output folder as it is; offline, diffusers < 0.40 cannot find the file without its name
    old = Version(version("diffusers")) < Version("0.40")
    weight = {"weight_name": "pytorch_lora_weights.safetensors"} if old else {}
    reference.load_lora_weights(run, **weight)
    theirs = image_of(reference)
    prefixes = {k.split(".")[0] for k in load_file(run / "pytorch_lora_weights.safetensors")}
    assert prefixes == ({"unet", *ENCODERS} if text_encoder else {"unet"})
    assert np.abs(ours - base).max() > 10  # the adapter visibly changes the image
    assert np.abs(ours - theirs).max() <= 2
    if text_encoder:  # both encoders' adapters were loaded by diffusers and change the image
        for name in ENCODERS:
            assert getattr(reference, name).peft_config, f"diffusers did not load the {name} adapter"

    run_json = json.loads((run / "run.json").read_text())
    files = ["unet", *ENCODERS] if text_encoder else ["unet"]
    state = set(dreamlora.METHODS[method].state_keys.values())
    assert run_json["trainable_params"] == sum(v.numel() for f in files for k, v in
                                               load_file(run / f"{f}_adapter.safetensors").items()
                                               if k.rsplit(".", 1)[-1] not in state)


def test_text_encoders_change_the_image_beyond_the_unet(sdxl_runs, tiny_sdxl_dir, tmp_path):
    """With --train_text_encoder, each encoder's adapter alone moves the image (so the comparison above covers them)."""
    from pipelines.diffusion.sample import AdapterSpec, apply_adapters, load_pipeline

    run = sdxl_runs("lora", True)
    images = {}
    for dropped in (None, *ENCODERS):
        pipe = load_pipeline(str(tiny_sdxl_dir), "cpu")
        apply_adapters(pipe, [AdapterSpec(run)])
        if dropped:
            dreamlora.detach(getattr(pipe, dropped), "adapter0")
        images[dropped] = image_of(pipe)
    for name in ENCODERS:
        assert np.abs(images[None] - images[name]).max() > 2, name


def non_square_photo(folder, size=(151, 100), seed=0):
    """A photo with a different value in every pixel, so a crop can be located exactly."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "photo.png")
    return folder


def locate(view: torch.Tensor, resized: np.ndarray, resolution: int, flipped: bool) -> tuple[int, int]:
    """(top, left) where `view` (CHW in [-1, 1]) sits in `resized`, found by search."""
    pixels = np.round((view.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int16)
    if flipped:
        pixels = pixels[:, ::-1]
    h, w = resized.shape[:2]
    hits = [(t, left) for t in range(h - resolution + 1) for left in range(w - resolution + 1)
            if np.array_equal(resized[t:t + resolution, left:left + resolution], pixels)]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("size", [(151, 100), (90, 140)], ids=["wide", "tall"])
def test_time_ids_are_the_photos_real_size_and_the_crop_made(size, tmp_path):
    """Random crops and flips of a non-square photo: each view's time ids are (original h, w, the crop's top, left
    in the resized photo, 64, 64), the left edge mirrored (width - left - 64) when the view is flipped."""
    folder = non_square_photo(tmp_path / "photos", size)
    examples = dbdata.read_examples(folder, "--instance_data_dir", PROMPT, 64, is_class=False)
    image = examples[0].image
    scale = 64 / min(image.size)
    resized = np.asarray(image.resize((max(64, round(image.width * scale)), max(64, round(image.height * scale))),
                                      Image.Resampling.LANCZOS)).astype(np.int16)
    dataset = dbdata.DreamBoothDataset(examples, [], 64, center_crop=False, random_flip=True, seed=3)
    seen = set()
    for epoch in range(12):
        dataset.select_epoch(epoch)
        item = dataset[0]["instance"]
        flipped = item["key"][2]
        top, left = locate(item["pixel_values"], resized, 64, flipped)
        reported = (resized.shape[1] - left - 64) if flipped else left
        assert item["time_ids"].tolist() == [size[1], size[0], top, reported, 64, 64]
        seen.add((flipped, top, left))
    assert len(seen) > 4 and {f for f, _, _ in seen} == {False, True}  # several crops, both orientations
    batch = dbdata.collate([dataset[0], dataset[0]])
    assert batch["time_ids"].shape == (2, 6)


def test_view_is_a_pure_function_of_seed_epoch_and_index(tmp_path):
    folder = non_square_photo(tmp_path / "photos")
    examples = dbdata.read_examples(folder, "--instance_data_dir", PROMPT, 64, is_class=False)
    a, b = (dbdata.DreamBoothDataset(examples, [], 64, False, True, seed=1) for _ in range(2))
    for epoch in (5, 2, 5):
        a.select_epoch(epoch)
        b.select_epoch(epoch)
        assert torch.equal(a[0]["instance"]["time_ids"], b[0]["instance"]["time_ids"])


def test_the_trainer_gives_the_unet_each_views_time_ids(tiny_sdxl_dir, tmp_path, monkeypatch):
    """What reaches the UNet in training: the photo's real size (151 wide, 100 high) and its center crop (left 16 in
    the 97-wide resized photo; 17 measured in the mirrored photo), target 64."""
    from diffusers import UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kw):
        if self.training:
            seen.append(added_cond_kwargs["time_ids"].tolist())
        return forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    photos = non_square_photo(tmp_path / "photos")
    assert train_in_process(tiny_sdxl_dir, tmp_path / "out", "--max_train_steps", 8, "--random_flip",
                            "--checkpointing_steps", 100, "--no_kohya_format", instance_dir=photos) == 0
    assert len(seen) == 8 and {tuple(row) for ids in seen for row in ids} == {(100, 151, 0, 16, 64, 64),
                                                                             (100, 151, 0, 17, 64, 64)}


def test_the_pooled_embedding_and_time_ids_reach_the_unet(tiny_sdxl_dir):
    """Changing only the second encoder's projection changes the pooled embedding, not the context, and changes
    the loss: the pooled output conditions the UNet. Other time ids change the loss too."""
    from pipelines.diffusion.loss import fixed_pairs_loss
    from pipelines.diffusion.models import load_components
    from pipelines.diffusion.sdxl import PromptEncoderXL

    sd = load_components(str(tiny_sdxl_dir))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[100.0, 151, 0, 16, 64, 64]] * 2)

    def condition():
        return PromptEncoderXL(sd, {}, torch.float32)([PROMPT, PROMPT], time_ids)

    states, added = condition()
    assert states.shape == (2, 77, 64) and added["text_embeds"].shape == (2, 32)
    loss = fixed_pairs_loss(sd.unet, sd.noise_scheduler, latents, states, added_cond_kwargs=added)
    with torch.no_grad():
        sd.text_encoder_2.text_projection.weight.mul_(-3.0)
    states_2, added_2 = condition()
    assert torch.equal(states_2, states) and not torch.allclose(added_2["text_embeds"], added["text_embeds"])
    loss_2 = fixed_pairs_loss(sd.unet, sd.noise_scheduler, latents, states, added_cond_kwargs=added_2)
    assert abs(loss_2 - loss) > 1e-4
    other_ids = {**added, "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 64, 64]] * 2)}
    assert abs(fixed_pairs_loss(sd.unet, sd.noise_scheduler, latents, states, added_cond_kwargs=other_ids)
               - loss) > 1e-4


def test_prompt_states_are_cached_when_the_encoders_are_frozen(tiny_sdxl_dir):
    from pipelines.diffusion.models import load_components
    from pipelines.diffusion.sdxl import PromptEncoderXL, encode_prompts_xl

    sd = load_components(str(tiny_sdxl_dir))
    encoder = PromptEncoderXL(sd, {}, torch.float32)
    ids = torch.zeros(3, 6)
    states, added = encoder([PROMPT, "a dog", PROMPT], ids)
    assert sorted(encoder.cache) == sorted([PROMPT, "a dog"])
    with torch.no_grad():
        direct_states, direct_pooled = encode_prompts_xl([sd.tokenizer, sd.tokenizer_2], [
            sd.text_encoder, sd.text_encoder_2], [PROMPT, "a dog", PROMPT])
    torch.testing.assert_close(states, direct_states)
    torch.testing.assert_close(added["text_embeds"], direct_pooled)


@pytest.mark.slow  # a repeat of the core's check for this feature: `pytest -m slow`
def test_sdxl_sigkill_then_resume_latest_matches_an_uninterrupted_run(tiny_sdxl_dir, tmp_path):
    common = ["--adapter", "lora", "--train_text_encoder", "--random_flip", "--gradient_accumulation_steps", 2,
              "--max_train_steps", 8, "--checkpointing_steps", 3, "--learning_rate", 1e-3, "--text_encoder_lr", 1e-3,
              "--lr_scheduler", "cosine", "--lr_warmup_steps", 2, "--no_kohya_format"]
    reference = tmp_path / "uninterrupted"
    run_train(tiny_sdxl_dir, reference, *common)

    killed = tmp_path / "killed"
    kill_after_checkpoint(train_cmd(tiny_sdxl_dir, killed, *common), killed, 3)
    assert (killed / "checkpoint-3").is_dir() and not (killed / "unet_adapter.safetensors").exists()
    assert {p.name for p in (killed / "checkpoint-3").glob("*_adapter.safetensors")} == {
        "unet_adapter.safetensors", "text_encoder_adapter.safetensors", "text_encoder_2_adapter.safetensors"}
    run_train(tiny_sdxl_dir, killed, *common, "--resume_from_checkpoint", "latest")

    for component in ("unet", *ENCODERS):
        a = load_file(reference / f"{component}_adapter.safetensors")
        b = load_file(killed / f"{component}_adapter.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
        assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # it trained
    resumed = json.loads((killed / "run.json").read_text())
    assert resumed["resumed_from"] and resumed["steps"] == 8


@pytest.mark.slow  # a repeat of the core's check for this feature: `pytest -m slow`
def test_sdxl_two_processes_train_what_one_process_with_their_global_batch_trains(tiny_sdxl_dir, tmp_path):
    """As the SD 1.x test (tests/test_train.py), with both text encoders trained: the first encoder's last layer
    gets no gradient (SDXL reads the penultimate layer), which DDP accepts here. Tolerance 1e-6 absolute at lr 1e-4
    (the adapters move ~3e-4); Adam turns float32 reduction-order noise into differences that scale with the lr."""
    flags = ("--adapter", "lora", "--max_train_steps", 3, "--checkpointing_steps", 100, "--train_text_encoder",
             "--learning_rate", 1e-4, "--text_encoder_lr", 1e-4, "--no_kohya_format")
    out = tmp_path / "ddp"
    cmd = [*launch_two(), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd(tiny_sdxl_dir, out, *flags)[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert train_in_process(tiny_sdxl_dir, tmp_path / "one", *flags, "--train_batch_size", 2) == 0
    assert json.loads((tmp_path / "one" / "run.json").read_text())["world_size"] == 1
    for component in ("unet", *ENCODERS):
        two, one = (load_file(d / f"{component}_adapter.safetensors") for d in (out, tmp_path / "one"))
        assert two.keys() == one.keys()
        difference = max((two[k] - one[k]).abs().max().item() for k in two)
        moved = max(v.abs().max().item() for k, v in two.items() if "lora_B" in k)
        worst = max(two, key=lambda k: (two[k] - one[k]).abs().max().item())
        print(f"{component}: two processes vs one: max |difference| {difference:.1e} ({worst}), largest B {moved:.1e}")
        assert moved > 1e-4 and difference <= 1e-6


def test_vae_stays_fp32_under_bf16_unless_another_vae_is_given(tiny_sdxl_dir, tmp_path, monkeypatch):
    """bf16 training on the CPU with validation images, class images and --save_merged: SDXL's VAE in fp32, the UNet
    in bf16 (the merged folder is saved in fp32); a --pretrained_vae_model_name_or_path VAE runs in bf16."""
    from dreamlora import train

    common = ["--mixed_precision", "bf16", "--max_train_steps", 2, "--validation_prompt", PROMPT,
              "--num_validation_images", 1, "--validation_steps", 2, "--validation_inference_steps", 2,
              "--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", 2,
              "--sample_batch_size", 2, "--no_kohya_format"]
    seen = {}
    load = train.load_frozen_models

    def spy(args, accelerator):
        sd, dtype = load(args, accelerator)
        seen[args.output_dir] = (sd.vae.dtype, sd.unet.dtype, sd.text_encoder_2.dtype)
        return sd, dtype

    monkeypatch.setattr(train, "load_frozen_models", spy)
    out = tmp_path / "own-vae"
    assert train_in_process(tiny_sdxl_dir, out, *common, "--save_merged", "--class_data_dir", tmp_path / "class") == 0
    other = tmp_path / "other-vae"
    assert train_in_process(tiny_sdxl_dir, other, *common, "--class_data_dir", tmp_path / "class",
                            "--pretrained_vae_model_name_or_path", tiny_sdxl_dir / "vae") == 0
    assert seen[str(out)] == (torch.float32, torch.bfloat16, torch.bfloat16)
    assert seen[str(other)] == (torch.bfloat16, torch.bfloat16, torch.bfloat16)
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert len(list((out / "validation").glob("*.png"))) == 1
    from diffusers import StableDiffusionXLPipeline

    # a whole SDXL folder that draws with a plain from_pretrained: it is saved in fp32 (in bf16, transformers 5 would
    # keep the encoders' bf16 while diffusers loads the UNet in fp32, and the pooled embedding meets fp32 weights)
    merged = StableDiffusionXLPipeline.from_pretrained(out / "merged")
    assert np.isfinite(image_of(merged)).all() and len(list(out.glob("merged/*/model.safetensors"))) == 2
    dtypes = {part: {t.dtype for t in load_file(out / "merged" / part / "diffusion_pytorch_model.safetensors").values()}
              for part in ("vae", "unet")}
    assert dtypes == {"vae": {torch.float32}, "unet": {torch.float32}}


def test_dreambench_on_sdxl_with_an_adapter(sdxl_runs, tiny_sdxl_dir, tmp_path):
    from pipelines.diffusion.dreambench import main as dreambench_main

    run = sdxl_runs("lora", True)
    assert dreambench_main(["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--subject", "dog",
                            "--adapter", str(run), "--num_images_per_prompt", "1", "--max_prompts", "2",
                            "--num_inference_steps", "2", "--height", "64", "--width", "64",
                            "--output_dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["method"] == "lora"


def test_an_sdxl_adapter_on_an_sd_model_is_refused(sdxl_runs, tiny_model_dir, tmp_path, capsys):
    run = sdxl_runs("lora", True)
    assert sample_main(["--pretrained_model_name_or_path", str(tiny_model_dir), "--adapter", str(run), "--prompt",
                        PROMPT, "--output_dir", str(tmp_path)]) == 2
    assert "text_encoder_2 adapter" in capsys.readouterr().err


def test_a_bad_vae_folder_is_refused_before_loading(tiny_sdxl_dir, tmp_path, capsys):
    assert train_in_process(tiny_sdxl_dir, tmp_path / "out", "--pretrained_vae_model_name_or_path",
                            tmp_path / "novae") == 2
    err = capsys.readouterr().err
    assert "--pretrained_vae_model_name_or_path" in err and "no config.json" in err

