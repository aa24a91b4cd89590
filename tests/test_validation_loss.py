"""Validation loss (`--validation_split ...`): held-out photos never train, the (image, timestep, noise) triples are
fixed by the seed for the whole run and across a resume, the value is the denoising loss computed by hand, the
evaluation changes nothing in training, and two processes agree. Short runs on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_helpers import INSTANCE_DIR, PROMPT, ROOT, launch_two, run_train, train_cmd, train_in_process

from dreamlora.errors import ArgError, DataError
from dreamlora.train_args import parse_args
from pipelines.diffusion import data
from pipelines.diffusion.validation_loss import batch_slices, draw_triples, split_held_out
from pipelines.trainer.order import stable_seed

SPLIT = ("--validation_split", 0.25)  # one of the four dog photos


def history(out) -> list[dict]:
    return json.loads((out / "run.json").read_text())["validation_loss"]["history"]


def test_the_split_is_seeded_disjoint_and_leaves_photos_to_train_on():
    examples = data.read_examples(INSTANCE_DIR, "--instance_data_dir", PROMPT, 64, is_class=False)
    train, held = split_held_out(examples, 0.25, 7, INSTANCE_DIR)
    again = split_held_out(examples, 0.25, 7, INSTANCE_DIR)
    assert [e.path for e in again[1]] == [e.path for e in held] and len(held) == 1 and len(train) == 3
    assert {e.path for e in train} | {e.path for e in held} == {e.path for e in examples}
    assert {e.path for e in train}.isdisjoint(e.path for e in held)
    assert len({split_held_out(examples, 0.25, s, INSTANCE_DIR)[1][0].path for s in range(8)}) > 1  # the seed picks
    assert len(split_held_out(examples, 0.01, 0, INSTANCE_DIR)[1]) == 1  # at least one when F > 0
    assert split_held_out(examples, 0.0, 0, INSTANCE_DIR) == (examples, [])
    with pytest.raises(DataError, match=r"--validation_split 0.9: holding out 4 of the 4 photos in "
                                        r"--instance_data_dir '.*dog' leaves none to train on"):
        split_held_out(examples, 0.9, 0, INSTANCE_DIR)


def test_the_triples_are_a_function_of_the_seed_with_one_timestep_per_band():
    a, b = draw_triples(3, (4, 8, 8), 1000, 5), draw_triples(3, (4, 8, 8), 1000, 5)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("image", "timesteps", "noise"))
    other = draw_triples(3, (4, 8, 8), 1000, 6)
    assert not torch.equal(a.noise, other.noise)
    for image in range(3):  # each photo: one timestep in each quarter of the schedule
        bands = sorted(int(t) // 250 for t in a.timesteps[a.image == image])
        assert bands == [0, 1, 2, 3]
    assert batch_slices(12, 5, None) == [slice(0, 5), slice(5, 10), slice(10, 12)]
    assert batch_slices(12, 5, 2) == [slice(0, 5), slice(5, 10)]


def by_hand(model_dir, photo, seed: int) -> float:
    """The loss of the held-out photo on its four triples, written out: VAE mean of the center crop, for k in 0..3
    a generator seeded (seed, 2, 0, k) draws t in [250k, 250(k+1)) then the noise; ε-MSE through the base UNet."""
    from pipelines.diffusion.models import encode_prompts, load_components

    sd = load_components(str(model_dir))
    example = data.read_examples(INSTANCE_DIR, "--instance_data_dir", PROMPT, 64, is_class=False)
    pixels = data.center_crops([e for e in example if e.path.name == photo], 64)
    losses = []
    with torch.no_grad():
        latents = sd.vae.encode(pixels).latent_dist.mean * sd.vae.config.scaling_factor
        states = encode_prompts(sd.tokenizer, sd.text_encoder, [PROMPT])
        for k in range(4):
            g = torch.Generator().manual_seed(stable_seed(seed, 2, 0, k))
            t = torch.randint(250 * k, 250 * (k + 1), (1,), generator=g)
            noise = torch.randn((1, *latents.shape[1:]), generator=g)
            pred = sd.unet(sd.noise_scheduler.add_noise(latents, noise, t), t, states).sample
            losses.append(F.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


def test_at_the_identity_the_loss_is_the_hand_computed_one_on_every_evaluation_and_held_out_photos_never_train(
        tiny_model_dir, tmp_path, monkeypatch):
    """lr 1e-30 keeps the adapter at its identity init (B moves by ~1e-30): every evaluation must then give the
    same number, the hand-computed loss of the base model, which redrawn triples would not."""
    trained_on = []

    class Spy(data.DreamBoothDataset):
        def __init__(self, instances, *rest):
            trained_on.extend(e.path.name for e in instances)
            super().__init__(instances, *rest)

    monkeypatch.setattr(data, "DreamBoothDataset", Spy)
    out = tmp_path / "out"
    assert train_in_process(tiny_model_dir, out, *SPLIT, "--validation_seed", 11, "--validate_every_n_steps", 1,
                            "--max_train_steps", 3, "--learning_rate", 1e-30, "--checkpointing_steps", 100) == 0
    summary = json.loads((out / "run.json").read_text())["validation_loss"]
    (photo,) = summary["held_out"]
    assert sorted(trained_on + [photo]) == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"] and photo not in trained_on
    assert summary["triples"] == 4 and [h["step"] for h in summary["history"]] == [1, 2, 3]
    expected = by_hand(tiny_model_dir, photo, 11)
    for record in summary["history"]:
        assert record["loss"] == pytest.approx(expected, rel=1e-5)
    logged = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["event"] == "validation"] == [1, 2, 3]
    assert all(r["val/loss"] == pytest.approx(expected, rel=1e-5) for r in logged if r["event"] == "validation")


def test_a_resumed_run_recomputes_the_same_triples_and_keeps_the_history(tiny_model_dir, tmp_path):
    flags = (*SPLIT, "--validate_every_n_steps", 2, "--max_train_steps", 4, "--checkpointing_steps", 2,
             "--learning_rate", 1e-2, "--train_text_encoder", "--text_encoder_lr", 1e-2)
    straight = tmp_path / "straight"
    assert train_in_process(tiny_model_dir, straight, *flags) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert train_in_process(tiny_model_dir, resumed, *flags, "--resume_from_checkpoint", "latest") == 0
    first, again = history(straight), history(resumed)
    assert [h["step"] for h in first] == [h["step"] for h in again] == [2, 4]
    assert first[0]["loss"] != first[1]["loss"]  # the adapter moved: the check below is not of a constant
    for a, b in zip(first, again, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0)
    assert json.loads((resumed / "run.json").read_text())["resumed_from"]


def test_evaluating_changes_nothing_in_training(tiny_model_dir, tmp_path):
    """Evaluating every step (adapters in eval mode, own generators, no gradient) trains the same adapter as
    evaluating only at the end; with adapter dropout on, a forward in train mode would consume dropout draws."""
    common = (*SPLIT, "--max_train_steps", 4, "--checkpointing_steps", 100, "--learning_rate", 1e-2,
              "--lora_dropout", 0.2)
    for name, every in (("often", 1), ("once", 4)):
        assert train_in_process(tiny_model_dir, tmp_path / name, *common, "--validate_every_n_steps", every,
                                "--max_validation_steps", 3) == 0
    often, once = (load_file(tmp_path / n / "unet_adapter.safetensors") for n in ("often", "once"))
    assert all(torch.equal(often[k], once[k]) for k in often)
    assert len(history(tmp_path / "often")) == 4 and len(history(tmp_path / "once")) == 1
    assert history(tmp_path / "often")[-1] == history(tmp_path / "once")[-1]
    summary = json.loads((tmp_path / "once" / "run.json").read_text())["validation_loss"]
    assert (summary["triples"], summary["batches"]) == (4, 3)  # --max_validation_steps: 3 batches of 1 triple


@pytest.mark.slow  # a repeat of the core's check for this feature: `pytest -m slow`
def test_two_processes_agree_with_one_process_of_their_global_batch(tiny_model_dir, tmp_path):
    """Each process computes every other batch of triples and one all-reduce sums them: the two-process run must
    neither hang nor differ from one process with batch 2 (the same training, the same triples in other batches).
    Five photos, one held out: four train, so both runs see whole batches (no padded repeat on the second process)."""
    photos = tmp_path / "photos"
    shutil.copytree(INSTANCE_DIR, photos)
    shutil.copy(sorted((INSTANCE_DIR.parent / "backpack").glob("*.jpg"))[0], photos / "04.jpg")
    flags = ("--validation_split", 0.2, "--validate_every_n_steps", 2, "--max_train_steps", 4,
             "--checkpointing_steps", 100, "--learning_rate", 1e-2)
    out = tmp_path / "two"
    cmd = [*launch_two(), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd(tiny_model_dir, out, *flags, instance_dir=photos)[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    run_train(tiny_model_dir, tmp_path / "one", *flags, "--train_batch_size", 2, instance_dir=photos)
    two, one = history(out), history(tmp_path / "one")
    assert [h["step"] for h in two] == [h["step"] for h in one] == [2, 4]
    print("val/loss, two processes vs one:", [(a["loss"], b["loss"]) for a, b in zip(two, one, strict=True)])
    for a, b in zip(two, one, strict=True):  # measured: 6e-8 relative (float32 reduction order)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@pytest.mark.parametrize(("extra", "message"), [
    (["--validation_split", "1"], "--validation_split must be in [0, 1), got 1.0"),
    (["--validation_split", "-0.1"], "--validation_split must be in [0, 1), got -0.1"),
    (["--validation_seed", "3"], "--validation_seed given without --validation_split"),
    (["--validation_split", "0.2", "--max_validation_steps", "0"], "--max_validation_steps must be > 0"),
])
def test_bad_validation_flags_are_named(tmp_path, extra, message):
    from test_train_bad_input import base_args

    with pytest.raises(ArgError) as e:
        parse_args(base_args(tmp_path) + extra)
    assert message in str(e.value)


def test_a_split_that_leaves_nothing_to_train_fails_before_a_model_loads(tmp_path, capsys):
    from test_train_bad_input import base_args

    from dreamlora.train import cli

    assert cli(base_args(tmp_path) + ["--validation_split", "0.9"]) == 2  # the model folder does not exist
    err = capsys.readouterr().err.strip()
    assert "holding out 4 of the 4 photos" in err and "\n" not in err
