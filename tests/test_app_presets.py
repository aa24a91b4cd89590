"""The app on each embedded tiny model (SD 1.x, SD 2.x, SDXL) and on a user's own model folder: the base-model picker's
names build their preset once, and training, sampling and the Compare tab's generation and scoring run on each kind
of model, through the same back-end calls the page makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from app_server import ASSETS, GRADIO_PANDAS_NOISE, wait_for

from app_backend.jobs import JobManager
from app_backend.sampling import Sampler
from app_backend.scoring import EvalSettings, Evaluator
from app_backend.settings import TINY_LABELS, TINY_MODELS, TrainSettings, native_resolution, resolve_base_model

DOG = sorted(p for p in (ASSETS / "dog").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
pytestmark = GRADIO_PANDAS_NOISE


@pytest.mark.parametrize(("name", "pipeline", "prediction"), [
    ("tiny", "StableDiffusionPipeline", "epsilon"),
    ("tiny-sd2", "StableDiffusionPipeline", "v_prediction"),
    ("tiny-sdxl", "StableDiffusionXLPipeline", "epsilon"),
])
def test_each_tiny_base_is_built_once_from_its_preset(name, pipeline, prediction, tmp_path):
    folder = Path(resolve_base_model(tmp_path, name))
    assert folder == tmp_path / "_models" / TINY_MODELS[name][1]
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == pipeline
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == prediction
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text["hidden_act"] == ("gelu" if name == "tiny-sd2" else "quick_gelu")
    stamp = (folder / "unet" / "config.json").stat().st_mtime_ns
    assert resolve_base_model(tmp_path, f" {name} ") == str(folder)  # built once
    assert (folder / "unet" / "config.json").stat().st_mtime_ns == stamp
    assert native_resolution(name) == 64 and name in TINY_LABELS


def test_the_picker_offers_every_tiny_model_and_keeps_a_server_default(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import app

    assert [value for _, value in app.base_choices("tiny")] == ["tiny", "tiny-sd2", "tiny-sdxl"]
    assert [value for _, value in app.base_choices("/models/sd21")] == ["/models/sd21", "tiny", "tiny-sd2",
                                                                          "tiny-sdxl"]


@pytest.fixture
def own_sdxl_folder(tiny_sdxl_dir):
    return str(tiny_sdxl_dir)  # a user's own diffusers folder, given by path


@pytest.mark.parametrize("base", ["tiny-sd2", "own SDXL folder"])
def test_train_sample_and_compare_on_each_kind_of_base(base, tmp_path, request):
    """Two short runs (LoRA, DoRA) trained by the app's JobManager, a sample with one, the Compare tab's DreamBench
    grids and the offline scorer's table over both."""
    value = request.getfixturevalue("own_sdxl_folder") if base == "own SDXL folder" else base
    jobs = JobManager(tmp_path / "runs")
    for method in ("lora", "dora"):
        jobs.start(TrainSettings(name=method, base_model=value, method=method, steps=4, learning_rate=1e-3,
                                 resolution=64, checkpointing_steps=1000), DOG)
        wait_for(lambda m=method: jobs.progress(m).status != "running", 300, f"the {method} run to finish")
        progress = jobs.progress(method)
        assert progress.status == "finished", progress.log_tail
    resolved = jobs.settings("lora")["base_model"]
    assert resolved == (value if base == "own SDXL folder" else str(jobs.runs_dir / "_models" / "tiny-sd2"))
    run = json.loads((jobs.runs_dir / "lora" / "run.json").read_text())
    assert run["steps"] == 4 and (jobs.runs_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()

    out, files = Sampler(jobs).sample(value, [("lora", 1.0)], "a photo of sks dog", num_images=1, steps=2, size=64)
    assert len(files) == 1 and json.loads((out / "run.json").read_text())["base_model"] == resolved

    grids, rows, plot = Evaluator(jobs).compare(["lora", "dora"], EvalSettings(1, 1, 2, 0, "offline"))
    assert len(grids) == 1 and grids[0][0].is_file() and plot.is_file()
    assert [r["method"] for r in rows] == ["lora", "dora"] and all(r["EfficientNet-Lite0"] for r in rows)


def test_sampling_detaches_an_sdxl_runs_adapters_from_every_encoder(tiny_sdxl_dir, tmp_path):
    """The app keeps one pipeline per base between samples: after a sample, no adapter of the run may stay on any
    component, SDXL's second text encoder included, or it would leak into the next sample of another run."""
    from diffusers import StableDiffusionXLPipeline

    import dreamlora
    from app_backend.sampling import adapters_attached
    from pipelines.diffusion.sample import AdapterSpec, pipeline_components

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    run = tmp_path / "run"
    run.mkdir()
    for component, model in pipeline_components(pipe).items():  # a run with an adapter on every component
        targets = ["to_q", "to_v"] if component == "unet" else ["q_proj", "v_proj"]
        dreamlora.attach(model, dreamlora.AdapterConfig(method="lora", rank=2, target_modules=targets))
        dreamlora.save(model, run / f"{component}_adapter.safetensors")
        dreamlora.detach(model, "default")
    with adapters_attached(pipe, [AdapterSpec(run)], str(tiny_sdxl_dir)):
        assert all(dreamlora.adapter_names(m) for m in pipeline_components(pipe).values())
    left = {c: dreamlora.adapter_names(m) for c, m in pipeline_components(pipe).items() if dreamlora.adapter_names(m)}
    assert left == {}
