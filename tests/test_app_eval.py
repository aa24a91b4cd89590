"""The Evaluate tab's plain-Python parts: which scorer works on this machine, the offline scorer's weights,
and generated images keyed by the adapter's content (Resume must not show the old adapter's images)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from app_server import ASSETS

from app_backend.jobs import JobManager
from app_backend.scoring import PAPER_WEIGHTS, EvalSettings, Evaluator, default_scorer, scorer_status

DOG = sorted(p for p in (ASSETS / "dog").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def fake_hub_cache(root, repo: str, filename: str) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / filename).write_bytes(b"weights")


def test_default_scorer_is_the_one_that_works_here(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    never = lambda: pytest.fail("offline: the Hub must not be probed")  # noqa: E731
    status = scorer_status(cache_dir=str(tmp_path), reachable=never)
    assert status["offline"][0] and not status["paper"][0] and default_scorer(status) == "offline"
    assert "HF_HUB_OFFLINE" in status["paper"][1] and "CLIP ViT-B-32" in status["paper"][1]
    for repo, files in PAPER_WEIGHTS.values():  # both weights cached: the paper's scorer works offline too
        fake_hub_cache(tmp_path, repo, files[-1])
    status = scorer_status(cache_dir=str(tmp_path), reachable=never)
    assert status["paper"][0] and default_scorer(status) == "paper"
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online but not cached: a download works when the Hub answers
    empty = str(tmp_path / "empty")
    assert default_scorer(scorer_status(cache_dir=empty, reachable=lambda: True)) == "paper"
    status = scorer_status(cache_dir=empty, reachable=lambda: False)
    assert default_scorer(status) == "offline" and "cannot be reached" in status["paper"][1]


def test_offline_scorer_has_real_weights_only(tmp_path):
    clip, dino, extra = Evaluator(JobManager(tmp_path / "runs")).encoders("offline")
    assert clip is None and dino is None  # no CLIP/DINO columns from random weights
    assert extra.key.startswith("efficientnet-lite0")


def write_adapter(tiny_model_dir, path, seed: int) -> None:
    """A LoRA on the tiny UNet's attention with random (non-zero) B: a different seed, a different adapter."""
    from diffusers import UNet2DConditionModel

    import dreamlora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    dreamlora.attach(unet, dreamlora.AdapterConfig(method="lora", rank=4, target_modules=["to_q", "to_k", "to_v"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dreamlora.adapter_layers(unet, "default").values():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
    dreamlora.save(unet, path)


def test_evaluate_after_resume_uses_the_new_adapter(tmp_path, tiny_model_dir):
    runs = tmp_path / "runs"
    run = runs / "dog"
    (run / "data" / "subject").mkdir(parents=True)
    for photo in DOG[:3]:
        shutil.copy(photo, run / "data" / "subject" / photo.name)
    settings = {"base_model": str(tiny_model_dir), "class_noun": "dog", "token": "sks", "resolution": 64,
                "method": "lora", "rank": 4}
    (run / "job.json").write_text(json.dumps({"name": "dog", "created": 1, "settings": settings, "argv": [],
                                              "launches": 1}))
    write_adapter(tiny_model_dir, run / "unet_adapter.safetensors", seed=1)
    evaluator = Evaluator(JobManager(runs))
    eval_settings = EvalSettings(max_prompts=1, images_per_prompt=1, steps=2, seed=0, scorer="offline")
    first = evaluator.dreambench("dog", eval_settings)
    before = (first / "subject" / "00_0.png").read_bytes()
    assert evaluator.dreambench("dog", eval_settings) == first  # the same adapter: its images are reused

    write_adapter(tiny_model_dir, run / "unet_adapter.safetensors", seed=2)  # what a Resume's end writes
    second = evaluator.dreambench("dog", eval_settings)
    assert (second / "subject" / "00_0.png").read_bytes() != before
    assert second != first and not first.exists()  # the old adapter's images are gone
