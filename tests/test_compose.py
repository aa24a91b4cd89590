"""`python -m pipelines.compose` end to end on the tiny SD model and real photos: it recovers a subject's own adapter
from a library of three, never does worse than the candidates it was seeded with, writes an output folder that
samples, loads in unmodified diffusers and scores like a trained one, restarts from its record, runs on two
processes with the same numbers, and refuses bad input with one error and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from train_helpers import (
    INSTANCE_DIR,
    instance_latents,
    launch_two,
    prompt_states,
    reset_accelerate,
    train_in_process,
)

import dreamlora
from pipelines.compose.cli import cli
from pipelines.diffusion.export import DIFFUSERS_WEIGHT_NAME
from pipelines.diffusion.loss import fixed_pairs_loss
from pipelines.diffusion.sample import load_pipeline

ASSETS = INSTANCE_DIR.parent
SUBJECTS = ("dog", "backpack", "clock")
PROMPT = "a photo of sks thing"
TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2,ff.net.0.proj,ff.net.2"
pytestmark = pytest.mark.filterwarnings("ignore:.*RHOEND.*:UserWarning")  # scipy's COBYLA, inside NGOpt


def train(signal_model_dir, out, photos, *extra) -> None:
    assert train_in_process(signal_model_dir, out, "--adapter", "lora", "--rank", 4, "--target_modules", TARGETS,
                            "--max_train_steps", 120, "--learning_rate", 3e-3, "--checkpointing_steps", 1000,
                            "--instance_prompt", PROMPT, "--no_kohya_format", *extra, instance_dir=photos) == 0


@pytest.fixture(scope="module")
def signal_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a VAE that keeps its photos' signal (`tiny_model.keep_photo_signal`: with the embedded
    random VAE every photo is noise to the UNet, and each subject's adapter helps every subject's photos alike)."""
    from pipelines.diffusion.tiny_model import keep_photo_signal

    folder = tmp_path_factory.mktemp("signal") / "model"
    shutil.copytree(tiny_model_dir, folder)
    return keep_photo_signal(folder, [ASSETS / s for s in (*SUBJECTS, "duck_toy")])


@pytest.fixture(scope="module")
def library(signal_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    for subject in SUBJECTS:
        train(signal_model_dir, root / subject, ASSETS / subject)
    return {s: root / s for s in SUBJECTS}


def compose(signal_model_dir, out, adapters, photos, *extra) -> int:
    argv = ["--pretrained_model_name_or_path", str(signal_model_dir), "--instance_data_dir", str(photos),
            "--instance_prompt", PROMPT, "--resolution", "64", "--output_dir", str(out), "--report_to", "none",
            *[x for a in adapters for x in ("--adapter", str(a))], *map(str, extra)]
    reset_accelerate()
    try:
        return cli(argv)
    finally:
        reset_accelerate()


def read_run(out) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("rule", ["updates", "factors"])
def test_recovers_the_subjects_own_adapter_and_closes_the_gap(signal_model_dir, library, tmp_path, rule):
    adapters = [library[s] for s in SUBJECTS]
    out = tmp_path / "mix"
    photos = ASSETS / "dog"
    assert compose(signal_model_dir, out, adapters, photos, "--rule", rule) == 0
    run = read_run(out)
    weights = run["weights"]
    assert list(weights) == [str(a) for a in adapters]  # keyed by the adapters as given on the command line
    assert max(weights, key=weights.get) == str(library["dog"]), weights
    base, own = run["seeded"]["base"]["loss"], run["seeded"][f"single:{library['dog']}"]["loss"]
    print(f"{rule}: base {base:.4f}, own adapter {own:.4f}, composed {run['composed_loss']:.4f}, weights {weights}")
    assert base - own > 0.05  # the library adapter learned its subject: the check below is not vacuous
    assert base - run["composed_loss"] >= 0.95 * (base - own)
    assert abs(run["composed_loss"] - run["search_loss"]) <= 1e-5  # the written adapter is what was searched

    # independently: the written adapter, loaded as any trained one, gives the recorded loss on the same pairs
    pipe = load_pipeline(str(signal_model_dir), "cpu")
    latents = instance_latents(pipe, 64, photos)
    states = prompt_states(pipe, PROMPT, latents.shape[0])
    dreamlora.load(pipe.unet, out / "unet_adapter.safetensors")
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(signal_model_dir, subfolder="scheduler")
    assert abs(fixed_pairs_loss(pipe.unet, sched, latents, states, pairs=8, seed=0) - run["composed_loss"]) <= 1e-5
    # and unmodified diffusers reads the diffusers file to the same UNet output
    sample, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), states[:1]
    with torch.no_grad():
        ours = pipe.unet(sample, t, text).sample
    fresh = load_pipeline(str(signal_model_dir), "cpu")
    fresh.load_lora_weights(out, weight_name=DIFFUSERS_WEIGHT_NAME)  # offline, diffusers 0.34 needs the name
    with torch.no_grad():
        theirs = fresh.unet(sample, t, text).sample
    assert (ours - theirs).abs().max() <= 1e-4
    history = [json.loads(x) for x in (out / "search.jsonl").read_text().splitlines()]
    assert len(history) == run["evaluations"] == 40 and (out / "search.png").stat().st_size > 0


def test_a_new_subject_is_never_worse_than_the_seeded_candidates(signal_model_dir, library, tmp_path):
    """duck_toy is in no adapter. On the search photos the result's objective is at most that of the uniform
    average and of every adapter alone (they seed the search)."""
    adapters = [library[s] for s in SUBJECTS]
    search_photos = tmp_path / "search"
    search_photos.mkdir()
    for f in sorted((ASSETS / "duck_toy").iterdir())[:2]:  # the third is held out (bench/compose_images.py)
        shutil.copy(f, search_photos)
    out = tmp_path / "mix"
    assert compose(signal_model_dir, out, adapters, search_photos) == 0
    run = read_run(out)
    seeded = run["seeded"]
    assert {"uniform", *(f"single:{a}" for a in adapters)} <= set(seeded)
    # the written adapter, scored again after writing, with the search's L1 term
    written = run["composed_loss"] + 0.05 * sum(abs(w) for w in run["weights"].values()) / 3
    assert written <= min(v["objective"] for v in seeded.values()) + 1e-6
    # the same comparison on the held-out photo is reported by bench/compose_images.py (not asserted)


def test_restart_tells_the_record_and_adds_new_evaluations(signal_model_dir, library, tmp_path):
    adapters = [library[s] for s in SUBJECTS]
    first = tmp_path / "first"
    assert compose(signal_model_dir, first, adapters, ASSETS / "dog", "--budget", 8) == 0
    again = tmp_path / "again"
    assert compose(signal_model_dir, again, adapters, ASSETS / "dog", "--budget", 4,
                   "--restart_from", first / "search.jsonl") == 0
    run, before = read_run(again), read_run(first)
    rows = [json.loads(x) for x in (again / "search.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows[:8]] == ["restart"] * 8 and len(rows) == 12 and run["evaluations"] == 4
    assert run["best"]["objective"] <= before["best"]["objective"]
    assert all(r["weights"] not in [p["weights"] for p in rows[:8]] for r in rows[8:])  # new points only


def test_two_processes_give_the_numbers_of_one(signal_model_dir, library, tmp_path):
    adapters = [library[s] for s in SUBJECTS]
    one = tmp_path / "one"
    assert compose(signal_model_dir, one, adapters, ASSETS / "dog", "--budget", 6) == 0
    two = tmp_path / "two"
    argv = ["-m", "pipelines.compose", "--pretrained_model_name_or_path", str(signal_model_dir), "--instance_data_dir",
            str(ASSETS / "dog"), "--instance_prompt", PROMPT, "--resolution", "64", "--output_dir", str(two),
            "--report_to", "none", "--budget", "6", *[x for a in adapters for x in ("--adapter", str(a))]]
    done = subprocess.run([*launch_two(), *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = read_run(one), read_run(two)
    assert b["processes"] == 2
    for x, y in zip(a["objective_history"], b["objective_history"], strict=True):
        assert abs(x - y) <= 1e-5
    assert all(abs(a["weights"][k] - b["weights"][k]) <= 1e-6 for k in a["weights"])


def _strip_fingerprint(src, dst) -> None:
    with safe_open(str(src), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "base_fingerprint"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(dst), metadata=meta)


def test_bad_input_gets_one_error_naming_it_and_nothing_written(signal_model_dir, library, tmp_path, capsys):
    adapters = [library[s] for s in SUBJECTS]

    def refused(*args, photos=ASSETS / "dog", expect: str):
        out = tmp_path / "refused"
        assert compose(signal_model_dir, out, args[0], photos, *args[1:]) == 2
        err = capsys.readouterr().err
        assert expect in err and err.count("error:") == 1, err
        assert not out.exists()

    # another base: the same architecture with other weights
    other = tmp_path / "other_base"
    shutil.copytree(signal_model_dir, other)
    unet_file = next((other / "unet").glob("*.safetensors"))
    with safe_open(str(unet_file), framework="pt") as f:
        tensors = {k: torch.randn_like(f.get_tensor(k)) for k in f.keys()}
    save_file(tensors, str(unet_file))
    out = tmp_path / "refused"
    argv = ["--pretrained_model_name_or_path", str(other), "--instance_data_dir", str(ASSETS / "dog"),
            "--instance_prompt", PROMPT, "--resolution", "64", "--output_dir", str(out), "--report_to", "none",
            "--adapter", str(library["dog"])]
    reset_accelerate()
    assert cli(argv) == 2 and not out.exists()
    assert f"--adapter '{library['dog']}' was trained on another base than" in capsys.readouterr().err

    # a file from before fingerprints: shapes checked, a warning, and it composes
    old = tmp_path / "old.safetensors"
    _strip_fingerprint(library["dog"] / "unet_adapter.safetensors", old)
    assert compose(signal_model_dir, tmp_path / "old_ok", [old, library["clock"]], ASSETS / "dog", "--budget", 5) == 0

    # different target sets under the factor rule
    narrow = tmp_path / "narrow"
    train(signal_model_dir, narrow, INSTANCE_DIR, "--target_modules", "to_q,to_v", "--max_train_steps", 2)
    refused([library["dog"], narrow], "--rule", "factors", expect="differ on")
    # a method composition refuses, by name
    dora = tmp_path / "dora"
    train(signal_model_dir, dora, INSTANCE_DIR, "--adapter", "dora", "--max_train_steps", 2)
    refused([library["dog"], dora], expect=f"--adapter '{dora}': dora adapters cannot be composed")
    # an empty example folder, a missing adapter, a file that is not an adapter
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(adapters, photos=empty, expect="contains no images")
    refused([library["dog"], tmp_path / "nowhere"], expect="does not exist")
    pickle_file = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, pickle_file)
    refused([library["dog"], pickle_file], expect="pickle")
    refused(adapters, "--budget", 3, expect="--budget 3")
    refused(adapters, "--weights", "1,2", expect="--weights has 2 values for 3")


def test_classifier_composition_is_a_loadable_run_with_mixed_heads(tmp_path, capsys):
    from safetensors.torch import load_file
    from text_helpers import SST2_DEV, SST2_TRAIN, build_tiny_text_model

    from dreamlora.train_text import cli as train_text
    from eval.classification import classification_metrics
    from pipelines.text import models as text_models
    from pipelines.text.data import Columns, PadCollator, read_examples, tokenize

    base = build_tiny_text_model("bert", tmp_path / "bert")
    library = []
    for seed in (0, 1):
        out = tmp_path / f"lib{seed}"
        reset_accelerate()
        assert train_text(["--model_name_or_path", str(base), "--train_file", str(SST2_TRAIN), "--max_train_steps", "6",
                           "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--report_to", "none",
                           "--max_length", "48", "--seed", str(seed), "--output_dir", str(out)]) == 0
        library.append(out)
    few = tmp_path / "few.txt"
    few.write_text("".join(SST2_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:16]), encoding="utf-8")
    out = tmp_path / "mix"
    argv = ["--model_name_or_path", str(base), "--train_file", str(few), "--validation_file", str(SST2_DEV),
            "--output_dir", str(out), "--report_to", "none", "--budget", "6",
            *[x for a in library for x in ("--adapter", str(a))]]
    reset_accelerate()
    assert cli(argv) == 0
    run = read_run(out)
    w = list(run["weights"].values())
    heads = [load_file(str(a / text_models.HEAD_FILE)) for a in library]
    mixed = load_file(str(out / text_models.HEAD_FILE))
    for name, value in mixed.items():  # the head is Σ wᵢ·Hᵢ, as the adapters are
        assert torch.allclose(value, w[0] * heads[0][name] + w[1] * heads[1][name], atol=1e-6)
    # a fresh process's view of the composed run scores what run.json says
    model, tokenizer, summary = text_models.load_trained(out)
    examples, _ = read_examples(SST2_DEV, "--validation_file", None, Columns(), summary["labels"])
    features = tokenize(tokenizer, examples, summary["max_length"])
    predicted = text_models.predict(model, features, PadCollator(tokenizer.pad_token_id), 64, "cpu")
    assert classification_metrics(predicted, examples.labels, 2)["accuracy"] == run["eval_accuracy"]

    # examples whose labels are not the library's: one error naming the adapter, nothing written
    other = tmp_path / "trec.txt"
    other.write_text("LOC where is it\nHUM who is he\nNUM how many\n", encoding="utf-8")
    refused = tmp_path / "refused"
    reset_accelerate()
    assert cli([*argv[:2], "--train_file", str(other), "--output_dir", str(refused),
                *[x for a in library for x in ("--adapter", str(a))]]) == 2
    err = capsys.readouterr().err
    assert f"--adapter '{library[0]}' was trained on ['0', '1']" in err and not refused.exists(), err
    # image photos given for classifier adapters: the flag is named
    reset_accelerate()
    assert cli([*argv, "--instance_data_dir", str(INSTANCE_DIR)]) == 2
    assert "--instance_data_dir is for image adapters" in capsys.readouterr().err
