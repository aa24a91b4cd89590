"""The app's Compose back-end without a server: a composition of two trained runs started through
`app_backend.composing` finishes and is an adapter run like a trained one (listed, sampled); bad input is refused
naming the problem, leaving no run folder; and its progress is read from search.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from app_server import ASSETS, copy_runs, wait_for

from app_backend import composing
from app_backend.composing import ComposeSettings
from app_backend.jobs import JobManager
from app_backend.safety import AppInputError
from app_backend.sampling import Sampler

DUCK = sorted(p for p in (ASSETS / "duck_toy").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:2]


@pytest.fixture
def jobs(tmp_path, source_runs):
    runs = tmp_path / "runs"
    runs.mkdir()
    copy_runs(source_runs, runs)
    return JobManager(runs)


def mix(name="mix", sources=("dog", "backpack"), **kw) -> ComposeSettings:
    return ComposeSettings(name=name, sources=list(sources), class_noun="toy", **{"budget": 6, **kw})


def test_a_composition_finishes_and_is_an_adapter_run(jobs):
    message = composing.start(jobs, mix(), DUCK)
    assert message.startswith("Started composing 'mix' from dog, backpack (updates rule, 6 evaluations)")
    with pytest.raises(AppInputError, match="'mix' is composing: one GPU job at a time"):  # it holds the GPU
        composing.start(jobs, mix("mix-2"), DUCK)
    wait_for(lambda: jobs.progress("mix").status != "running", 300, "the composition to end")
    p = composing.progress(jobs, "mix")
    assert p.status == "finished", p.log_tail
    assert p.evaluations == p.budget == 6 and p.best == min(p.objectives)
    assert p.best_so_far()[-1] == p.best and sorted(p.best_so_far(), reverse=True) == p.best_so_far()
    assert p.summary() == f"mix: finished · evaluation 6/6 · best objective {p.best:.4f}"
    run = jobs.runs_dir / "mix"
    written = json.loads((run / "run.json").read_text())["weights"]
    assert list(written) == [str(jobs.runs_dir / "dog"), str(jobs.runs_dir / "backpack")]
    assert p.weights == dict(zip(["dog", "backpack"], written.values(), strict=True))
    assert len(list((run / "data" / "subject").iterdir())) == 2 and "composed 2 adapters" in (
        run / "compose.log").read_text()

    # a run with an adapter wherever trained runs are: the list, the Runs table, the Sampler
    assert jobs.names()[0] == "mix" and jobs.has_adapter("mix")
    row = next(r for r in jobs.table() if r["run"] == "mix")
    assert row == {"run": "mix", "status": "finished", "method": "compose:updates", "rank": None, "step": "6/6",
                   "last checkpoint": None, "resumable": False, "adapter": True}
    with pytest.raises(AppInputError, match="is a composition: it cannot be resumed"):
        jobs.resume("mix")
    sampler = Sampler(jobs)
    _, files = sampler.sample(jobs.settings("mix")["base_model"], [("mix", 1.0)], "a photo of sks toy",
                              num_images=1, steps=2, size=64)
    assert len(files) == 1 and files[0].read_bytes()[:4] == b"\x89PNG"
    shown = composing.sample_beside_sources(jobs, sampler, "mix", "a photo of sks toy", seed=3, steps=2)
    assert [caption.split(" ")[0] for _, caption in shown] == ["mix", "dog", "backpack"]
    assert shown[1][1] == f"dog · weight {p.weights['dog']:+.3f}" and all(f.is_file() for f, _ in shown)


def without_adapter(jobs: JobManager) -> None:
    """A run that has not written its adapter yet (it was stopped before its first step)."""
    pending = jobs.runs_dir / "pending"
    pending.mkdir()
    (pending / "job.json").write_text(json.dumps({"name": "pending", "settings": {"base_model": "x"}}))


def fake_photo(jobs: JobManager) -> Path:
    fake = jobs.runs_dir.parent / "holiday.jpg"
    fake.write_text("#!/bin/sh\necho not a photo\n")
    return fake


@pytest.mark.parametrize("change, refusal", [
    ({"sources": ()}, "Pick at least one past run whose adapter goes into the mix"),
    ({"sources": ("dog", "no-such-run")}, "There is no run called 'no-such-run'"),
    ({"sources": ("dog", "pending")}, "Run 'pending' has no adapter yet"),
    ({"sources": ("dog", "dog")}, "Run 'dog' is picked twice"),
    ({"name": "../escape"}, "Run name '../escape' refused"),
    ({"name": "dog"}, "A run called 'dog' exists already"),
    ({"budget": 3}, "Budget must be between 4 and 1000"),
    ({"rule": "average"}, "Rule 'average': one of updates, factors"),
    ({"photos": []}, "Add at least one photo"),
    ({"photos": "fake"}, "holiday.jpg is not a readable image"),
])
def test_bad_compositions_are_refused_and_leave_no_run_folder(jobs, change, refusal):
    without_adapter(jobs)
    photos = change.pop("photos", DUCK)
    photos = [*DUCK[:1], fake_photo(jobs)] if photos == "fake" else photos
    before = sorted(p.name for p in jobs.runs_dir.iterdir())
    with pytest.raises(AppInputError, match=refusal):
        composing.start(jobs, mix(**change), photos)
    assert sorted(p.name for p in jobs.runs_dir.iterdir()) == before and not (jobs.runs_dir.parent / "escape").exists()


def test_progress_is_read_from_the_search_file(tmp_path):
    jobs = JobManager(tmp_path / "runs")
    run = jobs.runs_dir / "mixed"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"name": "mixed", "kind": "compose", "settings": {
        "budget": 5, "sources": ["dog", "cat"], "method": "compose:factors"}}))
    records = [([0.0, 0.0], 1.5), ([0.5, 0.5], 1.2), ([1.0, 0.0], 1.3)]
    lines = [json.dumps({"index": i, "weights": w, "loss": o, "objective": o, "source": "x", "time_s": 0.1,
                         "labels": ["/r/dog", "/r/cat"]}) for i, (w, o) in enumerate(records)]
    (run / "search.jsonl").write_text("\n".join(lines) + '\n{"index": 3, "wei')  # the command is mid-line
    p = composing.progress(jobs, "mixed")
    assert (p.evaluations, p.budget, p.objectives, p.best) == (3, 5, [1.5, 1.2, 1.3], 1.2)
    assert p.best_so_far() == [1.5, 1.2, 1.2] and p.weights == {"dog": 0.5, "cat": 0.5}
    assert p.status == "failed"  # not running, and it never wrote its adapter (a server restart killed it)
    train_view = jobs.progress("mixed")  # the Runs list's view: evaluations as steps, not resumable
    assert (train_view.step, train_view.total, train_view.losses[-1], train_view.resumable) == (3, 5, (3, 1.3), False)

    (run / "run.json").write_text(json.dumps({"weights": {"/r/dog": 0.25, "/r/cat": -0.5}}))
    (run / "unet_adapter.safetensors").write_bytes(b"adapter")
    (run / "exit.json").write_text(json.dumps({"returncode": 0}))
    p = composing.progress(jobs, "mixed")
    assert p.status == "finished" and p.weights == {"dog": 0.25, "cat": -0.5}  # the composed adapter's, as written
    with pytest.raises(AppInputError, match="a training run, not a composition"):
        (jobs.runs_dir / "trained").mkdir()
        (jobs.runs_dir / "trained" / "job.json").write_text(json.dumps({"name": "trained", "settings": {}}))
        composing.progress(jobs, "trained")


def test_the_compose_handler_refuses_server_folders_when_shared(tmp_path):
    import app

    shared = app.App(tmp_path / "runs", "tiny", allow_server_folders=False)
    with pytest.raises(AppInputError, match="upload the photos instead"):
        shared.compose("mix", ["dog"], [], str(ASSETS / "duck_toy"), "sks", "toy", "", "updates", 6, 0)
    assert not (tmp_path / "runs" / "mix").exists()
    frame = app.objective_frame([1.5, float("nan"), 1.2], [1.5, 1.5, 1.2])
    shown = frame.dropna()  # the rows without a value name the curves for the plot's legend
    assert list(shown["curve"]) == ["objective", "objective", "best so far", "best so far", "best so far"]
    assert list(shown["objective"]) == [1.5, 1.2, 1.5, 1.5, 1.2] and set(frame["curve"]) == {"objective", "best so far"}
