"""The DreamBench protocol shipped with the package, and the metric definitions, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from eval import metrics
from pipelines.diffusion.dreambench_protocol import load_protocol


@pytest.fixture(scope="module")
def protocol():
    return load_protocol()


def test_thirty_subjects_with_their_classes(protocol):
    assert len(protocol.subjects) == 30
    assert protocol.subjects["bear_plushie"].class_noun == "stuffed animal"
    live = sorted(s.name for s in protocol.subjects.values() if s.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]


def test_objects_get_20_contexts_and_5_properties(protocol):
    prompts = protocol.prompts(protocol.subjects["teapot"], token="sks")
    assert len(prompts) == 25
    assert prompts[0] == "a sks teapot in the jungle"
    assert prompts[19] == "a sks teapot on top of a white rug"
    assert prompts[20:] == ["a red sks teapot", "a purple sks teapot", "a shiny sks teapot", "a wet sks teapot",
                            "a cube shaped sks teapot"]


def test_live_subjects_get_10_contexts_10_accessories_and_5_properties(protocol):
    prompts = protocol.prompts(protocol.subjects["dog"], token="zwx")
    assert len(prompts) == 25
    assert prompts[9] == "a zwx dog on top of a purple rug in a forest"
    assert prompts[10] == "a zwx dog wearing a red hat"
    assert prompts[19] == "a zwx dog in a purple wizard outfit"
    assert prompts[20:] == ["a red zwx dog", "a purple zwx dog", "a shiny zwx dog", "a wet zwx dog",
                            "a cube shaped zwx dog"]
    assert prompts[10:20] != [p.replace("teapot", "dog") for p in protocol.prompts(protocol.subjects["teapot"],
                                                                                     "zwx")[10:20]]


def test_clip_t_prompts_drop_the_identifier_unless_asked(protocol):
    dog = protocol.subjects["dog"]
    assert protocol.clip_t_prompts(dog)[0] == "a dog in the jungle"
    assert protocol.clip_t_prompts(protocol.subjects["teapot"])[22] == "a shiny teapot"
    assert protocol.clip_t_prompts(dog, keep_identifier=True)[0] == "a sks dog in the jungle"


def test_metrics_equal_a_hand_computation():
    gen = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    ref = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 4.0], [1.0, 1.0, 1.0]])

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    pairs = [[cos(g.tolist(), r.tolist()) for r in ref] for g in gen]
    assert metrics.subject_fidelity(gen, ref) == pytest.approx(sum(map(sum, pairs)) / 6, abs=1e-12)
    assert metrics.per_image_subject_fidelity(gen, ref).tolist() == pytest.approx([sum(r) / 3 for r in pairs])
    text = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert metrics.per_image_prompt_fidelity(gen, text).tolist() == pytest.approx([1.0, 0.0])
    same = torch.randn(5, 8)
    assert metrics.subject_fidelity(same[:1], same[:1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one prompt per image"):
        metrics.per_image_prompt_fidelity(gen, text[:1])


def test_generation_writes_the_protocol_layout_and_resumes(tiny_model_dir, tmp_path):
    import json

    from pipelines.diffusion.dreambench import main as generate_main

    out = tmp_path / "gen"
    argv = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--subject", "dog", "--subject", "teapot",
            "--max_prompts", "2", "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--height", "64",
            "--width", "64", "--output_dir", str(out)]
    assert generate_main(argv) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["dog/00_0.png", "dog/00_1.png", "dog/01_0.png", "dog/01_1.png",
                     "teapot/00_0.png", "teapot/00_1.png", "teapot/01_0.png", "teapot/01_1.png"]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    first = rows[0]
    assert (first["file_name"], first["subject"], first["class"], first["prompt"], first["prompt_for_clip_t"],
            first["seed"]) == ("dog/00_0.png", "dog", "dog", "a sks dog in the jungle", "a dog in the jungle", 0)
    assert rows[5]["prompt"] == "a sks teapot in the jungle" and rows[5]["seed"] == 1

    before = {f: (out / f).read_bytes() for f in files}
    (out / "dog/01_1.png").unlink()  # an interrupted run
    assert generate_main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["generated_by_main_process"] == 1 and run["images"] == 8
    assert {f: (out / f).read_bytes() for f in files} == before  # same seeds, same pixels


def test_generation_shards_over_two_processes(tiny_model_dir, tmp_path):
    import json
    import os
    import subprocess

    from train_helpers import launch_two

    out = tmp_path / "sharded"
    cmd = [*launch_two(),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipelines.dreambench",
           "--pretrained_model_name_or_path", str(tiny_model_dir), "--subject", "dog", "--max_prompts", "3",
           "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--height", "64", "--width", "64",
           "--output_dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["images"] == 6 and run["generated_by_main_process"] == 3
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 6


def test_many_subjects_each_with_its_own_adapter(tiny_model_dir, tmp_path):
    import json

    from diffusers import UNet2DConditionModel

    import dreamlora
    from pipelines.diffusion.dreambench import main as generate_main

    subjects_dir, adapter_root = tmp_path / "subjects", tmp_path / "adapters"
    for name, method in (("dog", "lora"), ("teapot", "dora")):
        (subjects_dir / name).mkdir(parents=True)
        unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
        dreamlora.attach(unet, dreamlora.AdapterConfig(method=method, rank=2))
        with torch.no_grad():
            for layer in dreamlora.adapter_layers(unet, "default").values():
                layer.lora_B.normal_(0, 0.3)
        dreamlora.save(unet, adapter_root / name / "unet_adapter.safetensors")
    common = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--subjects_dir", str(subjects_dir),
              "--max_prompts", "1", "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--height", "64",
              "--width", "64"]
    assert generate_main([*common, "--adapter_root", str(adapter_root), "--output_dir", str(tmp_path / "a")]) == 0
    assert generate_main([*common, "--output_dir", str(tmp_path / "base")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [(r["subject"], r["method"], r["rank"]) for r in rows] == [("dog", "lora", 2), ("teapot", "dora", 2)]
    for r in rows:
        assert (tmp_path / "a" / r["file_name"]).read_bytes() != (tmp_path / "base" / r["file_name"]).read_bytes()
