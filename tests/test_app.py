"""The app's endpoints driven by gradio_client against a real server on the tiny model: train, follow, stop,
resume, list runs, sample with two adapters (and ten clients at once), evaluate, compare, and refusals."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from app_server import ASSETS, GRADIO_PANDAS_NOISE, serve, wait_for
from gradio_client import Client, handle_file

from app_backend.safety import AppInputError

DOG = sorted(p for p in (ASSETS / "dog").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
pytestmark = GRADIO_PANDAS_NOISE


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    runs = tmp_path_factory.mktemp("app") / "runs"
    with serve(runs, tiny_model_dir) as (url, _):
        yield url, runs, str(tiny_model_dir)


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False)


def train(client, base, name, photos, method="lora", steps=2000, **kw):
    values = {"name": name, "base_model": base, "files": [handle_file(str(p)) for p in photos], "folder": "",
              "token": "sks", "class_noun": "dog", "instance_prompt": "", "method": method, "rank": 4,
              "steps": steps, "learning_rate": 1e-3, "prior": False, "class_prompt": "", "num_class_images": 10,
              "text_encoder": False, "resolution": 64, "validation_prompt": "a photo of sks dog on the beach",
              "validation_steps": 10, "checkpointing_steps": 1000, "seed": 0, **kw}
    return client.predict(*values.values(), api_name="/train")


def step_of(client, name) -> tuple[str, int]:
    headline = client.predict(name, api_name="/progress")[0]
    return headline, int(re.search(r"step (\d+)/", headline).group(1))


def runs_table(client) -> dict[str, dict]:
    table = client.predict(api_name="/runs")
    return {row[0]: dict(zip(table["headers"], row, strict=True)) for row in table["data"]}


def sample(client, base, adapters, prompt="a photo of sks dog", num_images=2, seed=0):
    slots = [*adapters, *[("", 1.0)] * (4 - len(adapters))]
    return client.predict(base, *[v for slot in slots for v in slot], prompt, "", seed, num_images, 4, 7.5, 64,
                          api_name="/sample")


def test_endpoints_are_named(client):
    named = set(client.view_api(return_format="dict")["named_endpoints"])
    assert {"/train", "/stop", "/resume", "/progress", "/runs", "/sample", "/evaluate", "/compare",
            "/download"} <= named


def test_gpu_work_shares_one_slot_and_the_queue_is_bounded(server, tiny_model_dir):
    import app

    demo = app.build(server[1].parent / "runs-config", str(tiny_model_dir))
    demo.queue(max_size=5)
    slots = {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values() if fn.api_name}
    assert {name: slots[name] for name in ("train", "resume", "sample", "evaluate", "compare")} == \
        dict.fromkeys(("train", "resume", "sample", "evaluate", "compare"), ("gpu", 1))
    assert slots["stop"][0] != "gpu"  # Stop must never wait behind the GPU queue
    assert demo._queue.max_size == 5 and app.parse_args([]).max_queue == 32


def test_train_stop_resume(server, client):
    _, runs, base = server
    message, _ = train(client, base, "dog-lora", DOG, validation_steps=5000)  # previews delay a checkpoint
    assert "Started 'dog-lora'" in message
    # progress moves while the trainer runs, read from its progress file
    _, first = wait_for(lambda: (s := step_of(client, "dog-lora"))[1] >= 3 and s, 120, "training to start")
    headline, later = wait_for(lambda: (s := step_of(client, "dog-lora"))[1] > first and s, 60, "a later step")
    assert "running" in headline and "ETA" in headline and "loss" in headline
    with pytest.raises(Exception, match="one GPU job at a time"):  # a second training waits its turn
        train(client, base, "dog-other", DOG)
    with pytest.raises(Exception, match="'dog-lora' is training and has the GPU"):  # so does sampling
        sample(client, base, [])

    stopped = re.search(r"saved a checkpoint at step (\d+) and stopped", client.predict("dog-lora", api_name="/stop"))
    row = runs_table(client)["dog-lora"]
    assert row["status"] == "stopped" and row["resumable"] and row["adapter"]
    stopped_at = row["last checkpoint"]
    assert stopped and int(stopped.group(1)) == stopped_at
    assert stopped_at >= later and (runs / "dog-lora" / f"checkpoint-{stopped_at}").is_dir()
    assert (runs / "dog-lora" / "run.json").is_file()

    assert "Resumed" in client.predict("dog-lora", api_name="/resume")
    wait_for(lambda: step_of(client, "dog-lora")[1] > stopped_at, 120, "the resumed run to pass its checkpoint")
    records = [json.loads(line) for line in (runs / "dog-lora" / "progress.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r["event"] == "started"][-1]
    assert resumed["step"] == stopped_at and resumed["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert "stopped" in client.predict("dog-lora", api_name="/stop")
    assert runs_table(client)["dog-lora"]["status"] == "stopped"

    # a short run that finishes: listed as finished and no longer resumable
    train(client, base, "dog-dora", DOG, method="dora", steps=12)
    wait_for(lambda: runs_table(client)["dog-dora"]["status"] == "finished", 120, "dog-dora to finish")
    assert not runs_table(client)["dog-dora"]["resumable"]
    with pytest.raises(Exception, match="finished all its steps"):
        client.predict("dog-dora", api_name="/resume")
    _, _, validation, log, _ = client.predict("dog-dora", api_name="/progress")
    assert len(validation) == 4 and "training" in log  # previews at steps 10 and 12, two images each


def test_sample_with_two_adapters(server, client):
    _, runs, base = server
    gallery, files, message = sample(client, base, [("dog-lora", 1.0), ("dog-dora", 0.5)])
    assert len(gallery) == 2 and len(files) == 2 and "2 images" in message
    folder = runs / message.split(" in ")[-1]
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [(a["method"], a["scale"]) for a in rows[0]["adapters"]] == [("lora", 1.0), ("dora", 0.5)]
    assert Path(files[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ten_concurrent_sampling_clients(server):
    url, _, base = server
    results, errors = {}, []

    def one(i):
        try:
            results[i] = sample(Client(url, verbose=False), base, [("dog-lora", 1.0)], num_images=1, seed=i)
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert sorted(results) == list(range(10))
    assert all(len(gallery) == 1 and Path(files[0]).is_file() for gallery, files, _ in results.values())


def test_evaluate_runs_and_a_sample_folder(server, client):
    _, runs, _ = server
    folders = [f"_samples/{p.name}" for p in sorted((runs / "_samples").iterdir())][:1]
    table, plot, message = client.predict(["dog-lora", "dog-dora"], folders, 2, 1, 4, 0, "offline",
                                          api_name="/evaluate")
    rows = {r[0]: dict(zip(table["headers"], r, strict=True)) for r in table["data"]}
    assert set(rows) == {"dog-lora", "dog-dora", folders[0]} and "Scored 3" in message
    assert rows["dog-dora"]["method"] == "dora" and rows["dog-dora"]["trainable params"] > 0
    # the offline scorer: EfficientNet-Lite0's real weights, and no DINO/CLIP numbers from random weights
    assert all(re.fullmatch(r"-?\d\.\d{3}", rows[r]["EfficientNet-Lite0"]) for r in rows)
    assert all(rows[r][m] in (None, "", "nan") for r in rows for m in ("DINO", "CLIP-I", "CLIP-T"))
    assert Path(plot).is_file()
    [folder] = (runs / "dog-lora" / "eval").glob("p2-k1-s4-seed0-a*")  # keyed by the adapter's content too
    assert len(list((folder / "subject").glob("*.png"))) == 2


def test_compare_two_methods(server, client):
    grids, table, plot, message = client.predict(["dog-lora", "dog-dora"], 2, 1, 4, 0, "offline",
                                                 api_name="/compare")
    assert len(grids) == 2 and all(Path(g["image"]).is_file() for g in grids)  # one grid per prompt
    assert grids[0]["caption"].startswith("a sks dog") or "sks dog" in grids[0]["caption"]
    columns = table["headers"]
    assert {"trainable params", "train time (s)", "peak memory (MiB)", "DINO", "CLIP-T"} <= set(columns)
    assert [r[columns.index("method")] for r in table["data"]] == ["lora", "dora"]
    assert Path(plot).is_file() and "2 runs" in message


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/b", "..", ".hidden", "x" * 65, "_samples", ""])
def test_malicious_run_name_is_refused(server, client, name):
    _, runs, base = server
    before = set(p.name for p in runs.parent.rglob("*"))
    refusal = "Give the run a name" if not name else rf"Run name {re.escape(repr(name))} refused: use 1-64 letters"
    with pytest.raises(Exception, match=refusal):  # the app's own refusal, naming the run, not any error
        train(client, base, name, DOG)
    assert set(p.name for p in runs.parent.rglob("*")) == before


def test_fake_image_upload_is_refused(server, client, tmp_path):
    _, runs, base = server
    fake = tmp_path / "holiday.jpg"
    fake.write_text("#!/bin/sh\necho not a photo\n")
    with pytest.raises(Exception, match="holiday.jpg is not a readable image"):
        train(client, base, "fake-upload", [*DOG[:2], fake])
    assert not (runs / "fake-upload").exists()


def test_paths_outside_the_runs_folder_are_refused(server, client):
    url, runs, _ = server
    with pytest.raises(Exception, match="outside the app's runs folder"):
        client.predict([], ["../../../etc"], 1, 1, 1, 0, "offline", api_name="/evaluate")
    with pytest.raises(Exception, match="no run called"):
        sample(client, server[2], [("no-such-run", 1.0)])

    assert status(url, str(Path(__file__).resolve())) in (403, 404)
    assert status(url, "/etc/passwd") in (403, 404)
    assert status(url, str(runs) + "/../../../../etc/passwd") in (403, 404)


def status(url: str, path: str) -> int:
    """The HTTP status of fetching a server path by URL, as anyone with the link could."""
    try:
        return urllib.request.urlopen(url + "gradio_api/file=" + path).status
    except urllib.error.HTTPError as e:
        return e.code


def test_photos_logs_and_checkpoints_are_never_served(server, client):
    """Anyone with the link can fetch a served path: only the copies of what the page shows are served."""
    url, runs, _ = server
    run = runs / "dog-lora"
    private = [run / "data" / "subject" / "photo-000.jpg", run / "train.log", run / "job.json",
               run / "progress.jsonl", next(run.glob("checkpoint-*/*")), run / "unet_adapter.safetensors",
               next(runs.glob("dog-dora/validation/*.png")), next(runs.glob("_samples/*/run.json")),
               next(runs.glob("_samples/*/*.png"))]
    for path in private:
        assert path.is_file() and status(url, str(path)) == 403, path
    # what the page shows still reaches it: the previews, and the adapter when asked for
    _, _, validation, _, ranks = client.predict("dog-dora", api_name="/progress")
    assert ranks["value"] is None and ranks["visible"] is False  # DoRA reports no rank per layer: no rank plot
    assert len(validation) == 4 and all(Path(v["image"]).stat().st_size > 0 for v in validation)
    served = next((runs / "_served" / "dog-dora" / "validation").glob("*.png"))
    assert status(url, str(served)) == 200
    files = {Path(f).name: Path(f) for f in client.predict("dog-dora", api_name="/download")}
    assert "unet_adapter.safetensors" in files
    assert all(f.read_bytes() == (runs / "dog-dora" / name).read_bytes() for name, f in files.items())


def test_shared_app_fixes_the_base_model_and_refuses_server_folders(tmp_path):
    import app

    shared = app.App(tmp_path / "runs", "tiny", allow_server_folders=False)
    assert shared.check_base("tiny") == "tiny"
    with pytest.raises(AppInputError, match="fixed to 'tiny'"):
        shared.check_base("some/hub-model")
    with pytest.raises(AppInputError, match="upload the photos instead"):
        shared.photos([], str(ASSETS / "dog"))
    local = app.App(tmp_path / "runs", "tiny", allow_server_folders=True)
    assert local.check_base("some/hub-model") == "some/hub-model"
    assert len(local.photos([], str(ASSETS / "dog"))[0]) == len(DOG)
    assert app.is_loopback("127.0.0.1") and app.is_loopback("localhost") and not app.is_loopback("0.0.0.0")
    assert app.parse_args([]).host == "127.0.0.1" and app.parse_args([]).port == 7860


def test_a_finished_runs_rank_plot_is_shown_and_served(tmp_path):
    """AdaLoRA/ReLoRA runs write ranks.png: the run view shows it (a served copy), other runs show none."""
    import app

    page = app.App(tmp_path / "runs", "tiny", allow_server_folders=False)
    run = tmp_path / "runs" / "dog-adalora"
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"settings": {"steps": 10, "method": "adalora"}}))
    assert page.progress("dog-adalora")[4]["visible"] is False
    (run / "ranks.png").write_bytes(b"\x89PNG fake")
    shown = page.progress("dog-adalora")[4]
    assert shown["visible"] is True and Path(shown["value"]).read_bytes() == b"\x89PNG fake"
    assert "_served" in shown["value"]


def test_a_long_loss_curve_is_binned_for_the_page():
    import app

    frame = app.loss_frame([(step, float(step % 2)) for step in range(1, 2001)])
    assert len(frame) == 500 and frame["step"].iloc[-1] == 2000 and frame["loss"].between(0.4, 0.6).all()
    assert len(app.loss_frame([(1, 0.5), (2, 0.25)])) == 2 and list(app.loss_frame([]).columns) == ["step", "loss"]


def test_method_picker_and_option_fields_come_from_the_registry(server, client, tiny_model_dir):
    """The picker lists every registered method with its description; the method-option fields are generated from
    the methods' option dataclasses, a value typed there reaches the trainer as the method's flag, and a bad one
    is refused naming it."""
    import app
    from dreamlora.methods import METHODS

    demo = app.build(server[1].parent / "runs-options", str(tiny_model_dir))
    props = [c["props"] for c in demo.config["components"] if c.get("props", {}).get("label")]
    picker = next(p for p in props if p["label"] == "Method")
    assert [tuple(c) for c in picker["choices"]] == [(cls.description, name) for name, cls in METHODS.items()]
    assert {p["label"] for p in props} >= {"loraplus_ratio", "loraplus_lr_embedding", "singlora_ramp_steps"}
    shown = [update["visible"] for update in app.show_options("singlora")]  # picking a method shows its fields
    assert shown == [flag == "singlora_ramp_steps" for flag in app.option_flags()]

    _, runs, base = server
    blank = dict.fromkeys(app.option_flags(), "")
    with pytest.raises(Exception, match="singlora_ramp_steps must be an integer >= 0"):
        train(client, base, "dog-bad-ramp", DOG, method="singlora", steps=2, **{**blank, "singlora_ramp_steps": "-2"})
    train(client, base, "dog-ramp", DOG, method="singlora", steps=2, validation_prompt="",
          **{**blank, "singlora_ramp_steps": "3", "loraplus_ratio": "2"})  # another method's field: ignored
    wait_for(lambda: runs_table(client)["dog-ramp"]["status"] == "finished", 120, "dog-ramp to finish")
    summary = json.loads((runs / "dog-ramp" / "run.json").read_text())
    assert summary["args"]["singlora_ramp_steps"] == 3 and summary["adapter_config"]["options"] == {"ramp_steps": 3}
    assert summary["args"]["loraplus_ratio"] is None
