"""Bad training input: one clear line naming the flag or file, a non-zero exit, nothing half-written."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
from PIL import Image
from train_helpers import INSTANCE_DIR, PROMPT, run_train

from dreamlora.errors import ArgError
from dreamlora.train import cli
from dreamlora.train_args import parse_args
from pipelines.diffusion import data
from pipelines.diffusion.class_images import ensure_class_images


def base_args(tmp_path, instance_dir=INSTANCE_DIR, model="unused-model-dir"):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", str(instance_dir),
            "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / "out"), "--resolution", "64"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--with_prior_preservation"], "--with_prior_preservation needs --class_data_dir and --class_prompt"),
    (["--class_prompt", "a dog"], "--class_data_dir/--class_prompt given without --with_prior_preservation"),
    (["--cache_latents"], "--cache_latents fixes each image's crop: add --center_crop"),
    (["--rank", "0"], "--rank must be > 0, got 0"),
    (["--resolution", "60"], "--resolution must be a multiple of 8"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be > 0"),
])
def test_conflicting_or_bad_flags(tmp_path, extra, message):
    with pytest.raises(ArgError) as e:
        parse_args(base_args(tmp_path) + extra)
    assert message in str(e.value)


def test_config_file_values_are_defaults_the_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rank: 16\nadapter: dora\nlearning_rate: 0.001\n")
    args = parse_args(base_args(tmp_path) + ["--config", str(config), "--rank", "8"])
    assert (args.rank, args.adapter, args.learning_rate) == (8, "dora", 0.001)
    config.write_text("rnak: 16\n")
    with pytest.raises(ArgError, match=r"unknown keys \['rnak'\]"):
        parse_args(base_args(tmp_path) + ["--config", str(config)])


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: d / "missing", "--instance_data_dir '{d}/missing' does not exist"),
    (lambda d: d, "--instance_data_dir '{d}' contains no images"),
    (lambda d: (d / "bad.jpg").write_bytes(b"not a jpeg") and d, "none of its 1 image files could be read"),
])
def test_instance_dir_errors_exit_2_and_write_nothing(tmp_path, capsys, setup, message):
    folder = tmp_path / "instances"
    folder.mkdir()
    target = setup(folder)
    assert cli(base_args(tmp_path, target)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message.format(d=folder) in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_corrupt_and_truncated_images_are_skipped_with_a_warning(tmp_path, caplog):
    good = Image.new("RGB", (80, 80), (200, 10, 10))
    good.save(tmp_path / "good.png")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 not really")
    full = (INSTANCE_DIR / "00.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    with caplog.at_level(logging.WARNING):
        examples = data.read_examples(tmp_path, "--instance_data_dir", PROMPT, 64, is_class=False)
    assert [e.path.name for e in examples] == ["good.png"]
    assert "garbage.jpg" in caplog.text and "truncated.jpg" in caplog.text


def test_image_modes_decode_as_a_viewer_shows_them(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)  # red band on the left
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (30, 20), (0, 0, 255, 0))  # fully transparent: white after flattening
    rgba.save(tmp_path / "rgba.png")
    Image.fromarray((np.full((20, 30), 40000)).astype(np.uint16)).save(tmp_path / "deep.png")  # 16-bit
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated.save(tmp_path / "exif.jpg", exif=exif, quality=95)

    assert data.load_rgb(tmp_path / "gray.png").mode == "RGB"
    assert data.load_rgb(tmp_path / "rgba.png").getpixel((5, 5)) == (255, 255, 255)
    deep = np.asarray(data.load_rgb(tmp_path / "deep.png"))
    assert abs(int(deep[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1
    assert np.asarray(data.load_rgb(tmp_path / "palette.png"))[0, 0].tolist() == [255, 0, 0]
    upright = np.asarray(data.load_rgb(tmp_path / "exif.jpg"))
    assert upright.shape == (30, 20, 3)  # portrait after applying the orientation
    assert upright[0, -1, 0] > 200 and upright[-1, 0, 0] < 60  # the red band is now on top


def test_small_images_are_upscaled_with_a_warning(tmp_path, caplog):
    Image.new("RGB", (20, 30), (1, 2, 3)).save(tmp_path / "tiny.png")
    with caplog.at_level(logging.WARNING):
        (example,) = data.read_examples(tmp_path, "--instance_data_dir", PROMPT, 64, is_class=False)
    assert "smaller than --resolution 64: upscaling" in caplog.text
    pixels, _ = data.augment(example.image, 64, True, False, random.Random(0))
    assert pixels.shape == (3, 64, 64)


def test_unwritable_class_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"--class_data_dir '.*file/class' is not writable"):
        ensure_class_images(str(blocker / "class"), "a dog", 2, lambda: None, 1, 0)


def test_rank_too_large_for_a_target_names_the_module(tiny_model_dir, tmp_path):
    proc = run_train(tiny_model_dir, tmp_path / "out", "--rank", 40, "--max_train_steps", 1, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: AdapterConfig.rank=40 exceeds what") and "d_in=32" in last
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_says_so(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_train(tiny_model_dir, out, "--learning_rate", 1e30, "--max_train_steps", 20,
                     "--checkpointing_steps", 1, "--max_grad_norm", 1e30, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss became nan") or last.startswith("error: loss became inf")
    assert "Last good checkpoint:" in last and "checkpoint-" in last
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert any(out.glob("checkpoint-*"))


def test_sample_cli_bad_input_names_the_flag(tmp_path, capsys):
    from pipelines.diffusion.sample import main as sample_main

    args = ["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    assert sample_main([*args, "--prompt", "x", "--adapter", str(tmp_path / "nope:0.5")]) == 2
    assert "--adapter" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert sample_main(args) == 2
    assert "give at least one --prompt" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert sample_main([*args, "--prompt", "x", "--adapter", str(tmp_path / "run")]) == 2
    assert "no unet_adapter.safetensors" in capsys.readouterr().err
    assert sample_main([*args, "--prompt", "x"]) == 2  # tmp_path is no diffusers folder
    assert "is not a diffusers Stable Diffusion folder" in capsys.readouterr().err


def test_adapter_spec_parses_scales_and_colons():
    from pathlib import Path

    from pipelines.diffusion.sample import AdapterSpec

    assert AdapterSpec.parse("runs/dog:0.5") == AdapterSpec(Path("runs/dog"), 0.5)
    assert AdapterSpec.parse("runs/dog") == AdapterSpec(Path("runs/dog"), 1.0)
    assert AdapterSpec.parse("C:/runs/dog") == AdapterSpec(Path("C:/runs/dog"), 1.0)
    assert AdapterSpec.parse("runs/a:b:-1.5") == AdapterSpec(Path("runs/a:b"), -1.5)
